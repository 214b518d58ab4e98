"""epd-serve's supervision with stand-in children (no model): restarts with backoff, giving
up on a crash loop (and telling the router), children that die with epd-serve, and a second
signal during the stop that kills what is left at once."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

from bus import messages as m
from bus.sockets import SyncSocket, free_tcp_address
from router import serve
from router.serve import ROOT, Deployment
from tests.e2e_util import pid_alive



def test_restarts_then_gives_up_on_a_crash_loop(tmp_path, monkeypatch):
    monkeypatch.setattr(serve, "RESTART_BASE_S", 0.05)
    monkeypatch.setattr(serve, "RESTART_MAX_S", 0.2)
    monkeypatch.setattr(serve, "GIVE_UP_RESTARTS", 3)
    addr = free_tcp_address()
    with SyncSocket("router", addr, bind=True) as router:
        dep = Deployment({"workers": [{"role": "decode"}]}, "unused", log_dir=tmp_path)
        dep.worker_addr = addr
        dep._spawn("decode-0", [sys.executable, "-c", "import sys; sys.exit(3)"])
        dep._spawn("prefill-0", [sys.executable, "-c", "import time; time.sleep(60)"])
        pids, starts = {dep.procs["decode-0"].pid}, [time.monotonic()]
        deadline = time.monotonic() + 20
        while "decode-0" not in dep.given_up and time.monotonic() < deadline:
            dep.supervise()
            if dep.procs["decode-0"].pid not in pids:
                pids.add(dep.procs["decode-0"].pid)
                starts.append(time.monotonic())
            time.sleep(0.01)
        assert "decode-0" in dep.given_up and len(pids) == 4  # started, restarted 3 times, given up
        gaps = [b - a for a, b in zip(starts, starts[1:])]
        assert gaps[-1] > gaps[0]  # the pause grows
        ident, note = router.recv(timeout=5)
        assert ident == b"epd-serve" and isinstance(note, m.WorkerGaveUp)
        assert note.worker_id == "decode-0" and note.restarts == 3 and "exited 4 times" in note.reason
        assert dep.procs["prefill-0"].poll() is None  # the rest keep running
        dep.stop(grace=5)
        assert all(p.poll() is not None for p in dep.procs.values())


def _supervisor(tmp_path, child: str, body: str) -> tuple[subprocess.Popen, int]:
    """A process that starts one child through Deployment, then runs ``body``; (it, child pid)."""
    script = textwrap.dedent(f"""
        import sys, time
        from router.serve import Deployment, stop_on_signals
        dep = Deployment({{"workers": [{{"role": "decode"}}]}}, "unused")
        dep._spawn("w", [sys.executable, "-c", {child!r}])
        print(dep.procs["w"].pid, flush=True)
    """) + textwrap.dedent(body)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    pid = int(proc.stdout.readline())
    time.sleep(1.0)  # the child sets itself up
    return proc, pid


def test_children_die_with_epd_serve(tmp_path):
    """SIGKILL of the supervisor: the parent-death signal ends its child."""
    proc, child = _supervisor(tmp_path, "import time; time.sleep(120)", "time.sleep(120)")
    assert pid_alive(child)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 5
    while pid_alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(child)


def test_a_second_signal_during_the_stop_leaves_nothing(tmp_path):
    """The child ignores SIGTERM, so the stop would wait out its 60 s grace; a second Ctrl-C
    kills it at once, and no traceback ends the stop half-way."""
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"
    proc, child = _supervisor(tmp_path, stubborn, """
        stop_on_signals(dep)
        try:
            while True:
                time.sleep(0.1)
        except KeyboardInterrupt:
            pass
        finally:
            dep.stop(grace=60)
        print("stopped", flush=True)
    """)
    proc.send_signal(signal.SIGTERM)
    time.sleep(1.0)
    assert pid_alive(child)  # ignoring SIGTERM, inside the grace
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=15)
    assert time.monotonic() - t0 < 10 and "stopped" in out and proc.returncode == 0
    assert not pid_alive(child)
