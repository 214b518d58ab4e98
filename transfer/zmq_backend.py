"""Any-host backend: tensor bytes ride zmq frames over TCP.

Reply to a pull: the header ``{"tensors": [[dtype, shape], ...]}`` and then one
frame per tensor, sent zero-copy from the published (host, contiguous) tensor;
the puller wraps each received frame as a tensor without copying it again.
CUDA tensors are copied to host per pull (off the event loop) and the received
ones copied to ``device``.
"""

from __future__ import annotations

import asyncio
import socket

import torch
import zmq
import zmq.asyncio

from transfer.base import KeyNotFound, TransferBackend, TransferError
from transfer.channel import ChannelPool, PullServer
from transfer.wire import (
    byte_view, describe, dtype_from_name, from_buffer, host_contiguous, nbytes, needs_host_copy,
)

_WILDCARDS = ("", "*", "0.0.0.0")


class ZmqBackend(TransferBackend):
    """Serves on ``tcp://{host}:{port}`` (port 0: any free port).

    ``advertise_host`` is the name peers dial; it defaults to ``host``, or to
    this machine's hostname when ``host`` is a wildcard.
    """

    name = "zmq"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *,
                 advertise_host: str | None = None, store: dict | None = None):
        super().__init__(store)
        self._host = host
        self._port = port
        self._advertise = advertise_host or (socket.gethostname() if host in _WILDCARDS else host)
        self._ctx: zmq.asyncio.Context | None = None
        self._server: PullServer | None = None
        self._channels: ChannelPool | None = None

    async def start(self) -> None:
        self._ctx = zmq.asyncio.Context()
        bind_host = "*" if self._host in _WILDCARDS else self._host
        self._server = PullServer(self._ctx, f"tcp://{bind_host}:{self._port or '*'}", self._answer)
        self._channels = ChannelPool(self._ctx, on_orphan=lambda channel, header, frames: None)

    @property
    def address(self) -> str:
        if self._server is None:
            raise RuntimeError("start() the backend before asking its address")
        port = self._server.endpoint.rsplit(":", 1)[1]
        return f"tcp://{self._advertise}:{port}"

    async def _answer(self, key: str) -> tuple[dict, list]:
        tensors = self._store.get(key)
        if tensors is None:
            raise KeyNotFound("not held here (never put, or dropped)")
        if any(needs_host_copy(t) for t in tensors):
            tensors = await asyncio.to_thread(lambda: [host_contiguous(t) for t in tensors])
        # numpy arrays export the buffer protocol; the frame keeps them alive until sent.
        frames = [byte_view(t).numpy() for t in tensors]
        self.bytes_sent += sum(nbytes(t) for t in tensors)
        self.pulls_served += 1
        return {"tensors": describe(tensors)}, frames

    async def pull(self, peer_address: str, key: str, *, timeout: float,
                   device: str = "cpu") -> list[torch.Tensor]:
        if self._channels is None:
            raise RuntimeError("start() the backend before pulling")
        header, frames = await self._channels.request(peer_address, key, timeout)
        layout = header.get("tensors")
        if not isinstance(layout, list) or len(layout) != len(frames):
            raise TransferError(f"{peer_address} for key {key!r}: reply does not match its header")
        try:
            tensors = [from_buffer(f.buffer, dtype_from_name(d), s) for f, (d, s) in zip(frames, layout)]
        except (ValueError, TypeError) as e:
            raise TransferError(f"{peer_address} for key {key!r}: bad reply ({e})") from None
        if torch.device(device).type != "cpu":
            tensors = [t.to(device) for t in tensors]
        self.bytes_received += sum(nbytes(t) for t in tensors)
        self.pulls_done += 1
        return tensors

    async def forget_peer(self, peer_address: str) -> None:
        """Close the connection to a peer the bus reported gone."""
        if self._channels is not None:
            await self._channels.forget(peer_address)

    async def close(self) -> None:
        if self._server is not None:
            await self._server.close()
            await self._channels.close()
            self._ctx.destroy(linger=0)
            self._server = self._channels = self._ctx = None
