"""``epd-serve --launcher ray``: the deployment of a config, placed on a Ray cluster.

    epd-serve --launcher ray [--ray-address HOST:6379] --config configs/ray-1e1p1d.yaml

Ray places, restarts and tears down; the router stays the only place that decides dispatch.
Every process of the deployment (the router, each worker) is a subprocess owned by one Ray
actor (``ProcessOwner``), so the same ``epd-router`` / ``epd-stage`` command lines run here as
under the local launcher, and Ray's resource accounting sees one actor per process:

- **Placement.** A worker entry's ``num_cpus``, ``num_gpus``, ``memory``, ``resources`` (custom
  resources, e.g. ``{node_b: 0.1}`` to pin a role to the nodes that declare ``node_b``) and
  ``labels`` (a node label selector) become the resource request of one placement-group bundle
  per worker; entries with the same ``group`` share one placement group (strategy from
  ``launcher.groups.NAME.strategy``, default ``STRICT_PACK``: one node), the others get a
  group each. The router's request is ``launcher.router``.
- **The router's address.** A probe task in the router's bundle reads the node's IP and picks
  free ports there (or takes ``launcher.ports``): the router's addresses, which its actor binds
  and every worker gets on its command line. The bundle pins the router to its node, so a
  restarted router comes back on the same addresses and the workers find it again.
- **Restarts.** An owner starts its process in ``__init__`` and exits (``os._exit``) when the
  process dies, so Ray restarts the actor (``launcher.max_restarts``, default 5) and with it a
  new process: a worker comes back as a new incarnation. A killed owner takes its process with
  it (parent-death signal). An actor past its restarts is dead: epd-serve tells the router it is
  given up, as the local launcher does.
- **Teardown.** SIGTERM to every process (the same bounded drain as locally), then the actors
  are killed and the placement groups removed. The actors belong to epd-serve's driver: if
  epd-serve dies, Ray kills them and their processes with them.

Every node runs the same install of epd (Ray ships no code here). A worker given GPUs sees only
those (Ray sets ``CUDA_VISIBLE_DEVICES``), so its device becomes ``cuda:0``. Ray is imported only
inside this module (``pip install -e '.[ray]'``).
"""

from __future__ import annotations

import copy
import logging
import os
import signal
import subprocess
import sys
import threading
import time

from router.serve import Deployment, _die_with

log = logging.getLogger("epd.serve.ray")
NODE_IP = "{node_ip}"  # in an owner's argv: replaced by the IP of the node it runs on
PYTHON = "{python}"  # the owner's own interpreter (a node's path, not the driver's)
PLACE_TIMEOUT_S = 120.0  # default of launcher.place_timeout_s
CHECK_EVERY_S = 2.0  # supervision: how often the owners are asked how they are


def _ray():
    try:
        import ray
    except ImportError as e:
        raise SystemExit("the ray launcher needs Ray: pip install -e '.[ray]'") from e
    return ray


def bundle(entry: dict, default_cpus: float = 1.0) -> dict[str, float]:
    """A config entry's Ray resource request as a placement-group bundle."""
    out = {"CPU": float(entry.get("num_cpus", default_cpus))}
    if entry.get("num_gpus"):
        out["GPU"] = float(entry["num_gpus"])
    if entry.get("memory"):
        out["memory"] = float(entry["memory"])
    for key, amount in (entry.get("resources") or {}).items():
        out[str(key)] = float(amount)
    if not any(out.values()):
        raise ValueError(f"a Ray bundle needs some resource, got {out} (give num_cpus > 0)")
    return out


