"""UCX backend: tensor bytes move by UCX tag messages between persistent endpoints.

Every process runs one UCX worker (ucxx's asyncio context, started in
``blocking`` mode), progressed by ``transfer.ucx_progress``: polled while a
transfer moves, asleep in epoll when idle (ucxx's own modes spin). A backend's
address is ``ucx://<service id>/<worker address>`` (the worker address
base64url): endpoints are made straight from it, with endpoint error handling
off. Both choices are what made ucxx fast here (9.8 GB/s between two
processes, against 0.76 through a listener, which stays on tcp).

A pull, all messages tagged (64-bit tags, matched exactly):

- the puller posts a receive for the reply header on a tag base unique to this
  pull (``counter << 16`` of a process-wide counter: tags are never reused),
  then sends ``{"v", "op": "pull", "id", "key", "tag", "reply", "ep",
  "timeout"}`` to the holder's request tag (``1 << 63 | service id``;
  ``reply`` is its own worker address, ``ep`` the number of its endpoint);
- the holder answers on an endpoint to ``reply``: the header
  ``{"v", "id", "ok": true, "tensors": [[dtype, shape], ...]}`` on ``tag``,
  and tensor ``i``'s contiguous bytes on ``tag + 1 + i``, all posted at once
  (empty ones are not sent; payloads of at most 8 KiB, CUDA ones copied to the
  host, ride in the header as ``"inline"``); or ``{"ok": false, "err":
  "not_found" | "error", "msg"}`` alone;
- the puller allocates each tensor on ``device`` and receives straight into it
  (as uint8 bytes: bf16 and fp8 have no numpy twin); CUDA tensors and host
  ones of 1 MiB or more come from a pool of buffers that UCX has seen before
  (``transfer.ucx_buffers``: warm pages, cuda_ipc registrations kept).

Sends and receives are posted through ucxx's request API the moment they are
known (``_post_send``/``_post_recv``), not by tasks that post on their first
turn of the event loop, and awaited together. The holder never keeps a receive
posted for the next request: it probes for the request tag whenever the worker
was progressed (``_serve``), so an idle backend costs nothing.

Endpoints belong to the process and are shared by its backends, numbered, and
dropped without blocking the loop: ``transfer.ucx_endpoints``.

Error handling off means UCX never reports a dead peer; deadlines do. (On
one host, UCX's only transports with peer error handling are tcp ones, 3x
slower; and CMA is left out, see ``start_ucx``: its read from a dead peer
aborts the process.) A pull
past its ``timeout`` raises ``TransferTimeout`` and condemns its endpoint: the
endpoint is aborted (cancelling the receives still posted on it, whose
buffers stay alive until then) once no other pull uses it, and the next pull
makes a fresh one, with a new number: the holder then answers through a fresh
endpoint too. Tags are never reused, so a reply that comes after its pull
gave up can never land in another pull's tensors. A holder gives up sending
after the puller's timeout plus a grace and aborts its endpoint the same way.
``forget_peer`` (the bus saw the peer die) aborts at once.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import itertools
import logging
import os
import secrets
import struct
import sys

import msgpack
import numpy as np
import torch

from transfer.base import KeyNotFound, TransferBackend, TransferError, TransferTimeout
from transfer.ucx_buffers import fresh, inline_bytes, send_buffer, ucx_buffer
from transfer.ucx_endpoints import Peer, abort, get_peer, peers, release, reply_peer, skip_closes_at_exit
from transfer.ucx_progress import POLL_CUDA_S, Progress, progress
from transfer.wire import VERSION, describe, dtype_from_name, from_buffer, nbytes, numel

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'epd[ucx]' (PyPI ucxx-cu12; ucxx-cu13 for CUDA 13)"
_SCHEME = "ucx://"
_CTRL_BYTES = 64 << 10  # a request or a reply header: a key, an address, a few shapes
_REQUEST_BIT = 1 << 63
_FRAME_BITS = 16  # tag = pull tag base | (1 + tensor index)
_MAX_TENSORS = (1 << _FRAME_BITS) - 2
_GRACE_S = 2.0  # a holder sends for the puller's timeout plus this, then gives up
_INLINE_BYTES = 8 << 10  # payloads up to this ride in the reply header
# Tag bases of this process's pulls: never reused, so a late reply matches nothing.
_pull_tags = itertools.count(1)


class UcxUnavailable(TransferError):
    """ucxx is not installed here, or UCX did not start."""


def start_ucx():
    """The ucxx module with this process's UCX context started (blocking mode: see ucx_progress)."""
    # ucxx sets UCX_MEMTYPE_CACHE for old UCX releases; current ones warn about it at every start.
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    # Not CMA: with endpoint error handling off (what keeps shared memory usable at all: UCX
    # offers no shm transport with peer error handling), a CMA read from a peer that died
    # mid-transfer is ucs_fatal, and a dead holder would abort its puller. Rendezvous over
    # sysv/posix shared memory instead is as fast here (perf/RESULTS.md) and a dead peer's
    # transfer merely stalls until the pull's deadline. An operator's own UCX_TLS wins.
    os.environ.setdefault("UCX_TLS", "^cma")
    try:
        import ucxx
    except ImportError as e:
        raise UcxUnavailable(f"the ucx transfer backend needs ucxx: {INSTALL_HINT} ({e})") from None
    try:
        ucxx.init(progress_mode="blocking")
    except RuntimeError as e:
        if "already initiated" not in str(e):
            raise UcxUnavailable(f"UCX did not start: {e}; {INSTALL_HINT}") from None
    except Exception as e:  # noqa: BLE001 - UCXError and friends: no usable transport
        raise UcxUnavailable(f"UCX did not start: {type(e).__name__}: {e}; {INSTALL_HINT}") from None
    global _ucxx, _Array, _Tag, _TagMaskFull
    if _ucxx is None:
        atexit.register(skip_closes_at_exit)  # runs before the finalizers ucxx registered
    from ucxx._lib.arr import Array
    from ucxx.types import Tag, TagMaskFull

    _ucxx, _Array, _Tag, _TagMaskFull = ucxx, Array, Tag, TagMaskFull
    return ucxx


