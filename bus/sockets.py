"""ZeroMQ sockets that send and receive `bus.codec` messages.

`AsyncSocket` (zmq.asyncio, for the router and the workers' IO tasks) and
`SyncSocket` (plain zmq, for the client SDK and scripts) share one shape::

    sock = AsyncSocket("router", "tcp://127.0.0.1:5555", bind=True)
    identity, msg = await sock.recv()
    await sock.send(reply, to=identity)

Some kinds carry a prefix frame before the message: a ROUTER receives the
sender's identity and must be told whom to send to (``to=identity``); a PUB
sends a topic (``to=b"topic"``, prefix-matched by subscribers) and a SUB
receives it. `recv` returns ``(prefix, msg)``, with prefix None for the other
kinds (DEALER, PUSH, PULL).

A malformed message makes `recv` raise `WireError`; it is consumed whole, so
the socket stays usable. A socket belongs to one thread (or one event loop).
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable
from typing import Any, Literal

import zmq
import zmq.asyncio

from bus.codec import WireError, decode, encode

Kind = Literal["router", "dealer", "push", "pull", "pub", "sub"]
_TYPES: dict[str, int] = {
    "router": zmq.ROUTER, "dealer": zmq.DEALER, "push": zmq.PUSH,
    "pull": zmq.PULL, "pub": zmq.PUB, "sub": zmq.SUB,
}
_RECV_PREFIX = ("router", "sub")  # kinds whose received messages start with a prefix frame

# No message cap on queues: token streams burst, and backpressure belongs to the
# scheduler. A full PUSH would block the IO task; a full PUB drops silently.
HWM = 0
# Frames below this size are copied into the message: cheaper than pinning a
# buffer (the same threshold pyzmq uses); tensors above it go zero-copy.
ZERO_COPY_MIN = 65536


def _small(part: Any) -> bool:
    return type(part) is bytes or memoryview(part).nbytes < ZERO_COPY_MIN


def _all_small(parts: list[Any]) -> bool:
    return all(map(_small, parts))


def _send_parts(sock: zmq.Socket, parts: list[Any]) -> None:
    # pyzmq's send_multipart spends ~2 us per frame on checks; on the hot path a loop is cheaper.
    for p in parts[:-1]:
        sock.send(p, zmq.SNDMORE, copy=_small(p))
    sock.send(parts[-1], copy=_small(parts[-1]))


def _recv_parts(sock: zmq.Socket) -> list[zmq.Frame]:
    # Frame.more spares a getsockopt(RCVMORE) per frame (~1 us each).
    f = sock.recv(copy=False)
    parts = [f]
    while f.more:
        f = sock.recv(copy=False)
        parts.append(f)
    return parts


class PeerGone(ConnectionError):
    """A ROUTER was asked to send to an identity that is not connected (gone or never seen)."""

    def __init__(self, identity: bytes):
        super().__init__(f"peer {identity!r} is not connected")
        self.identity = identity


def free_tcp_address(host: str = "127.0.0.1") -> str:
    """A ``tcp://host:port`` address whose port was free a moment ago (for tests, benches)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return f"tcp://{host}:{s.getsockname()[1]}"


