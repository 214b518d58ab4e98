"""Same-host backend: the bytes of a pull cross through a segment in /dev/shm.

A pull asks over a small zmq channel (TCP on loopback); the holder writes the
tensors into a segment (64-byte aligned, one after another) and replies with
its name and layout; the puller copies the tensors out of it and sends a
one-way ``release``, after which the holder may rewrite the segment for a
later pull (see ``shm_pool``: new tmpfs pages cost more than the copies).
Payloads of at most 512 KiB skip the segment and ride in the reply's frames.

Segments never outlive their use:
- the holder unlinks a segment on any error while writing, ``lease_s`` after
  lending it without a release (the puller died or gave up), when the free
  pool is over ``max_pool_bytes``, and at ``close``;
- a reply that comes after its puller gave up is released at once.
A holder killed outright leaves its segments behind; the next backend to
start on the host unlinks them (``shm_pool.sweep_dead``).

Plain files rather than ``multiprocessing.shared_memory``: that class
registers every segment with the creating process's resource_tracker, which
then warns about (and tries to unlink) segments another process unlinked;
``track=False`` only exists from Python 3.13. Nothing here touches the
resource_tracker. Segment pages are reserved with ``posix_fallocate`` before
the holder's mapped writes, so a full /dev/shm is an ENOSPC error (the pull
fails with a ``TransferError``) instead of a SIGBUS.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import torch
import zmq
import zmq.asyncio

from transfer.base import KeyNotFound, TransferBackend, TransferError
from transfer.channel import ChannelPool, PeerChannel, PullServer
from transfer.shm_io import check_layout, layout, read_segment, write_segment
from transfer.shm_pool import NAME_RE, SegmentPool, sweep_dead
from transfer.wire import byte_view, describe, from_buffer, host_contiguous, nbytes

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"


def shm_available(shm_dir: str = SHM_DIR) -> bool:
    return os.path.isdir(shm_dir) and os.access(shm_dir, os.W_OK)


# Copies below these run on the event loop (a few ms at most); bigger ones go
# to the copier threads. Measured on the 2-core VM, a thread hop per pull cost
# more than it saved below ~16 MiB (4 MiB pull: 2.1 ms inline, 4-5 ms with hops).
_INLINE_WRITE_BYTES = 16 << 20
_INLINE_READ_BYTES = 32 << 20
# Payloads up to this skip the segment and ride in the reply. Measured here (perf/bench_transfer.py,
# one holder, medians of 15-16 pulls, several runs): at 256 KiB a pull through a segment took 1.0-1.3 ms
# (1.5-6.5 before its buffers were pooled) against 0.85-1.3 in the reply; at 1 MiB 1.1-1.5 against 1.7-1.9.
_IN_REPLY_BYTES = 512 << 10


class ShmBackend(TransferBackend):
    """Serves pulls of same-host peers on ``tcp://{control_host}:<free port>``."""

    name = "shm"

    def __init__(self, control_host: str = "127.0.0.1", *, shm_dir: str = SHM_DIR,
                 lease_s: float = 60.0, max_pool_bytes: int = 512 << 20, store: dict | None = None):
        super().__init__(store)
        if not shm_available(shm_dir):
            raise TransferError(f"no shared memory here ({shm_dir} is not a writable directory)")
        self._control_host = control_host
        self._dir = shm_dir
        self._lease_s = lease_s
        self._pool = SegmentPool(shm_dir, lease_s, max_pool_bytes)
        self._ctx: zmq.asyncio.Context | None = None
        self._server: PullServer | None = None
        self._channels: ChannelPool | None = None
        self._sweeper: asyncio.Task | None = None
        # Big copies run here (they release the GIL; the loop keeps serving), on
        # threads of our own so that a slow copy never starves asyncio's pool.
        self._copier = ThreadPoolExecutor(2, thread_name_prefix="epd-shm")

    async def _off_loop(self, inline_below: int, nbytes_: int, fn, *args):
        if nbytes_ < inline_below:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._copier, fn, *args)

    async def start(self) -> None:
        swept = sweep_dead(self._dir)
        if swept:
            log.info("unlinked %d segments of dead processes in %s", swept, self._dir)
        self._ctx = zmq.asyncio.Context()
        self._server = PullServer(self._ctx, f"tcp://{self._control_host}:*", self._answer,
                                  on_undelivered=self._undelivered, on_notice=self._notice)
        self._channels = ChannelPool(self._ctx, on_orphan=self._orphan)
        self._sweeper = asyncio.create_task(self._sweep())

    @property
    def address(self) -> str:
        if self._server is None:
            raise RuntimeError("start() the backend before asking its address")
        return self._server.endpoint

    @property
    def pool(self) -> SegmentPool:
        return self._pool

    # -- holder side --------------------------------------------------------

    async def _answer(self, key: str) -> tuple[dict, list]:
        tensors = self._store.get(key)
        if tensors is None:
            raise KeyNotFound("not held here (never put, or dropped)")
        offsets, size = layout(tensors)
        desc = [[d, off] for d, off in zip(describe(tensors), offsets)]
        fields, frames = {"seg": None, "size": size, "tensors": desc}, []
        if 0 < size <= _IN_REPLY_BYTES:
            # Tiny payloads ride in the reply itself: a segment round trip costs more.
            host = [host_contiguous(t) for t in tensors]
            fields["in_reply"] = True
            frames = [byte_view(t).numpy() for t in host]
        elif size:
            fields["seg"] = await self._fill(tensors, offsets, size)
        self.bytes_sent += sum(nbytes(t) for t in tensors)
        self.pulls_served += 1
        return fields, frames

    async def _fill(self, tensors: list[torch.Tensor], offsets: list[int], size: int) -> str:
        """Write the tensors into a pooled segment and lend it; returns its name."""
        for attempt in (0, 1):
            seg = self._pool.acquire(size)
            try:
                # The writer gets its own fd: close() may close the pool's while it runs.
                fd = os.dup(seg.fd)
                await self._off_loop(_INLINE_WRITE_BYTES, size, write_segment, seg, fd, tensors, offsets, size)
            except OSError as e:
                self._pool.discard(seg)
                if e.errno != errno.ENOSPC:
                    raise
                if attempt or not self._pool.trim():  # retry once after freeing the pool
                    raise TransferError(f"{self._dir} is full: {size} bytes do not fit") from None
                continue
            except BaseException:
                self._pool.discard(seg)
                raise
            self._pool.lend(seg)
            return seg.name
        raise AssertionError("unreachable")

    def _notice(self, msg: dict) -> None:
        if msg.get("op") == "release" and isinstance(msg.get("seg"), str):
            self._pool.release(msg["seg"])

    def _undelivered(self, header: dict) -> None:
        if header.get("seg"):
            self._pool.release(header["seg"])  # nobody will read it

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(self._lease_s / 4, 5.0))
            self._pool.expire()

    # -- puller side --------------------------------------------------------

    @staticmethod
    def _orphan(channel: PeerChannel, header: dict, frames: list) -> None:
        """A reply whose pull gave up: release its segment now rather than at lease end."""
        if isinstance(header.get("seg"), str):
            channel.notify("release", {"seg": header["seg"]})

    async def pull(self, peer_address: str, key: str, *, timeout: float,
                   device: str = "cpu") -> list[torch.Tensor]:
        if self._channels is None:
            raise RuntimeError("start() the backend before pulling")
        header, frames = await self._channels.request(peer_address, key, timeout)
        seg = header.get("seg")
        try:
            try:
                size = header["size"]
                items = check_layout(header["tensors"], size)
                if header.get("in_reply"):
                    if len(frames) != len(items):
                        raise ValueError("frames do not match the layout")
                    tensors = [from_buffer(f.buffer, dt, s).to(device)
                               for f, (dt, s, _, _) in zip(frames, items)]
                elif seg is None:  # nothing but empty tensors
                    tensors = [torch.empty(s, dtype=dt, device=device) for dt, s, _, _ in items]
                elif not (isinstance(seg, str) and NAME_RE.match(seg)):  # never open another file
                    raise ValueError(f"bad segment name {seg!r}")
                else:
                    path = os.path.join(self._dir, seg)
                    tensors = await self._off_loop(_INLINE_READ_BYTES, size, read_segment, path, size, items, device)
            except (ValueError, TypeError, KeyError) as e:
                raise TransferError(f"{peer_address} for key {key!r}: bad reply ({e})") from None
        finally:
            if isinstance(seg, str):
                self._channels.notify(peer_address, "release", {"seg": seg})
        self.bytes_received += sum(nbytes(t) for t in tensors)
        self.pulls_done += 1
        return tensors

    async def forget_peer(self, peer_address: str) -> None:
        """Close the connection to a peer the bus reported gone."""
        if self._channels is not None:
            await self._channels.forget(peer_address)

    async def close(self) -> None:
        if self._server is None:
            return
        self._sweeper.cancel()
        await asyncio.gather(self._sweeper, return_exceptions=True)
        await self._server.close()
        await self._channels.close()
        self._pool.close()
        self._copier.shutdown(wait=False)
        self._ctx.destroy(linger=0)
        self._server = self._channels = self._ctx = self._sweeper = None