_available: bool | None = None
# ucxx's request-level API (set by start_ucx): posting a send or a receive at once, where
# ``Endpoint.send``/``recv`` post only once their coroutine first runs, wrapped in a task.
_ucxx = _Array = _Tag = _TagMaskFull = None


def _progress() -> Progress:
    return progress(_ucxx)


def _post_send(ep, buf, tag: int):
    if ep._ep is None:
        raise TransferError("the UCX endpoint was aborted (peer forgotten)")
    req = ep._ep.tag_send(_Array(buf), _Tag(tag))
    _progress().kick()
    return req


def _post_recv(ep, buf, tag: int):
    if ep._ep is None:
        raise TransferError("the UCX endpoint was aborted (peer forgotten)")
    req = ep._ep.tag_recv(_Array(buf), _Tag(tag), _TagMaskFull)
    _progress().kick()
    return req


async def _wait_all(requests: list, cuda: bool = False) -> None:
    """Until every posted request is done (all are in flight at once); raises the first failure.

    ``cuda``: some move device memory, whose copies complete without a UCX event: poll.
    """
    await _progress().wait(requests, POLL_CUDA_S if cuda else 0.0)


def ucx_rdma() -> bool:
    """True when this process's UCX context has an RDMA transport (InfiniBand/RoCE: rc, dc, ud).

    Without one UCX reaches another host by TCP, where it was no faster than ZeroMQ here
    (``perf/bench_transfer.py --netns``), so ``auto`` takes ZeroMQ across hosts then.
    """
    if not ucx_available():
        return False
    try:
        transports = _ucxx.get_active_transports()
    except Exception as e:  # noqa: BLE001 - the context info's format is ucxx's, not ours
        log.info("cannot list UCX transports: %s", e)
        return False
    return any(t.startswith(("rc", "dc", "ud")) for t in transports)


def ucx_available() -> bool:
    """True when ucxx imports and its UCX context starts (checked once per process)."""
    global _available
    if _available is None:
        try:
            start_ucx()
            _available = True
        except UcxUnavailable as e:
            log.info("ucx transfer backend unavailable: %s", e)
            _available = False
    return _available


def _frame(obj: dict) -> np.ndarray:
    body = msgpack.packb(obj)
    if len(body) + 4 > _CTRL_BYTES:
        raise TransferError(f"control message of {len(body)} bytes is over {_CTRL_BYTES}")
    return np.frombuffer(struct.pack("<I", len(body)) + body, dtype=np.uint8)


def _unframe(buf: np.ndarray) -> dict:
    (n,) = struct.unpack_from("<I", buf)
    if n > len(buf) - 4:
        raise ValueError("control message longer than its buffer")
    obj = msgpack.unpackb(memoryview(buf)[4:4 + n])
    if not isinstance(obj, dict) or obj.get("v") != VERSION:
        raise ValueError(f"not a v{VERSION} message")
    return obj


def _split_address(address: str) -> tuple[int, bytes]:
    """``ucx://<sid hex>/<worker address>`` -> (request tag, worker address bytes)."""
    try:
        if not address.startswith(_SCHEME):
            raise ValueError
        sid, _, addr = address[len(_SCHEME):].partition("/")
        return _REQUEST_BIT | int(sid, 16), base64.urlsafe_b64decode(addr)
    except (ValueError, TypeError):
        raise TransferError(f"not a ucx address: {address!r}") from None