class _Base:
    """Socket creation, options and the prefix rules shared by both flavours."""

    def __init__(
        self,
        kind: Kind,
        addr: str,
        bind: bool,
        identity: bytes | None,
        topics: Iterable[bytes] | None,
        ctx: zmq.Context,
    ):
        if kind not in _TYPES:
            raise ValueError(f"socket kind must be one of {sorted(_TYPES)}, got {kind!r}")
        if topics is not None and kind != "sub":
            raise ValueError("topics apply to a 'sub' socket only")
        self.kind = kind
        self._sock = sock = ctx.socket(_TYPES[kind])
        sock.setsockopt(zmq.LINGER, 0)  # close never waits for unsent messages
        sock.setsockopt(zmq.SNDHWM, HWM)
        sock.setsockopt(zmq.RCVHWM, HWM)
        sock.setsockopt(zmq.IPV6, 0)
        if kind == "router":
            # Sending to an unknown identity raises instead of dropping silently.
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            # A restarted peer that reuses its identity takes it over from the dead connection.
            sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        if identity is not None:
            sock.setsockopt(zmq.IDENTITY, identity)
        if kind == "sub":
            for topic in (b"",) if topics is None else topics:
                sock.setsockopt(zmq.SUBSCRIBE, topic)
        try:
            sock.bind(addr) if bind else sock.connect(addr)
        except zmq.ZMQError as e:
            sock.close(linger=0)
            raise OSError(f"cannot {'bind' if bind else 'connect'} {kind} to {addr}: {e}") from e

    @property
    def address(self) -> str:
        """The last bound/connected endpoint (with the real port after binding ``tcp://host:*``)."""
        return self._sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def subscribe(self, topic: bytes) -> None:
        """SUB only: also receive messages whose topic starts with `topic`."""
        self._sock.setsockopt(zmq.SUBSCRIBE, topic)

    def close(self) -> None:
        self._sock.close(linger=0)

    @property
    def closed(self) -> bool:
        return self._sock.closed

    def _prefixed(self, frames: list[Any], to: bytes | None) -> list[Any]:
        if self.kind == "router":
            if to is None:
                raise ValueError("a router send needs to=identity")
            return [to, *frames]
        if self.kind == "pub":
            return [b"" if to is None else to, *frames]
        if to is not None:
            raise ValueError(f"a {self.kind} socket takes no `to`")
        return frames

    def _split(self, frames: list[zmq.Frame]) -> tuple[bytes | None, list[zmq.Frame]]:
        if self.kind in _RECV_PREFIX:
            return frames[0].bytes, frames[1:]
        return None, frames

    def _gone(self, e: zmq.ZMQError, to: bytes | None) -> Exception:
        return PeerGone(to) if e.errno == errno.EHOSTUNREACH and to is not None else e

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncSocket(_Base):
    """An asyncio socket of one `kind`, bound or connected to `addr`."""

    def __init__(
        self,
        kind: Kind,
        addr: str,
        bind: bool,
        identity: bytes | None = None,
        topics: Iterable[bytes] | None = None,
        ctx: zmq.asyncio.Context | None = None,
    ):
        super().__init__(kind, addr, bind, identity, topics, ctx or zmq.asyncio.Context.instance())
        # The fast path: a plain socket on the same handle tries each operation without waiting;
        # only one that would block takes zmq.asyncio's Future machinery (~25 us per message,
        # measured as a fifth of the router's busy time under token streams). After a direct
        # operation, zmq.asyncio is told to look at the socket again: its file descriptor is
        # edge-triggered, and a send can consume the edge a waiting receiver needs.
        self._wake = getattr(self._sock, "_schedule_remaining_events", None)
        self._direct = zmq.Socket.shadow(self._sock.underlying) if self._wake is not None else None
        self._waiting_sends = 0  # sends queued in zmq.asyncio: a direct send must not overtake them

    def close(self) -> None:
        self._direct = None  # the shadow must not outlive the handle
        super().close()

    async def send(self, msg: Any, to: bytes | None = None) -> None:
        """Send a `@message`; `to` is the identity (ROUTER) or topic (PUB). PeerGone if gone."""
        await self.send_frames(encode(msg), to)

    async def send_frames(self, frames: list[Any], to: bytes | None = None) -> None:
        """Send already-encoded frames (e.g. forwarded unread by a routing hop)."""
        parts = self._prefixed(frames, to)
        small = _all_small(parts)
        direct = self._direct
        try:
            if direct is not None and not self._waiting_sends:
                try:
                    # zmq queues a multipart message whole: only the first frame can block.
                    direct.send(parts[0], zmq.DONTWAIT | (zmq.SNDMORE if len(parts) > 1 else 0),
                                copy=small or _small(parts[0]))
                except zmq.Again:
                    pass
                else:
                    for p in parts[1:-1]:
                        direct.send(p, zmq.SNDMORE, copy=small or _small(p))
                    if len(parts) > 1:
                        direct.send(parts[-1], copy=small or _small(parts[-1]))
                    self._wake()
                    return
            self._waiting_sends += 1
            try:
                # copy=False costs a Frame object per part: worth it only to spare a big tensor a copy.
                await self._sock.send_multipart(parts, copy=small)
            finally:
                self._waiting_sends -= 1
        except zmq.ZMQError as e:
            raise self._gone(e, to) from e

    async def recv_frames(
        self, timeout: float | None = None
    ) -> tuple[bytes | None, list[zmq.Frame]]:
        """The next message's raw frames and its prefix. TimeoutError after `timeout` s."""
        direct = self._direct
        if direct is not None:
            try:
                f = direct.recv(zmq.DONTWAIT, copy=False)
            except zmq.Again:
                pass
            else:
                parts = [f]
                while f.more:
                    f = direct.recv(copy=False)
                    parts.append(f)
                if self._waiting_sends:
                    self._wake()
                return self._split(parts)
        if timeout is not None and not await self._sock.poll(int(timeout * 1000), zmq.POLLIN):
            raise TimeoutError(f"no message on {self.kind} socket within {timeout} s")
        return self._split(await self._sock.recv_multipart(copy=False))

    async def recv(self, timeout: float | None = None) -> tuple[bytes | None, Any]:
        """The next message and its prefix (identity / topic / None). WireError if malformed."""
        prefix, frames = await self.recv_frames(timeout)
        return prefix, decode(frames)


class SyncSocket(_Base):
    """A blocking socket of one `kind`, bound or connected to `addr`."""

    def __init__(
        self,
        kind: Kind,
        addr: str,
        bind: bool,
        identity: bytes | None = None,
        topics: Iterable[bytes] | None = None,
        ctx: zmq.Context | None = None,
    ):
        super().__init__(kind, addr, bind, identity, topics, ctx or zmq.Context.instance())

    def send(self, msg: Any, to: bytes | None = None) -> None:
        """Send a `@message`; `to` is the identity (ROUTER) or topic (PUB). PeerGone if gone."""
        self.send_frames(encode(msg), to)

    def send_frames(self, frames: list[Any], to: bytes | None = None) -> None:
        """Send already-encoded frames (e.g. forwarded unread by a routing hop)."""
        try:
            _send_parts(self._sock, self._prefixed(frames, to))
        except zmq.ZMQError as e:
            raise self._gone(e, to) from e

    def recv_frames(self, timeout: float | None = None) -> tuple[bytes | None, list[zmq.Frame]]:
        """The next message's raw frames and its prefix. TimeoutError after `timeout` s."""
        if timeout is not None and not self._sock.poll(int(timeout * 1000)):
            raise TimeoutError(f"no message on {self.kind} socket within {timeout} s")
        return self._split(_recv_parts(self._sock))

    def recv(self, timeout: float | None = None) -> tuple[bytes | None, Any]:
        """The next message and its prefix (identity / topic / None). WireError if malformed."""
        prefix, frames = self.recv_frames(timeout)
        return prefix, decode(frames)


__all__ = ["AsyncSocket", "SyncSocket", "PeerGone", "WireError", "free_tcp_address", "Kind", "HWM"]