class ProcessOwner:
    """A Ray actor that owns one process of the deployment.

    The process starts in ``__init__``, so a restart of the actor starts it again. When the
    process exits and no stop was asked for, the actor exits too: Ray sees a crash and restarts it
    while ``max_restarts`` lasts. The process gets SIGTERM when the actor dies, even by SIGKILL.
    """

    def __init__(self, name: str, argv: list[str], env: dict[str, str]):
        ray = _ray()
        self.name, self.stopping = name, False
        self.ip = ray.util.get_node_ip_address()
        self.node_id = ray.get_runtime_context().get_node_id()
        argv = [sys.executable if a == PYTHON else a.replace(NODE_IP, self.ip) for a in argv]
        env = {**os.environ, **env, "EPD_PARENT_PID": str(os.getpid())}
        # Output goes to the actor's own stdout/stderr: Ray's log files, forwarded to the driver.
        self.proc = subprocess.Popen(argv, env=env, start_new_session=True, preexec_fn=_die_with(os.getpid()))
        threading.Thread(target=self._watch, name=f"watch-{name}", daemon=True).start()

    def _watch(self) -> None:
        code = self.proc.wait()
        if not self.stopping:
            print(f"epd: {self.name} (pid {self.proc.pid}) exited with code {code}; its actor exits so that "
                  "Ray restarts both", file=sys.stderr, flush=True)
            os._exit(1)

    def info(self) -> dict:
        return {"name": self.name, "pid": self.proc.pid, "owner_pid": os.getpid(), "node_id": self.node_id,
                "ip": self.ip, "running": self.proc.poll() is None}

    def hold(self) -> None:
        """The process may exit from now on without the actor following it (a stop is coming)."""
        self.stopping = True

    def stop(self, grace: float) -> int | None:
        """SIGTERM the process's group, SIGKILL it after ``grace`` seconds; its exit code."""
        self.stopping = True
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                pass
        return self.proc.poll()


def _probe(ports: dict) -> tuple[str, dict]:
    """Runs in the router's bundle: the node's IP and the router's ports (free ones where 0)."""
    import socket

    ip = _ray().util.get_node_ip_address()
    out = {}
    for name, port in ports.items():
        if not port:
            with socket.socket() as s:
                s.bind((ip, 0))
                port = s.getsockname()[1]
        out[name] = int(port)
    return ip, out


