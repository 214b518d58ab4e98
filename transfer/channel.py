"""The zmq request/reply channel under every pull: one ROUTER per server, one DEALER per peer.

The server answers each request in its own task, so a slow answer (a big copy)
does not hold up the others. The client keeps one DEALER per peer endpoint for
the worker's lifetime and matches replies to waiting pulls by request id, so
any number of pulls to one peer can be in flight at once. A reply that arrives
after its pull gave up is handed to ``on_orphan`` (the shm backend releases
the segment it names).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable

import zmq
import zmq.asyncio

from transfer.base import KeyNotFound, TransferError, TransferTimeout
from transfer.wire import pack_notice, pack_reply, pack_request, unpack_reply, unpack_request

log = logging.getLogger(__name__)

# key -> (extra reply fields, payload frames); raises KeyNotFound for a missing key.
Handler = Callable[[str], Awaitable[tuple[dict, list]]]
# (channel it came on, reply header, payload frames) of an answer nobody will read.
Orphan = Callable[["PeerChannel", dict, list], None]
# A one-way notice (its whole map, "op" included).
Notice = Callable[[dict], None]

_MAX_REQUEST_BYTES = 1 << 16  # a request is a key; anything bigger is not ours


class PullServer:
    """A ROUTER bound to ``endpoint`` that answers pull requests with ``handler``."""

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str, handler: Handler,
                 on_undelivered: Callable[[dict], None] | None = None, on_notice: Notice | None = None):
        self._sock = ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        # Unroutable replies (the puller disconnected) raise instead of vanishing,
        # so the shm backend can take the segment back at once.
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._sock.setsockopt(zmq.MAXMSGSIZE, _MAX_REQUEST_BYTES)
        self._sock.bind(endpoint)
        self.endpoint: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._handler = handler
        self._on_undelivered = on_undelivered
        self._on_notice = on_notice
        self._tasks: set[asyncio.Task] = set()
        self._loop_task = asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self) -> None:
        while True:
            frames = await self._sock.recv_multipart()
            if len(frames) != 2:
                log.warning("dropping a malformed request (%d frames)", len(frames))
                continue
            try:
                req = unpack_request(frames[1])
            except Exception as e:  # noqa: BLE001 - a stranger's bytes must not kill the server
                log.warning("dropping a malformed request: %s", e)
                continue
            if req["op"] != "pull":
                if self._on_notice is not None:
                    self._on_notice(req)
                continue
            task = asyncio.create_task(self._answer(frames[0], req))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _answer(self, ident: bytes, req: dict) -> None:
        payload: list = []
        try:
            fields, payload = await self._handler(req["key"])
            header = {"id": req["id"], "ok": True, **fields}
        except KeyNotFound as e:
            header = {"id": req["id"], "ok": False, "err": "not_found", "msg": str(e)}
        except Exception as e:  # noqa: BLE001 - the puller gets the reason instead of a timeout
            log.exception("pull of %r failed", req["key"])
            header = {"id": req["id"], "ok": False, "err": "error", "msg": f"{type(e).__name__}: {e}"}
        try:
            await self._sock.send_multipart([ident, pack_reply(header), *payload], copy=False)
        except BaseException as e:
            if header["ok"] and self._on_undelivered is not None:
                self._on_undelivered(header)
            if not isinstance(e, zmq.ZMQError):
                raise
            log.debug("reply %d not delivered: %s", req["id"], e)  # EHOSTUNREACH: the puller is gone

    async def close(self) -> None:
        for t in (self._loop_task, *self._tasks):
            t.cancel()
        await asyncio.gather(self._loop_task, *self._tasks, return_exceptions=True)
        self._sock.close(linger=0)


class PeerChannel:
    """One DEALER to one peer's server; concurrent requests are matched by id."""

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str, on_orphan: Orphan):
        self.endpoint = endpoint
        self._sock = ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(endpoint)
        self._on_orphan = on_orphan
        self._pending: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @property
    def idle(self) -> bool:
        return not self._pending

    async def request(self, key: str, timeout: float) -> tuple[dict, list]:
        """Ask for ``key``; returns (reply header, payload frames) or raises a TransferError."""
        req_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[req_id] = fut
        try:
            async with asyncio.timeout(timeout):
                await self._sock.send_multipart([pack_request(req_id, key)])
                header, frames = await fut
        except TimeoutError:
            self._drop_unread(fut)
            raise TransferTimeout(
                f"no answer from {self.endpoint} for key {key!r} within {timeout:g}s"
            ) from None
        except zmq.ZMQError as e:
            raise TransferError(f"channel to {self.endpoint} failed: {e}") from None
        except BaseException:
            self._drop_unread(fut)  # cancelled after the reply came: still clean it up
            raise
        finally:
            self._pending.pop(req_id, None)
        if not header["ok"]:
            cls = KeyNotFound if header.get("err") == "not_found" else TransferError
            raise cls(f"{self.endpoint} for key {key!r}: {header.get('msg', '?')}")
        return header, frames

    def notify(self, op: str, fields: dict) -> None:
        """Send a one-way notice (no reply; lost if the peer is gone, which is fine for hints)."""
        fut = self._sock.send_multipart([pack_notice(op, fields)])
        fut.add_done_callback(_log_failure)

    def _drop_unread(self, fut: asyncio.Future) -> None:
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            self._on_orphan(self, *fut.result())

    async def _read(self) -> None:
        while True:
            frames = await self._sock.recv_multipart(copy=False)
            try:
                header = unpack_reply(frames[0].bytes)
            except Exception as e:  # noqa: BLE001
                log.warning("dropping a malformed reply from %s: %s", self.endpoint, e)
                continue
            fut = self._pending.pop(header["id"], None)
            if fut is None or fut.done():
                if header.get("ok"):
                    self._on_orphan(self, header, frames[1:])
                continue
            fut.set_result((header, frames[1:]))

    async def close(self) -> None:
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(TransferError(f"channel to {self.endpoint} closed"))
        self._sock.close(linger=0)


def _log_failure(fut: asyncio.Future) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.warning("a notice was not sent: %s", fut.exception())


class ChannelPool:
    """Persistent channels to peers, created on first use."""

    def __init__(self, ctx: zmq.asyncio.Context, on_orphan: Orphan):
        self._ctx = ctx
        self._on_orphan = on_orphan
        self._channels: dict[str, PeerChannel] = {}

    async def request(self, endpoint: str, key: str, timeout: float) -> tuple[dict, list]:
        ch = self._channels.get(endpoint)
        if ch is None:
            ch = self._channels[endpoint] = PeerChannel(self._ctx, endpoint, self._on_orphan)
        try:
            return await ch.request(key, timeout)
        except TransferTimeout:
            # Likely a dead peer: stop reconnecting to it and discard the requests
            # queued for it, unless other pulls still wait on this channel.
            if ch.idle and self._channels.get(endpoint) is ch:
                del self._channels[endpoint]
                await ch.close()
            raise

    def notify(self, endpoint: str, op: str, fields: dict) -> None:
        """A one-way notice to a peer we have a channel to (dropped otherwise)."""
        ch = self._channels.get(endpoint)
        if ch is not None:
            ch.notify(op, fields)

    async def forget(self, endpoint: str) -> None:
        """Close the channel to a peer known to be gone (pending pulls fail)."""
        ch = self._channels.pop(endpoint, None)
        if ch is not None:
            await ch.close()

    async def close(self) -> None:
        for endpoint in list(self._channels):
            await self.forget(endpoint)
