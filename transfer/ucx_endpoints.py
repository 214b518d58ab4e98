"""This process's UCX endpoints: one per remote worker, shared, numbered, dropped without blocking.

Endpoints belong to the process (as its UCX worker does) and live as long as
it, shared by its backends: UCX pairs the endpoints of two workers, and
aborting one breaks the rendezvous of messages sent through its twin. So a
puller numbers its endpoints (``Peer.epoch``) and a holder that sees a new
number answers through a fresh endpoint (``reply_peer``). A condemned endpoint
(a deadline passed on it) is aborted once no pull or reply uses it
(``release``), without blocking the event loop (``abort``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import weakref

from transfer.base import TransferError
from transfer.ucx_progress import Progress, progress

log = logging.getLogger(__name__)

_CLOSE_WAIT_S = 30.0  # an aborted endpoint's close may wait this long for its peer's answer
_closing: set = set()  # tasks finishing aborts (referenced: the loop keeps only weak ones)
_epochs = itertools.count(1)  # numbers this process's endpoints (see reply_peer)


def _progress() -> Progress:
    import ucxx  # started by then (transfer.ucx_backend.start_ucx)

    return progress(ucxx)


class Peer:
    """One endpoint to one remote worker, shared by pulls from it and replies to it."""

    def __init__(self, ep):
        self.ep = ep
        self.users = 0
        self.condemned = False  # a reply's deadline passed on it: abort once nobody uses it
        self.keep: list = []  # buffers UCX may still read or write until the abort
        self.closing = False  # abort() began
        self.epoch = next(_epochs)
        self.peer_epoch: int | None = None  # the epoch of the peer's endpoint to us, as last seen


# This process's endpoints, by remote worker address (see the module docstring).
peers: dict[bytes, Peer] = {}
_connecting: dict[bytes, asyncio.Future] = {}


async def get_peer(ucx, worker_address: bytes) -> Peer:
    peer = peers.get(worker_address)
    if peer is not None:
        return peer
    pending = _connecting.get(worker_address)
    if pending is None or pending.get_loop() is not asyncio.get_running_loop():
        pending = asyncio.ensure_future(_connect(ucx, worker_address))
        _connecting[worker_address] = pending
        pending.add_done_callback(lambda f: _connecting.pop(worker_address, None)
                                  if _connecting.get(worker_address) is f else None)
    return await asyncio.shield(pending)


async def _connect(ucx, worker_address: bytes) -> Peer:
    try:
        remote = ucx.get_ucx_address_from_buffer(worker_address)
        ep = await ucx.create_endpoint_from_worker_address(remote, endpoint_error_handling=False)
    except Exception as e:  # noqa: BLE001 - a bad or unreachable address
        # On one host UCX maps the peer's shared memory at once: a dead peer fails here, fast.
        raise TransferError(f"no UCX endpoint to the peer (dead?): {type(e).__name__}: {e}") from None
    _progress().kick()  # the endpoint's wire-up messages
    peer = peers[worker_address] = Peer(ep)
    return peer


async def reply_peer(ucx, worker_address: bytes, epoch: object) -> Peer:
    """The endpoint to answer a puller whose own endpoint to us has number ``epoch``.

    UCX pairs our endpoint with one of the puller's; once the puller aborted
    that one (after a timeout, or ``forget_peer``) our rendezvous sends would
    fail on its side. A new number means it did: make a fresh endpoint, paired anew.
    """
    peer = await get_peer(ucx, worker_address)
    if peer.peer_epoch is not None and peer.peer_epoch != epoch:
        if peer.users == 0:
            abort(worker_address, peer)
        else:
            peer.condemned = True
            peers.pop(worker_address, None)
        peer = await get_peer(ucx, worker_address)
    peer.peer_epoch = epoch
    return peer


def release(worker_address: bytes, peer: Peer) -> None:
    peer.users -= 1
    if peer.condemned and peer.users == 0:
        abort(worker_address, peer)


def abort(worker_address: bytes, peer: Peer) -> None:
    """Drop the endpoint: closed without blocking the loop, then aborted (cancelling its receives).

    ucxx's ``abort()`` alone progresses the worker until the peer acknowledged
    the close: an event loop stuck for as long as a wedged (alive, busy) peer
    stays silent. So the close is posted first and awaited on the loop (bounded
    by ``_CLOSE_WAIT_S``); the abort after it finds nothing to wait for, and
    cancels the receives still posted, whose buffers ``keep`` held until then.
    """
    if peers.get(worker_address) is peer:
        del peers[worker_address]
    if peer.closing:
        return
    peer.closing = True
    try:
        loop = asyncio.get_running_loop()
        inner = peer.ep._ep
        closed = inner.close() if inner is not None else None
    except Exception as e:  # noqa: BLE001 - no loop (interpreter exit), or UCX refused: abort now
        log.debug("closing an endpoint: %s", e)
        _finish_abort(peer)
        return
    _progress().kick()
    if closed is None:
        _finish_abort(peer)
        return
    task = loop.create_task(_abort_once_closed(peer, closed))
    _closing.add(task)
    task.add_done_callback(_closing.discard)


async def _abort_once_closed(peer: Peer, closed) -> None:
    try:
        async with asyncio.timeout(_CLOSE_WAIT_S):
            await _progress().wait([closed])
    except Exception as e:  # noqa: BLE001 - a failed or late close
        log.debug("closing an endpoint: %s", type(e).__name__)
    if closed.completed:
        _finish_abort(peer)
    else:
        # The peer lives but never answers: an abort would block the loop for good. Leave the
        # endpoint be (its buffers with it) rather than stop this process.
        log.warning("a UCX peer did not answer an endpoint close in %gs; leaving the endpoint", _CLOSE_WAIT_S)


def skip_closes_at_exit() -> None:
    """At interpreter exit, spare the endpoints ucxx's close: it blocks until each peer answers.

    A peer alive but silent (wedged, or a process with no loop running) would hold
    this process's exit for good; with error handling off the peers notice nothing
    either way, and the worker's own teardown releases what the endpoints hold.
    """
    from ucxx._lib_async.endpoint import _finalizer

    for fin in list(getattr(weakref.finalize, "_registry", {})):
        info = fin.peek()
        if info is not None and info[1] is _finalizer:
            fin.detach()


def _finish_abort(peer: Peer) -> None:
    try:
        peer.ep.abort()  # cancels the receives and sends still posted on it
    except Exception as e:  # noqa: BLE001
        log.debug("aborting an endpoint: %s", e)
    peer.keep.clear()
    try:
        _progress().kick()  # the cancellations complete in a progress
    except RuntimeError:  # no running loop (interpreter exit)
        pass
