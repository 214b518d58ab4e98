"""The router's half of the cluster cache: a component ``RouterCore`` owns and calls.

It owns the cluster index (``router.cluster_index``) and uses it two ways:

- E stage (``encode_stage``): an image whose embedding an alive encode worker
  still holds is not encoded again (the prefill worker pulls it); one being
  encoded for another request is waited for, not encoded twice; only the rest
  goes to an encoder.
- Prefix: a prefill/mixed worker asks who holds more of its prompt's blocks
  (``PrefixQuery``); the holder of the longest run copies them out
  (``PrefixExport`` -> ``PrefixExported``) and the asker is told where to pull
  them (``PrefixAnswer``), releasing the copy with ``KvTaken``.

``cluster_cache=False`` (A/B runs) keeps the index but never reuses across
workers: every image is encoded, every prefix computed.

What it needs from the router it gets at construction (the registry, the policy, a send
function, a stage dispatch and a request lookup); the core hands it the messages that concern
it (``on_*``) and tells it when a worker is lost (``forget_worker``).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from typing import Awaitable, Callable

from bus import messages as m
from bus.sockets import PeerGone
from router.backend import ApiError, ApiRequest
from router.cluster_index import ClusterIndex
from router.policy import DispatchPolicy
from router.registry import Registry, WorkerRecord
from transfer.hash_keys import image_bytes_key, prefix_key


Send = Callable[[str, object], Awaitable[None]]  # (worker id, message); raises PeerGone
Dispatch = Callable[..., Awaitable[WorkerRecord]]  # (flight, roles, message, wait=) -> the worker it went to


class ClusterCache:
    """The cluster index and what reuses it: the E stage's image lookups and shared encodes, and
    the prefix exports between workers.

    ``send`` delivers a message to a worker (raising ``PeerGone``); ``dispatch`` sends a stage of a
    flight the way the core does (picking, waiting, recording its owner); ``request_of`` gives the
    client request of a (wire) request id, or None; ``count_recovery(stage)`` counts a request
    moved off a failed worker."""

    def __init__(self, registry: Registry, policy: DispatchPolicy, send: Send, dispatch: Dispatch,
                 request_of: Callable[[str], ApiRequest | None], count_recovery: Callable[[str], None],
                 enabled: bool = True, index_bounds: dict[str, int] | None = None):
        self.registry, self.holdings, self.policy = registry, registry.holdings, policy
        self._send, self._dispatch, self._request_of, self._count_recovery = send, dispatch, request_of, count_recovery
        self.index = ClusterIndex(**(index_bounds or {}))  # max_kv_entries, max_embedding_entries, max_aliases
        self.enabled = enabled  # off: every image is encoded, every prefix computed (A/B runs)
        self.encoding: dict[str, asyncio.Future] = {}  # image bytes key -> its ImageRef, while encoding
        self.encode_jobs: dict[str, tuple[str, list[str]]] = {}  # request id -> (encode worker, bytes keys)
        self.prefix_exports: dict[str, tuple[str, str, str]] = {}  # store key -> (asker, holder, request id)
        self.stats: Counter[str] = Counter(images_from_cluster_cache=0, images_encode_shared=0,
                                                 prefix_queries=0, prefix_hits=0)

    # ---- the E stage --------------------------------------------------------------------------
    async def encode_stage(self, flight) -> list[m.ImageRef]:
        """One ref per image of the request: from the cluster index, from an encode already under
        way for another request, or from an encode of the rest sent now. An image whose encode
        failed with a worker (dead encoder, 503) gets an empty ref: the prefill worker encodes it;
        only a bad image (4xx) fails the request."""
        keys, refs, todo = self.images_to_encode(flight.req)
        self.stats["images_from_cluster_cache"] += sum(r is not None for r in refs)
        waits = {k: self.encoding[k] for k, r in zip(keys, refs) if r is None and k in self.encoding}
        self.stats["images_encode_shared"] += len(waits)
        mine: dict[str, asyncio.Future] = {}
        if todo:
            loop = asyncio.get_running_loop()
            for k in todo:
                fut = self.encoding[k] = mine[k] = loop.create_future()
                fut.add_done_callback(_retrieve)
            if flight.plan is not None and any(flight.plan.encoders[i] for i in todo.values()):
                await self._encode_as_planned(flight, todo)
            else:
                await self._encode_on_one(flight, todo)
        got: dict[str, m.ImageRef | None] = {}
        for k, fut in {**waits, **mine}.items():
            try:
                got[k] = await fut
            except ApiError as e:
                if k in todo and e.status < 500:
                    raise  # this request's own image is bad: its error is the answer
                got[k] = None  # the encode failed with a worker: the prefill worker encodes it
                if k in todo:
                    self._count_recovery("encode")
        return [ref or got.get(k) or _encode_here() for k, ref in zip(keys, refs)]

    def images_to_encode(self, req) -> tuple[list[str], list, dict[str, int]]:
        """(bytes key per image, the cluster's ref per image or None, {key: index of its first
        image} for the images this request must encode: not held by an alive encoder, not being
        encoded for another request)."""
        if self.enabled:
            keys = [image_bytes_key(b) for b in req.images]
        else:  # keys no other request shares: nothing found, nothing shared
            keys = [f"{req.request_id}#{i}" for i in range(len(req.images))]
        alive = {w.worker_id for w in self.registry.alive("encode")}
        refs: list[m.ImageRef | None] = [self.index.embedding_for(k, alive) if self.enabled else None
                                         for k in keys]
        todo: dict[str, int] = {}
        for i, (k, ref) in enumerate(zip(keys, refs)):
            if ref is None and k not in self.encoding and k not in todo:
                todo[k] = i
        return keys, refs, todo

    async def _encode_on_one(self, flight, todo: dict[str, int]) -> None:
        """Every image of ``todo`` to one encode worker (the policy's ``choose``)."""
        req = flight.req
        try:
            msg = m.EncodeRequest(request_id=flight.wire_id, images=[req.images[i] for i in todo.values()])
            worker = await self._dispatch(flight, "encode", msg, wait=False)  # none now: the prefill worker encodes
        except ApiError as e:
            for k in todo:
                self._settle(k, error=e)
            if e.status < 500:
                raise
            return  # no encoder after all: the prefill worker encodes
        self.encode_jobs[flight.wire_id] = (worker.worker_id, list(todo))

    async def _encode_as_planned(self, flight, todo: dict[str, int]) -> None:
        """Each planned encoder gets its images under its own id (``<wire id>#e<j>``), all in
        parallel; an image whose encoder died meanwhile goes to the policy's pick of the others."""
        req, plan = flight.req, flight.plan
        alive = {w.worker_id: w for w in self.registry.alive("encode")}
        groups: dict[str, list[str]] = {}
        for k, i in todo.items():
            wid = plan.encoders[i]
            if wid not in alive:
                if not alive:  # the prefill worker encodes it
                    self._settle(k, error=ApiError(503, "no encode worker is available", "server_error"))
                    continue
                wid = plan.encoders[i] = self.policy.choose("encode", list(alive.values()), req).worker_id
            groups.setdefault(wid, []).append(k)
        flight.stage, flight.owner = "encode", None
        now = time.monotonic()
        for j, (wid, keys) in enumerate(sorted(groups.items())):
            sub = f"{flight.wire_id}#e{j}"
            self.encode_jobs[sub] = (wid, keys)
            self.holdings.add(req.request_id, wid)
            plan.started[wid] = now
            try:
                msg = m.EncodeRequest(request_id=sub, images=[req.images[todo[k]] for k in keys])
                await self._send(wid, msg)
            except PeerGone:  # gone since its last message: the prefill worker encodes these
                self.encode_jobs.pop(sub, None)
                self.holdings.finish(req.request_id, wid)
                for k in keys:
                    self._settle(k, error=ApiError(503, f"the encode worker {wid} is gone", "server_error"))

    def _settle(self, key: str, ref: m.ImageRef | None = None, error: Exception | None = None) -> None:
        fut = self.encoding.pop(key, None)
        if fut is not None and not fut.done():
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(ref)

    # ---- worker messages ----------------------------------------------------------------------
    def on_cache_event(self, wid: str, msg: m.KvCacheEvent | m.EmbeddingCacheEvent) -> None:
        rec = self.registry.workers.get(wid)
        # Events of another role epoch, or sent while it switches, describe caches it no longer has.
        if (rec is None or not rec.alive or rec.info.incarnation != msg.incarnation
                or rec.info.epoch != msg.epoch or rec.switch == "switching"):
            return
        if isinstance(msg, m.KvCacheEvent):
            self.index.kv_event(wid, msg.stored, msg.evicted)
        else:
            for ref in msg.stored:
                self.index.embedding_stored(wid, ref)
            for h in msg.evicted:
                self.index.embedding_evicted(wid, h)

    async def on_kv_taken(self, msg: m.KvTaken) -> bool:
        """Release a prefix export the asker has pulled; False when ``msg`` is of no export."""
        entry = self.prefix_exports.pop(msg.kv_key, None)
        if entry is None:
            return False
        await self._send_quiet(entry[1], m.ReleaseKv(kv_key=msg.kv_key))
        return True

    def on_encode_done(self, wid: str, msg: m.EncodeDone) -> None:
        """Settle every request waiting on these images, even when their own client left."""
        job = self.encode_jobs.pop(msg.request_id, None)
        if job is None:
            return
        if "#e" in msg.request_id:  # a planned encode's part: done there
            self.holdings.finish(_request_of_part(msg.request_id), wid)
        for k, ref in zip(job[1], msg.images):
            if self.enabled:
                self.index.learn_alias(k, ref.content_hash)
            self.index.embedding_stored(wid, ref)
            self._settle(k, ref)

    def on_encode_failed(self, wid: str, msg: m.RequestFailed) -> None:
        """An encode job failed: its waiters get the error (a 5xx: their prefill encodes)."""
        job = self.encode_jobs.pop(msg.request_id, None)
        if job is None:
            return
        if "#e" in msg.request_id:
            self.holdings.finish(_request_of_part(msg.request_id), wid)
        for k in job[1]:
            self._settle(k, error=ApiError(msg.status, msg.message, msg.type))

    def forget_worker(self, rec: WorkerRecord, why: str) -> None:
        """A dead or restarted worker holds nothing: its index entries, exports and encodes go."""
        self.index.forget_worker(rec.worker_id)
        for key, (asker, holder, rid) in list(self.prefix_exports.items()):
            if rec.worker_id in (asker, holder):
                del self.prefix_exports[key]
                if rec.worker_id == holder:  # the asker computes now instead of timing out
                    asyncio.get_running_loop().create_task(self._send_quiet(asker, _no_prefix(rid)))
        for rid, (wid, keys) in list(self.encode_jobs.items()):
            if wid == rec.worker_id:
                del self.encode_jobs[rid]
                for k in keys:
                    self._settle(k, error=ApiError(503, f"the encode worker {wid} failed ({why})", "server_error"))

    # ---- the prefix cache across workers ------------------------------------------------------
    async def on_prefix_query(self, wid: str, q: m.PrefixQuery) -> None:
        """Point the asker at the worker holding most of its prompt's blocks (via its export)."""
        self.stats["prefix_queries"] += 1
        alive = {w.worker_id for w in self.registry.workers.values()
                 if w.alive and w.role != "encode" and w.switch == "active"}
        holders, n = self.index.longest_prefix(q.block_hashes, wid, alive)
        if n > q.local_blocks and self.enabled:
            holder = self.policy.choose("kv_holder", [self.registry.workers[h] for h in holders],
                                        self._request_of(q.request_id))
            key = prefix_key(q.request_id, uuid.uuid4().hex[:8])
            self.prefix_exports[key] = (wid, holder.worker_id, q.request_id)
            try:
                await self._send(holder.worker_id,
                                 m.PrefixExport(request_id=q.request_id, block_hashes=q.block_hashes[:n], key=key))
                return
            except PeerGone:
                self.prefix_exports.pop(key, None)
        await self._send_quiet(wid, _no_prefix(q.request_id))

    async def on_prefix_exported(self, holder: str, msg: m.PrefixExported) -> None:
        entry = self.prefix_exports.get(msg.key)
        if entry is None:
            return
        asker = entry[0]
        rec = self.registry.workers.get(holder)
        if msg.num_blocks == 0 or rec is None:
            self.prefix_exports.pop(msg.key, None)
            await self._send_quiet(asker, _no_prefix(msg.request_id))
            return
        self.stats["prefix_hits"] += 1
        await self._send_quiet(asker, m.PrefixAnswer(request_id=msg.request_id, key=msg.key,
                                                     holder=rec.info.transfer, num_blocks=msg.num_blocks))

    async def _send_quiet(self, wid: str, msg) -> None:
        try:
            await self._send(wid, msg)
        except PeerGone:
            pass


def _encode_here() -> m.ImageRef:
    """An empty ref: the prefill worker encodes the raw image itself."""
    return m.ImageRef(content_hash="", num_tokens=0, grid_thw=None, holder={})


def _no_prefix(request_id: str) -> m.PrefixAnswer:
    """"Compute the blocks yourself"."""
    return m.PrefixAnswer(request_id=request_id, key="", holder={}, num_blocks=0)


def _request_of_part(part_id: str) -> str:
    """The request id of a planned encode's part id ``<request id>[@r<n>]#e<j>``."""
    base = part_id.partition("#e")[0]
    return base.rpartition("@r")[0] if "@r" in base else base


def _retrieve(fut: asyncio.Future) -> None:
    """Mark a settled future's exception as seen: its waiter may have gone (client left)."""
    if not fut.cancelled():
        fut.exception()
