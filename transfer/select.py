"""Which transport a pull takes: per peer, decided by the peer's card.

A worker runs one server per transport it offers and advertises them all in
one *card*, ``{"host_id": ..., "ucx": <addr>, "shm": <addr>, "zmq": <addr>}``
(its ``MultiTransfer.address`` is that card as JSON, its ``.card`` the dict).
A puller takes, among the transports both ends run (shm only when the peer has
the same host id), the one measured fastest for the pull (``MultiTransfer.choose``):

- into device memory: ucx (cuda_ipc on one host, GPUDirect across hosts where
  UCX finds it); shm and zmq stage the bytes through host memory;
- host memory, same host: shm, or ucx once pulls of that kind of key (its
  prefix: ``kv``, ``emb``, ``prefix``) came to ``UCX_FROM_BYTES`` or more;
- host memory, another host: ucx where UCX has an RDMA transport, else zmq
  (over TCP UCX was no faster: ``perf/bench_transfer.py --netns``, two network
  namespaces on a veth bridge, ms per pull ucx / zmq: 16 KiB 1.02 / 0.73,
  64 KiB 1.27 / 0.78, 256 KiB 1.33 / 0.92, 1 MiB 2.34 / 1.99, 4 MiB 24.2 /
  22.2, 16 MiB 48.5 / 48.3).

Measured with ``perf/bench_transfer.py`` between two processes of this 2-core
host, host memory, after the UCX progress fix; ms per pull, ucx / shm / zmq,
medians of 16 with the order rotating, two runs: 16 KiB 3.21 / 1.23 / 0.97 and
0.69 / 0.51 / 0.47; 64 KiB 1.25 / 1.11 / 0.84 and 0.70 / 0.60 / 0.57; 256 KiB
1.24 / 1.27 / 1.02 and 0.94 / 0.85 / 0.83; 4 MiB 5.3 / 5.5 / 5.7 and 2.25 /
2.62 / 3.33; 16 MiB 4.5 / 7.8 / 11.2 and 4.6 / 6.9 / 10.6 (earlier runs alike,
and 64 MiB 17-20 / 21-25 / 74-83). Up to a few hundred KiB, where a tiny or
small model's KV handoffs and image embeddings are, shm's payload rides in its
zmq reply (``shm_backend._IN_REPLY_BYTES``) and is as fast as zmq, and both
beat UCX; from ~1 MiB UCX's single copy (cma) beats shm's two and a socket's.
The size of a pull is known only once it is answered, hence the last size per
kind of key (the two are even around ``UCX_FROM_BYTES``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import socket

import torch

from transfer.base import TransferBackend, TransferError
from transfer.shm_backend import SHM_DIR, ShmBackend, shm_available
from transfer.ucx_backend import UcxBackend, ucx_available, ucx_rdma
from transfer.zmq_backend import ZmqBackend

KINDS = ("auto", "ucx", "shm", "zmq")
# Same-host pulls of host memory from this many bytes on go over UCX when both ends run it.
UCX_FROM_BYTES = 512 << 10


@functools.cache
def host_id() -> str:
    """Equal for two processes exactly when shm can join them.

    That takes one kernel boot (``boot_id``), one /dev/shm mount (its device
    number: containers usually get their own) and one network namespace (the
    shm control channel is on 127.0.0.1). The hostname prefix is for people.
    """

    def read(path: str) -> str:
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            return "-"

    def stat(path: str, field: str) -> str:
        try:
            return str(getattr(os.stat(path), field))
        except OSError:
            return "-"

    parts = [
        read("/proc/sys/kernel/random/boot_id"),
        stat(SHM_DIR, "st_dev"),
        stat("/proc/self/ns/net", "st_ino"),
    ]
    digest = hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
    return f"{socket.gethostname()}:{digest}"


class MultiTransfer(TransferBackend):
    """One store served by several transports; each pull picks one per peer.

    ``pull`` takes the peer's card (the dict, or ``address`` JSON as received).
    ``pulls_by_backend`` counts successful pulls per transport name.
    """

    name = "auto"

    def __init__(self, backends: list[TransferBackend], store: dict):
        # No super().__init__(): the counters are sums over the backends.
        if not backends:
            raise ValueError("MultiTransfer needs at least one backend")
        self._store = store
        self._backends = {b.name: b for b in backends}
        self.host_id = host_id()
        self.pulls_by_backend: dict[str, int] = {b.name: 0 for b in backends}
        self.last_bytes: dict[str, int] = {}  # kind of key -> bytes of its last pull
        self.ucx_rdma = "ucx" in self._backends and ucx_rdma()

    async def start(self) -> None:
        for b in self._backends.values():
            await b.start()

    @property
    def card(self) -> dict[str, str]:
        return {"host_id": self.host_id, **{n: b.address for n, b in self._backends.items()}}

    @property
    def address(self) -> str:
        return json.dumps(self.card, sort_keys=True, separators=(",", ":"))

    def choose(self, peer: dict | str, key: str = "", device: str = "cpu") -> tuple[TransferBackend, str]:
        """The backend to pull ``key`` from ``peer`` into ``device`` with, and the peer's address for it.

        The order is the module docstring's (measured there).
        """
        card = _card(peer)
        ours = {n: b for n, b in self._backends.items() if n in card}  # run by both ends
        same_host = card.get("host_id") == self.host_id
        host_memory = torch.device(device).type == "cpu"
        if "shm" in ours and same_host and ("ucx" not in ours or (
                host_memory and self.last_bytes.get(_kind(key), 0) < UCX_FROM_BYTES)):
            return ours["shm"], card["shm"]
        if "ucx" in ours and (same_host or not host_memory or self.ucx_rdma or "zmq" not in ours):
            return ours["ucx"], card["ucx"]
        if "zmq" in ours:
            return ours["zmq"], card["zmq"]
        raise TransferError(
            f"no transport in common with peer {card} (this worker, host {self.host_id}, "
            f"runs {sorted(self._backends)})"
        )

    async def pull(self, peer_address: dict | str, key: str, *, timeout: float,
                   device: str = "cpu") -> list[torch.Tensor]:
        backend, addr = self.choose(peer_address, key, device)
        tensors = await backend.pull(addr, key, timeout=timeout, device=device)
        self.pulls_by_backend[backend.name] += 1
        self.last_bytes[_kind(key)] = sum(t.numel() * t.element_size() for t in tensors)
        return tensors

    async def forget_peer(self, peer: dict | str) -> None:
        """Drop every connection to a peer the bus reported gone (pulls waiting on it fail)."""
        card = _card(peer)
        for name, b in self._backends.items():
            forget = getattr(b, "forget_peer", None)
            if forget is not None and name in card:
                await forget(card[name])

    async def close(self) -> None:
        for b in self._backends.values():
            await b.close()

    def backend(self, name: str) -> TransferBackend | None:
        return self._backends.get(name)

    def _total(self, counter: str) -> int:
        return sum(getattr(b, counter) for b in self._backends.values())

    bytes_sent = property(lambda self: self._total("bytes_sent"))
    bytes_received = property(lambda self: self._total("bytes_received"))
    pulls_served = property(lambda self: self._total("pulls_served"))
    pulls_done = property(lambda self: self._total("pulls_done"))

    def stats(self) -> dict:
        out = super().stats()
        out["pulls_by_backend"] = dict(self.pulls_by_backend)
        out["backends"] = {n: b.stats() for n, b in self._backends.items()}
        return out


def _kind(key: str) -> str:
    """``kv/<rid>`` -> ``kv``: keys of one kind have sizes of one magnitude."""
    return key.partition("/")[0]


def _card(peer: dict | str) -> dict:
    if isinstance(peer, str):
        try:
            peer = json.loads(peer)
        except ValueError:
            raise TransferError(f"peer address is not a transfer card: {peer!r}") from None
    if not isinstance(peer, dict):
        raise TransferError(f"peer address is not a transfer card: {peer!r}")
    return peer


def make_backend(kind: str, host: str) -> MultiTransfer:
    """The transfer layer of one worker: ``kind`` picks the transports it runs.

    ``auto``: ucx (when ucxx imports and UCX starts), shm (when this host has a
    usable /dev/shm) and zmq on ``host``; ``ucx``: ucx only (raises
    ``UcxUnavailable``, naming the pip package, when it cannot run);
    ``shm``: shm only (same-host peers only); ``zmq``: zmq only. Every kind
    returns a ``MultiTransfer``, so workers always exchange cards and a
    ``zmq`` worker and an ``auto`` worker still understand each other.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown transfer backend {kind!r}; choose one of {', '.join(KINDS)}")
    store: dict = {}
    backends: list[TransferBackend] = []
    if kind == "ucx" or (kind == "auto" and ucx_available()):
        backends.append(UcxBackend(store=store))
    if kind == "shm" or (kind == "auto" and shm_available()):
        backends.append(ShmBackend(store=store))
    if kind in ("auto", "zmq"):
        backends.append(ZmqBackend(host, store=store))
    return MultiTransfer(backends, store)