def _start_now(coro, loop) -> asyncio.Task:
    """A task that runs ``coro`` at once up to its first wait (Python 3.12+; before, next turn).

    An answer then posts its sends in the server's own turn of the loop.
    """
    if sys.version_info >= (3, 12):
        return asyncio.Task(coro, loop=loop, eager_start=True)
    return loop.create_task(coro)


class UcxBackend(TransferBackend):
    """Serves pulls on this process's UCX worker; pulls from peers' ``ucx://`` addresses."""

    name = "ucx"

    def __init__(self, store: dict | None = None):
        super().__init__(store)
        self._ucx = start_ucx()
        self._sid = secrets.randbits(62)
        self._worker_address: bytes = self._ucx.get_worker_address().tobytes()
        self._server: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._closed = False

    async def start(self) -> None:
        progress(self._ucx)  # this event loop progresses the worker from now on
        self._server = asyncio.create_task(self._serve())

    @property
    def address(self) -> str:
        if self._server is None:
            raise RuntimeError("start() the backend before asking its address")
        addr = base64.urlsafe_b64encode(self._worker_address).decode()
        return f"{_SCHEME}{self._sid:x}/{addr}"

    # -- holder side --------------------------------------------------------

    async def _serve(self) -> None:
        """Answer requests as they come: probe for the request tag each time the worker was progressed.

        A receive posted for the next request would be awaited by polling (see
        ``ucx_progress``); a probe after every progress sees each request as
        soon as its message is in, and between requests the loop sleeps.
        """
        tag = _Tag(_REQUEST_BIT | self._sid)
        drv = progress(self._ucx)
        worker = drv.worker
        loop = asyncio.get_running_loop()
        while True:
            probe = worker.tag_probe(tag, _TagMaskFull, True)
            if not probe.matched:
                await drv.event()
                continue
            buf = np.empty(max(probe.length, 4), dtype=np.uint8)
            try:
                await _wait_all([worker.tag_recv_with_handle(_Array(buf), probe)])
                req = _unframe(buf)
            except Exception as e:  # noqa: BLE001 - a stranger's bytes must not kill the server
                log.warning("dropping a malformed ucx request: %s", e)
                continue
            if req.get("op") != "pull":
                continue
            task = _start_now(self._answer(req), loop)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _answer(self, req: dict) -> None:
        try:
            key, tag, reply = req["key"], req["tag"], req["reply"]
            timeout = float(req["timeout"])
            if not (isinstance(key, str) and isinstance(tag, int) and isinstance(reply, bytes)):
                raise TypeError("bad field types")
        except (KeyError, TypeError, ValueError) as e:
            log.warning("dropping a malformed ucx pull request: %s", e)
            return
        buffers: list = []
        tensors = self._store.get(key)
        if tensors is None:
            header = {"v": VERSION, "id": req.get("id"), "ok": False, "err": "not_found",
                      "msg": "not held here (never put, or dropped)"}
        else:
            try:
                if len(tensors) > _MAX_TENSORS:
                    raise TransferError(f"{len(tensors)} tensors are over {_MAX_TENSORS}")
                buffers = [send_buffer(t) for t in tensors]
                for d in {t.device for t in tensors if t.is_cuda}:
                    # UCX reads device memory outside torch's streams: let the writers finish.
                    torch.cuda.synchronize(d)
                header = {"v": VERSION, "id": req.get("id"), "ok": True, "tensors": describe(tensors)}
                if sum(b.nbytes for b in buffers) <= _INLINE_BYTES:
                    # Tiny payloads ride in the header: one message instead of one per tensor.
                    header["inline"], buffers = [inline_bytes(b) for b in buffers], []
            except Exception as e:  # noqa: BLE001 - the puller gets the reason instead of a timeout
                log.exception("ucx pull of %r failed", key)
                header = {"v": VERSION, "id": req.get("id"), "ok": False, "err": "error",
                          "msg": f"{type(e).__name__}: {e}"}
                buffers = []
        try:
            peer = await reply_peer(self._ucx, reply, req.get("ep"))
        except TransferError as e:
            log.warning("cannot answer a ucx pull of %r: %s", key, e)
            return
        peer.users += 1
        try:
            async with asyncio.timeout(max(timeout, 0.0) + _GRACE_S):
                # All at once: the puller posts the payloads' receives as soon as the header is
                # in, and a payload that comes first waits in UCX's unexpected queue (a
                # rendezvous one as a few bytes).
                buffers.insert(0, _frame(header))  # alive until sent, as every buffer posted
                await _wait_all([_post_send(peer.ep, b, tag + i) for i, b in enumerate(buffers) if b.nbytes],
                                cuda=any(t.is_cuda for t in tensors or ()))
        except BaseException as e:
            peer.condemned = True  # its sends may still read our buffers: abort before they go
            peer.keep.extend(buffers)
            if isinstance(e, asyncio.CancelledError):
                raise
            log.info("ucx reply for %r not delivered: %s", key, type(e).__name__)
            return
        finally:
            release(reply, peer)
        if header["ok"]:
            self.bytes_sent += sum(nbytes(t) for t in tensors)
            self.pulls_served += 1

    # -- puller side --------------------------------------------------------

    async def pull(self, peer_address: str, key: str, *, timeout: float,
                   device: str = "cpu") -> list[torch.Tensor]:
        if self._server is None:
            raise RuntimeError("start() the backend before pulling")
        req_tag, worker_address = _split_address(peer_address)
        tag = next(_pull_tags) << _FRAME_BITS
        dev = torch.device(device)
        peer: Peer | None = None
        posted: list = []  # UCX requests, done or not
        hbuf, request, buffers = None, None, []
        try:
            async with asyncio.timeout(timeout):
                peer = await get_peer(self._ucx, worker_address)
                peer.users += 1
                hbuf = np.empty(_CTRL_BYTES, dtype=np.uint8)
                # Post the header receive first: the reply never waits in UCX's unexpected queue.
                posted.append(_post_recv(peer.ep, hbuf, tag))
                request = _frame({"v": VERSION, "op": "pull", "id": tag >> _FRAME_BITS, "key": key,
                                  "tag": tag, "reply": self._worker_address, "ep": peer.epoch,
                                  "timeout": timeout})
                posted.append(_post_send(peer.ep, request, req_tag))
                await _wait_all(posted)
                tensors, buffers = self._allocate(_unframe(hbuf), peer_address, key, dev)
                posted += [_post_recv(peer.ep, b, tag + 1 + i) for i, b in enumerate(buffers) if b is not None]
                await _wait_all(posted[2:], cuda=dev.type == "cuda")
        except TimeoutError:
            raise TransferTimeout(
                f"no answer from ucx peer {peer_address[:48]}... for key {key!r} within {timeout:g}s"
            ) from None
        except (KeyNotFound, TransferError):
            raise
        except BaseException as e:
            if isinstance(e, asyncio.CancelledError):
                raise
            if peer is not None:
                peer.condemned = True  # UCX failed it (the peer reset or died): never reuse it
            raise TransferError(f"ucx pull of {key!r} failed: {type(e).__name__}: {e}") from None
        finally:
            if peer is not None:
                if not all(r.completed for r in posted):
                    # Still posted (timeout or cancel): UCX may use their buffers until the
                    # endpoint is aborted, so they stay alive until then.
                    peer.keep += [hbuf, request, *buffers]
                    peer.condemned = True
                release(worker_address, peer)
        self.bytes_received += sum(nbytes(t) for t in tensors)
        self.pulls_done += 1
        return tensors

    @staticmethod
    def _allocate(header: dict, peer_address: str, key: str, dev: torch.device):
        """Fresh tensors for the reply ``header`` and the buffers to receive into (None: empty)."""
        if not header.get("ok"):
            cls = KeyNotFound if header.get("err") == "not_found" else TransferError
            raise cls(f"ucx peer {peer_address[:48]}... for key {key!r}: {header.get('msg', '?')}")
        try:
            layout = header["tensors"]
            if not isinstance(layout, list) or len(layout) > _MAX_TENSORS:
                raise ValueError("bad tensor list")
            specs = [(dtype_from_name(d), s) for d, s in layout]
            for _, s in specs:
                numel(s)
        except (KeyError, TypeError, ValueError) as e:
            raise TransferError(f"ucx peer for key {key!r}: bad reply ({e})") from None
        inline = header.get("inline")
        if inline is not None:
            try:
                if not isinstance(inline, list) or len(inline) != len(specs):
                    raise ValueError("inline bytes do not match the layout")
                tensors = [from_buffer(bytearray(b), dt, s).to(dev) for b, (dt, s) in zip(inline, specs)]
            except (TypeError, ValueError) as e:
                raise TransferError(f"ucx peer for key {key!r}: bad reply ({e})") from None
            return tensors, [None] * len(tensors)
        tensors = [fresh(dt, s, dev) for dt, s in specs]
        if dev.type == "cuda":
            torch.cuda.current_stream(dev).synchronize()  # the allocator may hand back busy memory
        buffers = [ucx_buffer(t) if t.numel() else None for t in tensors]
        return tensors, buffers

    async def forget_peer(self, peer_address: str) -> None:
        """Drop the endpoint to a peer the bus reported gone."""
        _, worker_address = _split_address(peer_address)
        peer = peers.get(worker_address)
        if peer is not None:
            abort(worker_address, peer)

    async def close(self) -> None:
        if self._closed or self._server is None:
            return
        self._closed = True
        for t in (self._server, *self._tasks):
            t.cancel()
        await asyncio.gather(self._server, *self._tasks, return_exceptions=True)
        # The endpoints stay: they are the process's (see the module docstring).
