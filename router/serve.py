"""``epd-serve``: a whole deployment on one host - the router and its workers as processes.

    epd-serve [--config configs/1e1p1d.yaml] [--model DIR] [--host 127.0.0.1] [--port 8000]

Prints the URL once ``GET /health`` answers 200 (every configured worker has
registered) and stops every process on Ctrl-C or SIGTERM. With no model it
builds the tiny LLaVA (random weights, local tokenizer) and serves it in
1e1p1d. This module only starts processes: it imports neither torch nor stages.

Supervision: a process that exits is started again (same command line, so the
same role and device; a worker comes back as a new incarnation) after a pause
that doubles per recent restart up to ``RESTART_MAX_S``. One that exits
``GIVE_UP_RESTARTS`` times within ``GIVE_UP_WINDOW_S`` is given up (logged and
told to the router: ``/health`` detail and ``/metrics`` show it) while the rest
keep serving. Children die with ``epd-serve``: a parent-death signal (Linux
``PR_SET_PDEATHSIG``), and workers also watch their parent. A second Ctrl-C
during the stop kills what is left at once.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from pathlib import Path

# The configuration lives in router.serve_config; its names stay importable from here.
from router.serve_config import (API_FLAGS, DEFAULT_CONFIG, ENGINE_FLAGS, ROOT, apply_overrides, cluster_cache_args,
                                 config_path, default_model, free_port, list_configs, load_config, slo_args,
                                 worker_plan)

log = logging.getLogger("epd.serve")
RESTART_BASE_S = 0.5  # pause before the first restart; doubles per restart in the window
RESTART_MAX_S = 10.0
GIVE_UP_RESTARTS = 5  # this many restarts within the window: crash loop, given up
GIVE_UP_WINDOW_S = 120.0
PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def _die_with(parent: int):
    """preexec_fn: the child gets SIGTERM when ``parent`` (this process) dies, even by SIGKILL."""
    prctl = _LIBC.prctl if _LIBC is not None else None  # looked up here: nothing to load after fork

    def setup():
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)

    return setup


class _PortTaken(RuntimeError):
    """A process of the deployment could not bind a port picked for it."""


class Deployment:
    """Router + workers as child processes; ``start()`` returns once ``/health`` is 200."""

    def __init__(self, config: dict, model: str | Path, host: str = "127.0.0.1", port: int | None = None,
                 log_dir: str | Path | None = None, transfer: str | None = None, extra_router_args=()):
        self.cfg, self.model, self.host = config, str(model), host
        self._port_given = port is not None
        self.port = port  # picked with the bus addresses when not given
        self.log_dir = Path(log_dir) if log_dir else None
        self.transfer = transfer or (config.get("transfer") or {}).get("backend", "auto")
        self.name = config.get("served_model_name") or Path(self.model).name
        self._pick_ports()
        self.extra_router_args = list(extra_router_args)
        self.procs: dict[str, subprocess.Popen] = {}
        self.argv: dict[str, tuple[list[str], dict | None]] = {}
        self.restarts: dict[str, deque[float]] = {}  # name -> recent restart times
        self.pending: dict[str, float] = {}  # name -> when to start it again
        self.given_up: set[str] = set()
        self._stopping = False

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _spawn(self, name: str, argv: list[str], env: dict | None = None) -> None:
        self.argv[name] = (argv, env)
        out = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{name}.log", "ab")
        env = {**os.environ, **(env or {}), "EPD_PARENT_PID": str(os.getpid())}
        self.procs[name] = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT if out else None,
                                            env=env, start_new_session=True, preexec_fn=_die_with(os.getpid()))
        if out is not None:
            out.close()  # the child holds its own descriptor

    def _workers(self) -> list[tuple[str, list[str]]]:
        engine = dict(self.cfg.get("engine") or {})
        n_total = sum(int(w.get("count", 1)) for w in self.cfg["workers"])
        engine.setdefault("threads", max(1, (os.cpu_count() or 1) // n_total))
        out = []
        for wid, w, device in worker_plan(self.cfg):
            opts = {**engine, **{k: v for k, v in w.items() if k in ENGINE_FLAGS}, "device": device}
            argv = [sys.executable, "-m", "stages.worker", "--role", w["role"], "--model", self.model,
                    "--router", self.worker_addr, "--control", self.control_addr, "--worker-id", wid,
                    "--host", self.host, "--transfer", self.transfer]
            pull_timeout = (self.cfg.get("transfer") or {}).get("pull_timeout_s")
            if pull_timeout is not None:
                argv += ["--pull-timeout", str(pull_timeout)]
            for key, flag in ENGINE_FLAGS.items():
                if opts.get(key) is not None:
                    argv += [flag, str(opts[key])]
            out.append((wid, argv))
        return out

    def router_command(self) -> tuple[list[str], dict | None]:
        """The router's command line, and what it needs in its environment (kept off command lines)."""
        expect = {}
        for w in self.cfg["workers"]:
            expect[w["role"]] = expect.get(w["role"], 0) + int(w.get("count", 1))
        router_cfg = self.cfg.get("router") or {}
        policy = router_cfg.get("policy", "slo_aware")
        api_args: list[str] = []
        for key, flag in API_FLAGS.items():
            value = router_cfg.get(key)
            if value is not None:
                api_args += [flag, ",".join(value) if isinstance(value, list) else str(value)]
        api_args += cluster_cache_args(router_cfg.get("cluster_cache"))
        api_args += slo_args(router_cfg)
        if router_cfg.get("autoscale") not in (None, False):  # {enabled, interval_s, ...}: router.autoscale
            api_args += ["--autoscale", json.dumps(router_cfg["autoscale"] if isinstance(router_cfg["autoscale"], dict)
                                                   else {"enabled": bool(router_cfg["autoscale"])})]
        admin_key = router_cfg.get("admin_key")
        return ([sys.executable, "-m", "router.server", "--served-model-name", self.name,
                 "--host", self.host, "--port", str(self.port), "--worker-addr", self.worker_addr,
                 "--control-addr", self.control_addr, "--client-addr", self.client_addr,
                 "--expect", ",".join(f"{r}={n}" for r, n in expect.items()),
                 "--policy", policy, *api_args, *self.extra_router_args],
                {"EPD_ADMIN_KEY": str(admin_key)} if admin_key else None)

    def _pick_ports(self) -> None:
        """The bus addresses (and the HTTP port unless the caller gave one): free now, by asking
        the OS, but another process can take one before the router binds it (``start`` retries)."""
        if not self._port_given:
            self.port = free_port(self.host)
        self.worker_addr = f"tcp://{self.host}:{free_port(self.host)}"
        self.control_addr = f"tcp://{self.host}:{free_port(self.host)}"
        self.client_addr = f"tcp://{self.host}:{free_port(self.host)}"

    def start(self, timeout: float = 180.0) -> str:
        for attempt in range(3):
            try:
                return self._start(timeout)
            except _PortTaken as e:
                if attempt == 2:
                    self.stop()
                    raise RuntimeError(str(e)) from None
                log.warning("a port picked for the deployment was taken meanwhile: starting again on others")
                self._kill_all()
                self._stopping = False
                self.procs.clear()
                self._pick_ports()

    def _start(self, timeout: float) -> str:
        workers = self._workers()
        self._spawn("router", *self.router_command())
        for wid, argv in workers:
            self._spawn(wid, argv, {"OMP_NUM_THREADS": str(self.cfg.get("engine", {}).get("threads") or
                                                            argv[argv.index("--threads") + 1])})
        deadline, detail = time.monotonic() + timeout, {}
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    tail = self._tail(name)
                    if "address already in use" in tail.lower():
                        raise _PortTaken(f"{name} exited with code {p.returncode} during start-up{tail}")
                    self.stop()
                    raise RuntimeError(f"{name} exited with code {p.returncode} during start-up{tail}")
            ok, detail = self.health()
            if ok:
                return self.url
            time.sleep(0.5)
        self.stop()
        missing = detail.get("missing") if isinstance(detail, dict) else None
        raise TimeoutError(f"the deployment was not ready after {timeout:.0f} s; workers not registered: "
                           f"{missing or 'unknown (router not answering)'}")

    def health(self) -> tuple[bool, dict]:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                return r.status == 200, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            try:
                return False, json.loads(e.read() or b"{}")
            except ValueError:
                return False, {}
        except (OSError, ValueError):
            return False, {}

    def _tail(self, name: str, n: int = 3000) -> str:
        if self.log_dir is None:
            return ""
        text = (self.log_dir / f"{name}.log").read_text(errors="replace")
        return f"; its log ends:\n{text[-n:]}"

    def kill(self, name: str) -> None:
        """Kill one process outright (fault tests)."""
        self._reap(self.procs[name])
        self.procs[name].wait()

    def restart(self, name: str) -> None:
        """Kill one process (if alive) and start it again with the same command line."""
        if self.procs[name].poll() is None:
            self.kill(name)
        self._spawn(name, *self.argv[name])

    # ---- supervision -----------------------------------------------------------------------
    def supervise(self) -> None:
        """One pass: start again what exited (after its backoff pause); give up on crash loops."""
        now = time.monotonic()
        for name, p in list(self.procs.items()):
            if self._stopping or name in self.given_up or p.poll() is None:
                continue
            if name in self.pending:
                if now >= self.pending[name]:
                    del self.pending[name]
                    self._spawn(name, *self.argv[name])
                    log.warning("%s started again (pid %d)", name, self.procs[name].pid)
                continue
            self._reap(p)
            recent = self.restarts.setdefault(name, deque())
            while recent and now - recent[0] > GIVE_UP_WINDOW_S:
                recent.popleft()
            if len(recent) >= GIVE_UP_RESTARTS:
                self.given_up.add(name)
                why = f"exited {len(recent) + 1} times within {GIVE_UP_WINDOW_S:.0f} s (last code {p.returncode})"
                log.error("%s %s; giving up on it, the rest keep serving", name, why)
                self._tell_router(name, len(recent), why)
                continue
            pause = min(RESTART_MAX_S, RESTART_BASE_S * 2 ** len(recent))
            recent.append(now)
            self.pending[name] = now + pause
            log.warning("%s exited with code %s; starting it again in %.1f s", name, p.returncode, pause)

    def _reap(self, p: subprocess.Popen) -> None:
        """Whatever the dead child left in its process group goes with it."""
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def _tell_router(self, name: str, restarts: int, why: str) -> None:
        if name == "router":
            return
        try:
            from bus import messages as m
            from bus.sockets import SyncSocket

            with SyncSocket("dealer", self.worker_addr, bind=False, identity=b"epd-serve") as sock:
                sock.send(m.WorkerGaveUp(worker_id=name, restarts=restarts, reason=why))
                time.sleep(0.2)  # LINGER is 0: let the message leave before the socket closes
        except Exception:  # noqa: BLE001 - the log has it anyway
            log.exception("telling the router that %s is given up", name)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM everything, then SIGKILL what has not exited within ``grace`` seconds.

        A signal that arrives meanwhile (a second Ctrl-C) kills what is left at once."""
        self._stopping = True
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: self.kill_now())
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        for p in self.procs.values():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self._kill_all()

    def kill_now(self) -> None:
        """SIGKILL every child's process group (safe in a signal handler: no waiting)."""
        self._stopping = True
        for p in self.procs.values():
            self._reap(p)

    def _kill_all(self) -> None:
        self.kill_now()
        for p in self.procs.values():
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass

    def __enter__(self) -> "Deployment":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def parse_args(argv=None) -> argparse.Namespace:
    from router.server import HelpWithDefaults

    ap = argparse.ArgumentParser(prog="epd-serve", description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpWithDefaults)
    ap.add_argument("--config", default=DEFAULT_CONFIG.stem,
                    help="deployment: a YAML file or the name of one in configs/ (see --list-configs)")
    ap.add_argument("--list-configs", action="store_true", help="list the shipped configs and exit")
    ap.add_argument("--model", help="model directory (default: the config's, else a tiny LLaVA built in "
                                    "$EPD_CACHE or ~/.cache/epd)")
    ap.add_argument("--served-model-name", help="the name the API answers to (default: the config's, else "
                                                "the model directory's name)")
    ap.add_argument("--host", default="127.0.0.1", help="address the API, the SDK front and the workers use")
    ap.add_argument("--port", type=int, default=8000, help="HTTP port of the OpenAI API")
    ap.add_argument("--sdk-port", type=int, default=7102, help="port of the ZeroMQ SDK front (bus.client)")
    ap.add_argument("--api-key", help="/v1 routes then need 'Authorization: Bearer KEY' (default: $EPD_API_KEY, "
                                      "else no key)")
    ap.add_argument("--transfer", choices=["auto", "shm", "zmq", "ucx"],
                    help="KV / embedding transfer backend (default: the config's, else auto)")
    ap.add_argument("--device", help="device of every worker, e.g. cpu or cuda:0 (default: the config's)")
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                    help="model dtype (default: the config's; auto = float32 on CPU, bfloat16 on GPU)")
    ap.add_argument("--max-model-len", type=int, help="context length (default: the config's, else the model's)")
    ap.add_argument("--max-num-seqs", type=int, help="sequences per engine step (default: the config's)")
    ap.add_argument("--kv-cache-memory-gb", type=float,
                    help="KV cache size per worker, GiB (default: the config's)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds to wait for every worker to register")
    ap.add_argument("--launcher", choices=["local", "ray"],
                    help="who runs the processes (default: the config's launcher.kind, else local); ray: "
                         "actors on a Ray cluster, placed by each entry's resources (router/launch_ray.py)")
    ap.add_argument("--ray-address", help="the Ray cluster to join, e.g. HEAD:6379 (default: the config's "
                                          "launcher.address, else Ray's rule: $RAY_ADDRESS, the cluster last "
                                          "started here, a new local Ray)")
    return ap.parse_args(argv)


