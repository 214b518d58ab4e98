"""Separate "hosts" on one machine for tests: network namespaces on one bridge.

``Lan`` puts each named host in its own network namespace with a veth pair
into a Linux bridge in the root namespace; every host gets its own address on
one /24 and the root namespace gets ``.1`` on the bridge, so the test process
reaches every host as a client. ``NetnsDeployment`` is ``router.serve``'s
``Deployment`` with the router and each worker launched in a namespace of
their own (``ip netns exec``), every socket bound on that host's address
and UCX kept off its shared-memory transports.
Needs root and iproute2; ``unavailable()`` says why not, for a skip.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

from router.serve import Deployment


class NetnsError(RuntimeError):
    pass


def ip(*args: str, check: bool = True) -> str:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and r.returncode:
        raise NetnsError(f"`ip {' '.join(args)}` failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


def unavailable() -> str | None:
    """Why this machine cannot give a test namespaces and a bridge, or None if it can."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add, veth pairs, a bridge); running as uid " \
               f"{os.geteuid()}"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"epd-probe-{os.getpid()}"
    try:
        ip("netns", "add", probe)
    except NetnsError as e:
        return f"cannot create a network namespace (a container without CAP_SYS_ADMIN?): {e}"
    finally:
        ip("netns", "del", probe, check=False)
    try:
        ip("link", "add", probe[:15], "type", "bridge")
    except NetnsError as e:
        return f"cannot create a bridge in the root namespace: {e}"
    finally:
        ip("link", "del", probe[:15], check=False)
    return None


def free_subnet(start: int) -> str:
    """A ``10.231.N`` prefix whose /24 no route of the root namespace covers yet."""
    used = set(re.findall(r"^10\.231\.(\d+)\.", ip("-4", "route", "show", "table", "all"), re.M))
    for k in range(254):
        n = (start + k) % 254 + 1
        if str(n) not in used:
            return f"10.231.{n}"
    raise NetnsError("no free /24 under 10.231.0.0/16")


class Lan:
    """Hosts in their own network namespaces, joined by a bridge; ``up()`` / ``down()``.

    Names carry ``tag`` (the test uses its pid), and ``up()`` first removes any
    namespace or link of the same name a killed earlier run left behind.
    """

    def __init__(self, tag: str, hosts: list[str]):
        self.prefix = free_subnet(int(tag) if tag.isdigit() else 0)
        self.bridge = f"epdbr{tag}"[:15]
        self.ns = {h: f"epd-{tag}-{h}" for h in hosts}
        self.veth = {h: f"epv{tag}n{i}"[:15] for i, h in enumerate(hosts)}
        self.addr = {h: f"{self.prefix}.{i + 2}" for i, h in enumerate(hosts)}
        self.gateway = f"{self.prefix}.1"

    def up(self) -> "Lan":
        self.down()
        try:
            ip("link", "add", self.bridge, "type", "bridge")
            ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            ip("link", "set", self.bridge, "up")
            for h, ns in self.ns.items():
                ip("netns", "add", ns)
                ip("link", "add", self.veth[h], "type", "veth", "peer", "name", "eth0", "netns", ns)
                ip("link", "set", self.veth[h], "master", self.bridge, "up")
                ip("-n", ns, "addr", "add", f"{self.addr[h]}/24", "dev", "eth0")
                ip("-n", ns, "link", "set", "eth0", "up")
                ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        """Remove every namespace and link of this LAN; quiet about what is already gone."""
        for h, ns in self.ns.items():
            ip("netns", "del", ns, check=False)
            # The root end of a pair goes with its namespace, but only once the kernel gets round to it.
            ip("link", "del", self.veth[h], check=False)
        ip("link", "del", self.bridge, check=False)

    def leftovers(self) -> list[str]:
        """Namespaces and links of this LAN that still exist."""
        names = set(ip("netns", "list").split()) | set(re.findall(r"^\d+: ([^:@]+)", ip("-o", "link"), re.M))
        return sorted(n for n in [*self.ns.values(), *self.veth.values(), self.bridge] if n in names)

    def exec_argv(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[host]]


class NetnsDeployment(Deployment):
    """A ``Deployment`` whose router runs on ``lan`` host "router" and each worker on the host of its id.

    Ports are picked free on the root namespace's loopback; every port of a
    fresh namespace is free, so they serve there too.
    """

    def __init__(self, config: dict, model: str, lan: Lan, **kw):
        super().__init__(config, model, "127.0.0.1", **kw)
        self.lan = lan
        self.host = lan.addr["router"]
        for attr in ("worker_addr", "control_addr", "client_addr"):
            setattr(self, attr, getattr(self, attr).replace("127.0.0.1", self.host))

    def _spawn(self, name: str, argv: list[str], env: dict | None = None) -> None:
        if argv[0] != "ip":  # restart() hands back the command line already wrapped
            argv = list(argv)
            if name != "router":  # a worker's transfer server binds on its own host's address
                argv[argv.index("--host") + 1] = self.lan.addr[name]
            argv = self.lan.exec_argv(name) + argv
        # The namespaces share one kernel, so UCX would call them one node and take its shared-memory
        # transports (sysv, posix, cma) - a shortcut machines apart never have, and one that does not
        # even work here: pulls between namespaces time out. Separate hosts reach each other by network.
        super()._spawn(name, argv, {**(env or {}), "UCX_TLS": "^sm"})