class RayDeployment(Deployment):
    """The router and workers of ``config`` as processes owned by Ray actors.

    The same interface as the local ``Deployment`` (``start``, ``supervise``, ``stop``, ``health``,
    ``kill``), so ``epd-serve`` and the tests drive either alike.
    """

    def __init__(self, config: dict, model, host: str = "127.0.0.1", port: int | None = None,
                 address: str | None = None, **kw):
        super().__init__(config, model, host, port or 8000, **kw)
        self.launcher = dict(config.get("launcher") or {})
        self.address = address or self.launcher.get("address")
        self.namespace = self.launcher.get("namespace", "epd")
        self.max_restarts = int(self.launcher.get("max_restarts", 5))
        self.env = {str(k): str(v) for k, v in (self.launcher.get("env") or {}).items()}  # every process's
        self.owners: dict = {}  # name -> actor handle
        self.groups: dict = {}  # group name -> placement group
        self.where: dict[str, dict] = {}  # name -> the owner's last info()
        self._checked = 0.0
        self._ray = None
        self._owner_cls = None

    # ---- placement ---------------------------------------------------------------------------
    def _place(self) -> dict[str, tuple[str, int, dict]]:
        """name -> (group name, bundle index, bundle) for the router and every worker; groups made."""
        ray = self._ray
        from ray.util.placement_group import placement_group

        members: dict[str, list[tuple[str, dict, dict]]] = {}  # group -> [(name, bundle, labels)]
        rcfg = self.launcher.get("router") or {}
        members.setdefault(rcfg.get("group", "router"), []).append(("router", bundle(rcfg), rcfg.get("labels") or {}))
        for wid, w, _device in self.plan:
            members.setdefault(w.get("group") or wid, []).append((wid, bundle(w), w.get("labels") or {}))
        strategies = self.launcher.get("groups") or {}
        out = {}
        for group, items in members.items():
            strategy = (strategies.get(group) or {}).get("strategy", "STRICT_PACK")
            kw = {}
            if any(labels for _, _, labels in items):
                kw["bundle_label_selector"] = [{k: str(v) for k, v in labels.items()} for _, _, labels in items]
            self.groups[group] = placement_group([b for _, b, _ in items], strategy=strategy,
                                                 name=f"{self.namespace}-{group}", **kw)
            for i, (name, b, _) in enumerate(items):
                out[name] = (group, i, b)
        timeout = float(self.launcher.get("place_timeout_s", PLACE_TIMEOUT_S))
        for group, pg in self.groups.items():
            if not ray.wait([pg.ready()], timeout=timeout)[0]:
                wanted = [b for n, (g, _, b) in out.items() if g == group]
                raise TimeoutError(f"Ray could not place group {group!r} ({wanted}) within {timeout:.0f} s; "
                                   f"the cluster has {ray.available_resources()} available")
        return out

    def _strategy(self, placed: tuple[str, int, dict]):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        group, index, _ = placed
        return PlacementGroupSchedulingStrategy(placement_group=self.groups[group],
                                                placement_group_bundle_index=index)

    def _owner(self, name: str, placed, argv: list[str], env: dict) -> None:
        b = placed[2]
        custom = {k: v for k, v in b.items() if k not in ("CPU", "GPU", "memory")}
        if self._owner_cls is None:
            self._owner_cls = self._ray.remote(ProcessOwner)
        actor = self._owner_cls.options(
            name=name, namespace=self.namespace, max_restarts=self.max_restarts, max_concurrency=4,
            num_cpus=b["CPU"], num_gpus=b.get("GPU", 0), memory=b.get("memory"), resources=custom or None,
            scheduling_strategy=self._strategy(placed))
        self.owners[name] = actor.remote(name, argv, env)

    # ---- the deployment ----------------------------------------------------------------------
    def _worker_config(self) -> dict:
        """The config as the local launcher's argv builder should see it under Ray: each entry's
        threads from its CPUs (unless set), and a GPU worker on the first GPU Ray gives it."""
        cfg = copy.deepcopy(self.cfg)
        engine = cfg.get("engine") or {}
        for w in cfg["workers"]:
            w.setdefault("threads", engine.get("threads") or max(1, int(float(w.get("num_cpus", 1)))))
            device = str(w.get("device", engine.get("device", "cpu")))
            if w.pop("devices", None) is not None:
                raise ValueError(f"a {w['role']} entry lists 'devices': under Ray give num_gpus; Ray picks the GPU")
            if w.get("num_gpus"):
                w["device"] = device.split(":")[0] + ":0" if device != "cpu" else "cuda:0"
            elif device.startswith("cuda"):
                raise ValueError(f"a {w['role']} worker on {device} needs num_gpus under the ray launcher")
        return cfg

    def start(self, timeout: float = 300.0) -> str:
        ray = self._ray = _ray()
        if not ray.is_initialized():
            main = threading.current_thread() is threading.main_thread()
            handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
            ray.init(address=self.address, namespace=self.namespace, log_to_driver=True,
                     include_dashboard=False if self.address is None else None)
            for sig, handler in handlers.items():  # Ray's own SIGTERM handler would end the driver at once
                if handler is not None:
                    signal.signal(sig, handler)
        from router.serve import worker_plan

        self.plan = worker_plan(self.cfg)
        try:
            placed = self._place()
            ports = {"http": self.port, **{k: 0 for k in ("worker", "control", "sdk")},
                     **(self.launcher.get("ports") or {})}
            ip, ports = ray.get(ray.remote(_probe).options(num_cpus=0, scheduling_strategy=self._strategy(
                placed["router"])).remote(ports))
            self.host, self.port = ip, ports["http"]
            self.worker_addr = f"tcp://{ip}:{ports['worker']}"
            self.control_addr = f"tcp://{ip}:{ports['control']}"
            self.client_addr = f"tcp://{ip}:{ports['sdk']}"
            argv, env = self.router_command()
            argv[0] = PYTHON
            argv[argv.index("--host") + 1] = self.launcher.get("http_host", ip)
            # The driver's environment does not reach the actors: what the router reads of it goes along.
            env = {**self.env, **(env or {}), **{k: os.environ[k] for k in ("EPD_API_KEY",) if os.environ.get(k)}}
            self._owner("router", placed["router"], argv, env)
            wcfg, self.cfg = self.cfg, self._worker_config()
            try:
                workers = self._workers()
            finally:
                self.cfg = wcfg
            for wid, argv in workers:
                argv = [PYTHON, *argv[1:]]
                argv[argv.index("--host") + 1] = NODE_IP  # a worker's transfer server binds on its own node
                threads = argv[argv.index("--threads") + 1]
                self._owner(wid, placed[wid], argv, {**self.env, "OMP_NUM_THREADS": threads})
            return self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> str:
        deadline, detail = time.monotonic() + timeout, {}
        while time.monotonic() < deadline:
            ok, detail = self.health()
            if ok:
                self._refresh()
                for name, w in sorted(self.where.items()):
                    log.info("%s: pid %s on node %s (%s)", name, w["pid"], w["node_id"][:12], w["ip"])
                return self.url
            self.supervise()
            if self.given_up:
                raise RuntimeError(f"{sorted(self.given_up)} died past {self.max_restarts} restarts during start-up; "
                                   "their output is in the Ray logs of their nodes")
            time.sleep(0.5)
        missing = detail.get("missing") if isinstance(detail, dict) else None
        raise TimeoutError(f"the deployment was not ready after {timeout:.0f} s; workers not registered: "
                           f"{missing or 'unknown (router not answering)'}")

    # ---- supervision: Ray restarts; this only notices deaths past max_restarts ---------------------
    def _refresh(self) -> None:
        ray = self._ray
        refs = {name: o.info.remote() for name, o in self.owners.items() if name not in self.given_up}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=1.0)
        ready = set(ready)
        for name, ref in refs.items():
            if ref not in ready:
                continue  # restarting, or busy: asked again next time
            try:
                info = ray.get(ref)
            except ray.exceptions.ActorDiedError as e:
                self.given_up.add(name)
                why = (f"its Ray actor is dead and will not be restarted (max_restarts={self.max_restarts}): "
                       f"{str(e).splitlines()[0]}")
                log.error("%s: %s; the rest keep serving", name, why)
                self._tell_router(name, self.max_restarts, why)
                continue
            except ray.exceptions.RayActorError:
                continue  # temporarily unavailable (a restart under way)
            old = self.where.get(name)
            if old is not None and old["owner_pid"] != info["owner_pid"]:
                log.warning("%s restarted by Ray: pid %d on node %s", name, info["pid"], info["node_id"][:12])
            self.where[name] = info

    def supervise(self) -> None:
        if self._stopping or not self.owners or time.monotonic() - self._checked < CHECK_EVERY_S:
            return
        self._checked = time.monotonic()
        self._refresh()

    def kill(self, name: str) -> None:
        """SIGKILL the owner actor's process (fault tests): Ray restarts it and its process."""
        os.kill(self.where[name]["owner_pid"], signal.SIGKILL)

    def restart(self, name: str) -> None:
        self._ray.kill(self.owners[name], no_restart=False)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every process (bounded drain), then kill the actors and remove the groups."""
        self._stopping = True
        ray = self._ray
        if ray is None or not ray.is_initialized():
            return
        owners = list(self.owners.values())
        ray.wait([o.hold.remote() for o in owners], num_returns=len(owners), timeout=5)  # no restart from now
        ray.wait([o.stop.remote(grace) for o in owners], num_returns=len(owners), timeout=grace + 10)
        self.kill_now()
        from ray.util.placement_group import remove_placement_group

        for pg in self.groups.values():
            try:
                remove_placement_group(pg)
            except Exception:  # noqa: BLE001 - gone with the cluster already
                pass
        self.owners, self.groups = {}, {}
        ray.shutdown()

    def kill_now(self) -> None:
        self._stopping = True
        for o in self.owners.values():
            try:
                self._ray.kill(o, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead
                pass