def stop_on_signals(dep: Deployment) -> None:
    """The first Ctrl-C or SIGTERM raises KeyboardInterrupt (the caller then runs ``dep.stop()``);
    a second one, during that stop, kills every child at once instead of interrupting it."""

    def on_signal(signum, _frame):
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: dep.kill_now())
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list_configs:
        print(list_configs())
        return 0
    config = config_path(args.config)
    cfg = apply_overrides(load_config(config), args)
    if args.api_key:
        os.environ["EPD_API_KEY"] = args.api_key  # the router inherits it (kept off command lines)
    model = args.model or cfg.get("model") or default_model()
    if (args.launcher or (cfg.get("launcher") or {}).get("kind", "local")) == "ray":
        from router.launch_ray import RayDeployment  # the only place that imports Ray

        dep = RayDeployment(cfg, model, args.host, args.port, address=args.ray_address, transfer=args.transfer)
    else:
        dep = Deployment(cfg, model, args.host, args.port, transfer=args.transfer)
    dep.client_addr = f"tcp://{args.host}:{args.sdk_port}"
    stop_on_signals(dep)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s epd-serve %(levelname)s %(message)s")
    try:
        url = dep.start(args.timeout)
        workers = ", ".join(f"{wid} ({device})" for wid, _, device in worker_plan(cfg))
        print(f"epd is serving {dep.name} at {url}  (SDK: {dep.client_addr})\n  model:   {Path(model).resolve()}"
              f"\n  config:  {config.resolve()}\n  workers: {workers}", flush=True)
        while True:
            dep.supervise()
            time.sleep(0.2)
    except KeyboardInterrupt:
        return 0
    finally:
        dep.stop()


if __name__ == "__main__":
    raise SystemExit(main())
