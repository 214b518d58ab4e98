"""``epd-serve --launcher ray`` on a two-node Ray cluster on this machine.

A head (``ray start --head``, custom resource ``node_a``) and a second node (``ray start
--address``, custom resource ``node_b``), each a raylet of its own, with two CPUs each.
``configs/ray-1e1p1d.yaml`` pins the encode worker to ``node_b`` and packs prefill and decode
onto one node; the test also pins the router to ``node_b`` and that pair to ``node_a`` (so that
the deployment always fits). The processes' parents (owner actor, then the raylet that started
it) show where Ray put them. Answers must be
transformers' greedy tokens, before and after a kill -9 of the decode worker's owner actor and of
the prefill worker's own process (Ray restarts each, a new incarnation registers with the router),
of the router's process (back on the same addresses, its workers register again),
and after the encode worker's actor is killed for good (given up: prefill encodes the images).
SIGTERM to epd-serve must leave no process of the deployment, and ``ray stop`` none of Ray's.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest
import yaml

from router.serve import ROOT, free_port
from tests.e2e_util import chat_body, pid_alive, reference

CLUSTER_MARKS = (pytest.mark.e2e, pytest.mark.ray, pytest.mark.slow,
                 pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs the ray extra"))


def on_cluster(test):
    """A test of the two-node cluster (the config-only tests at the end need no Ray)."""
    for mark in CLUSTER_MARKS:
        test = mark(test)
    return test


RAY_NODE = ["--num-cpus", "2", "--object-store-memory", str(100 << 20), "--disable-usage-stats"]
RAY_ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
RAY = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"  # the CLI beside this interpreter


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""



def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not pid_alive(pid), f"{pid} still runs: {_cmdline(pid)[:160]}"


def _pids() -> set[int]:
    return {int(p) for p in os.listdir("/proc") if p.isdigit()}


def _ray_processes(since: set[int], temp_dir: str) -> list[str]:
    """Processes started after ``since`` that belong to Ray: its daemons name the temp dir, its workers
    and agents are ``ray::...``."""
    out = []
    for pid in _pids() - since:
        cmd = _cmdline(pid)
        if pid_alive(pid) and (temp_dir in cmd or cmd.startswith("ray::") or "site-packages/ray/" in cmd):
            out.append(f"{pid}: {cmd[:160]}")
    return out


@pytest.fixture(scope="module")
def cluster():
    """Two raylets on this machine: head (node_a) and a second node (node_b)."""
    before = _pids()
    temp_dir = tempfile.mkdtemp(prefix="epdray", dir="/tmp")  # short: Ray's socket paths live under it
    port = free_port()
    run = lambda *a: subprocess.run([RAY, "start", *a, *RAY_NODE], env=RAY_ENV, capture_output=True,  # noqa: E731
                                    text=True, timeout=120)
    head = run("--head", "--port", str(port), "--include-dashboard", "false", "--temp-dir", temp_dir,
               "--resources", '{"node_a": 1}')
    info = {"address": f"127.0.0.1:{port}", "temp_dir": temp_dir, "before": before, "stopped": False}
    try:
        assert head.returncode == 0, head.stdout + head.stderr
        second = run("--address", info["address"], "--resources", '{"node_b": 1}')
        assert second.returncode == 0, second.stdout + second.stderr
        yield info
    finally:
        if not info["stopped"]:
            subprocess.run([RAY, "stop", "--force"], env=RAY_ENV, capture_output=True, timeout=120)
        shutil.rmtree(temp_dir, ignore_errors=True)


class RayServe:
    """``epd-serve --launcher ray`` in a subprocess, as a user starts it."""

    def __init__(self, model: str, address: str, log_dir):
        self.log_path = log_dir / "epd-serve.log"
        self.log = open(self.log_path, "ab")
        # The shipped config pins encode to node_b and packs P and D onto one node; here the rest is
        # pinned too (router to node_b, P and D to node_a), so that two 2-CPU nodes always fit it.
        cfg = yaml.safe_load((ROOT / "configs" / "ray-1e1p1d.yaml").read_text())
        cfg["launcher"]["router"]["resources"] = {"node_b": 0.1}
        for w in cfg["workers"]:
            if w.get("group") == "pd":
                w["resources"] = {"node_a": 0.1}
        (log_dir / "ray-1e1p1d.yaml").write_text(yaml.safe_dump(cfg))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "router.serve", "--launcher", "ray", "--ray-address", address,
             "--config", str(log_dir / "ray-1e1p1d.yaml"), "--model", model, "--port", str(free_port())],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env=RAY_ENV)
        deadline = time.monotonic() + 300
        while not (m := re.search(rb"epd is serving \S+ at (http://\S+)", self.log_path.read_bytes())):
            assert self.proc.poll() is None, f"epd-serve exited:\n{self.tail()}"
            assert time.monotonic() < deadline, f"epd-serve not ready:\n{self.tail()}"
            time.sleep(1)
        self.url = m.group(1).decode()

    def tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def health(self) -> dict:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=3) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            return json.loads(e.read() or b"{}")
        except (OSError, ValueError):
            return {}

    def wait_restarted(self, name: str, before: str, timeout: float = 180) -> dict:
        """Until /health is ok with ``name`` alive under an incarnation other than ``before``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            w = (h := self.health()).get("workers", {}).get(name, {})
            if h.get("status") == "ok" and w.get("state") == "alive" and w.get("incarnation") != before:
                return h
            time.sleep(0.5)
        raise AssertionError(f"{name} did not come back within {timeout} s: {self.health()}\n{self.tail()}")

    def chat(self, body: dict) -> list[int]:
        req = urllib.request.Request(f"{self.url}/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())["choices"][0]["token_ids"]


@pytest.fixture(scope="module")
def serve(cluster, llava_dir, tmp_path_factory):
    s = RayServe(llava_dir, cluster["address"], tmp_path_factory.mktemp("logs-ray"))
    s.pids: set[int] = set()  # every process of the deployment seen, and their owner actors
    yield s
    if s.proc.poll() is None:
        s.proc.kill()
    s.log.close()


@pytest.fixture(scope="module")
def cases(test_images, llava_dir):
    texts = ["What is in this picture?", "Describe the colours", "Hello there", "Compare these"]
    out = []
    for i, text in enumerate(texts):
        imgs = [test_images[(i + j) % len(test_images)] for j in range(i % 3)]
        out.append((f"{text} #{i}", imgs, reference(llava_dir, f"{text} #{i}", imgs)))
    return out


def _check_answers(serve: RayServe, cases) -> None:
    for text, imgs, want in cases:
        assert serve.chat(chat_body("tiny-llava", text, imgs, return_token_ids=True)) == want, text


def _record(serve: RayServe) -> dict:
    workers = serve.health()["workers"]
    for w in workers.values():
        if pid_alive(w["pid"]):  # a given-up worker's process is gone
            serve.pids |= {w["pid"], _ppid(w["pid"])}
    return workers


@on_cluster
def test_placed_across_two_nodes(serve, cases):
    workers = _record(serve)
    assert set(workers) == {"encode-0", "prefill-0", "decode-0"}
    raylet = {}
    for name, w in workers.items():
        owner = _ppid(w["pid"])
        assert "ProcessOwner" in _cmdline(owner), _cmdline(owner)
        raylet[name] = _ppid(owner)  # the raylet that started the owner actor: its node
    resources = {name: re.search(r"--static_resource_list=(\S+)", _cmdline(pid)).group(1)
                 for name, pid in raylet.items()}
    assert "node_b," in resources["encode-0"], resources  # pinned by its custom resource
    assert raylet["prefill-0"] == raylet["decode-0"], resources  # one placement group, STRICT_PACK
    assert raylet["prefill-0"] != raylet["encode-0"], resources  # so the deployment spans both nodes
    _check_answers(serve, cases)


@on_cluster
def test_killed_worker_actor_restarts(serve, cases):
    """kill -9 of decode's owner actor, then of prefill's worker process itself: Ray restarts both."""
    for name, target in (("decode-0", "owner"), ("prefill-0", "worker")):
        w = _record(serve)[name]
        os.kill(_ppid(w["pid"]) if target == "owner" else w["pid"], signal.SIGKILL)
        now = serve.wait_restarted(name, w["incarnation"])["workers"][name]
        assert now["pid"] != w["pid"] and now["restarts"] == 1, now
        _wait_gone(w["pid"], 15)  # the old process (SIGTERM from its dead owner: a bounded drain)
        _record(serve)
        _check_answers(serve, cases)
    assert "decode-0 restarted by Ray" in serve.tail(100_000)


@on_cluster
def test_killed_router_comes_back_on_its_addresses(serve, cases):
    """kill -9 of the router's process: Ray restarts it in its bundle (same node, same ports) and the
    workers, which never restarted, register with it again."""
    port = serve.url.rsplit(":", 1)[1]
    router = [p for p in _pids() if "-m router.server" in (c := _cmdline(p)) and f"--port {port} " in c]
    assert len(router) == 1 and "ProcessOwner" in _cmdline(_ppid(router[0])), router
    before = {name: w["incarnation"] for name, w in _record(serve).items()}
    serve.pids.add(router[0])
    os.kill(router[0], signal.SIGKILL)
    deadline = time.monotonic() + 120
    while (h := serve.health()).get("status") != "ok":
        assert time.monotonic() < deadline, f"the router did not come back: {h}\n{serve.tail()}"
        time.sleep(0.5)
    assert {name: w["incarnation"] for name, w in h["workers"].items()} == before  # the same worker processes
    _check_answers(serve, cases)
    assert "router restarted by Ray" in serve.tail(100_000)


@on_cluster
def test_worker_past_its_restarts_is_given_up(serve, cluster, cases):
    """An actor Ray will not restart (killed for good here, as past max_restarts): epd-serve tells the
    router, which gives the worker up; prefill then encodes the images itself, answers still exact."""
    import ray

    _record(serve)
    ray.init(address=cluster["address"], namespace="epd", log_to_driver=False)
    try:
        ray.kill(ray.get_actor("encode-0"), no_restart=True)
    finally:
        ray.shutdown()
    deadline = time.monotonic() + 60
    while "given_up" not in (w := serve.health().get("workers", {}).get("encode-0", {})):
        assert time.monotonic() < deadline, f"encode-0 not given up: {w}\n{serve.tail()}"
        time.sleep(0.5)
    assert "max_restarts" in w["given_up"], w
    _check_answers(serve, cases)


@on_cluster
def test_stop_leaves_nothing(serve, cluster):
    _record(serve)
    serve.proc.send_signal(signal.SIGTERM)
    assert serve.proc.wait(90) == 0, serve.tail()
    time.sleep(1)
    left = [f"{p}: {_cmdline(p)[:120]}" for p in serve.pids if pid_alive(p)]
    assert not left, f"deployment processes left after epd-serve stopped: {left}"
    out = subprocess.run([RAY, "stop"], env=RAY_ENV, capture_output=True, text=True, timeout=120)
    cluster["stopped"] = out.returncode == 0
    assert out.returncode == 0, out.stdout + out.stderr
    deadline = time.monotonic() + 20
    while (left := _ray_processes(cluster["before"], cluster["temp_dir"])) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"Ray processes left after ray stop: {left}"


# ---- without a cluster: the launcher's reading of a config -----------------------------------------
def _gpu_config(**decode) -> dict:
    return {"launcher": {"kind": "ray"}, "engine": {"device": "cuda:0"},
            "workers": [{"role": "prefill", "num_cpus": 2, "num_gpus": 1, "device": "cuda:1"},
                        {"role": "decode", "num_cpus": 0.5, "num_gpus": 0.5, **decode}]}


def test_config_to_ray_requests():
    from router.launch_ray import RayDeployment, bundle

    assert bundle({"num_cpus": 0.5, "num_gpus": 1, "memory": 1 << 30, "resources": {"node_b": 0.1}}) == \
        {"CPU": 0.5, "GPU": 1.0, "memory": float(1 << 30), "node_b": 0.1}
    assert bundle({}) == {"CPU": 1.0}
    with pytest.raises(ValueError, match="needs some resource"):
        bundle({"num_cpus": 0})
    workers = RayDeployment(_gpu_config(), "/m")._worker_config()["workers"]
    # Ray gives each its GPUs as CUDA_VISIBLE_DEVICES: the first visible one; threads from num_cpus.
    assert [(w["device"], w["threads"]) for w in workers] == [("cuda:0", 2), ("cuda:0", 1)]
    with pytest.raises(ValueError, match="devices"):
        RayDeployment(_gpu_config(devices=["cuda:0"]), "/m")._worker_config()
    with pytest.raises(ValueError, match="needs num_gpus"):
        RayDeployment(_gpu_config(num_gpus=0), "/m")._worker_config()


def test_local_launcher_needs_no_ray(tmp_path):
    """epd-serve and the launcher module import Ray only when a Ray deployment starts."""
    code = ("import sys, router.serve, router.launch_ray; "
            "router.serve.parse_args(['--launcher', 'ray']); assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
    from router.serve import load_config

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"launcher": {"kind": "k8s"}, "workers": [{"role": "mixed"}]}))
    with pytest.raises(ValueError, match="launcher kind must be local or ray"):
        load_config(bad)
