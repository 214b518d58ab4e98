"""The router's half of the cluster cache, mixed into ``RouterCore``.

It owns the cluster index (``router.cluster_index``) and uses it two ways:

- E stage (``_encode_stage``): an image whose embedding an alive encode worker
  still holds is not encoded again (the prefill worker pulls it); one being
  encoded for another request is waited for, not encoded twice; only the rest
  goes to an encoder.
- Prefix: a prefill/mixed worker asks who holds more of its prompt's blocks
  (``PrefixQuery``); the holder of the longest run copies them out
  (``PrefixExport`` -> ``PrefixExported``) and the asker is told where to pull
  them (``PrefixAnswer``), releasing the copy with ``KvTaken``.

``cluster_cache=False`` (A/B runs) keeps the index but never reuses across
workers: every image is encoded, every prefix computed.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter

from bus import messages as m
from bus.sockets import PeerGone
from router.backend import ApiError
from router.cluster_index import ClusterIndex
from router.registry import WorkerRecord
from transfer.hash_keys import image_bytes_key, prefix_key


class ClusterCacheMixin:
    """Needs from its host: ``registry``, ``policy``, ``flights``, ``sock``, ``recoveries``, ``_to``,
    ``_flight_of``, ``_generate_msg`` and ``_send_quiet``."""

    def _init_cluster_cache(self, enabled: bool, index_bounds: dict[str, int] | None = None) -> None:
        self.index = ClusterIndex(**(index_bounds or {}))  # max_kv_entries, max_embedding_entries, max_aliases
        self.cluster_cache = enabled  # off: every image is encoded, every prefix computed (A/B runs)
        self.encoding: dict[str, asyncio.Future] = {}  # image bytes key -> its ImageRef, while encoding
        self.encode_jobs: dict[str, tuple[str, list[str]]] = {}  # request id -> (encode worker, bytes keys)
        self.prefix_exports: dict[str, tuple[str, str, str]] = {}  # store key -> (asker, holder, request id)
        self.cache_stats: Counter[str] = Counter(images_from_cluster_cache=0, images_encode_shared=0,
                                                 prefix_queries=0, prefix_hits=0)

    # ---- the E stage --------------------------------------------------------------------------
    async def _encode_stage(self, flight) -> list[m.ImageRef]:
        """One ref per image of the request: from the cluster index, from an encode already under
        way for another request, or from an encode of the rest sent now. An image whose encode
        failed with a worker (dead encoder, 503) gets an empty ref: the prefill worker encodes it;
        only a bad image (4xx) fails the request."""
        keys, refs, todo = self._images_to_encode(flight.req)
        self.cache_stats["images_from_cluster_cache"] += sum(r is not None for r in refs)
        waits = {k: self.encoding[k] for k, r in zip(keys, refs) if r is None and k in self.encoding}
        self.cache_stats["images_encode_shared"] += len(waits)
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
                    self.recoveries["encode"] += 1
        return [ref or got.get(k) or m.ImageRef("", 0, None, {}) for k, ref in zip(keys, refs)]

    def _images_to_encode(self, req) -> tuple[list[str], list, dict[str, int]]:
        """(bytes key per image, the cluster's ref per image or None, {key: index of its first
        image} for the images this request must encode: not held by an alive encoder, not being
        encoded for another request)."""
        if self.cluster_cache:
            keys = [image_bytes_key(b) for b in req.images]
        else:  # keys no other request shares: nothing found, nothing shared
            keys = [f"{req.request_id}#{i}" for i in range(len(req.images))]
        alive = {w.worker_id for w in self.registry.alive("encode")}
        refs: list[m.ImageRef | None] = [self.index.embedding_for(k, alive) if self.cluster_cache else None
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
            worker = await self._to(flight, "encode",
                                    m.EncodeRequest(flight.wire_id, [req.images[i] for i in todo.values()]),
                                    wait=False)  # no encoder now: the prefill worker encodes
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
            worker, sub = alive[wid], f"{flight.wire_id}#e{j}"
            self.encode_jobs[sub] = (wid, keys)
            self.holdings.add(req.request_id, wid)
            plan.started[wid] = now
            try:
                await self.sock.send(m.EncodeRequest(sub, [req.images[todo[k]] for k in keys]), to=wid.encode())
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

    async def _dispatch_first(self, flight) -> None:
        """Start a request from its prompt (first dispatch, or a recovery before any output)."""
        req, reg = flight.req, self.registry
        if req.model not in self.served_models:
            raise ApiError(404, f"the model {req.model!r} does not exist", code="model_not_found")
        has = {r: any(w.role == r for w in reg.workers.values()) for r in ("mixed", "prefill")}  # the shape
        flight.plan = self._plan_request(flight, mixed=has["mixed"] and not has["prefill"])
        if has["mixed"] and not has["prefill"]:
            await self._to(flight, "mixed", self._generate_msg(flight, prefill_only=False))
        elif req.images and reg.alive("encode"):
            flight.refs = await self._encode_stage(flight)
            await self._to(flight, "prefill", self._generate_msg(flight, True, flight.refs))
        else:
            await self._to(flight, "prefill", self._generate_msg(flight, prefill_only=True))

    # ---- worker messages ----------------------------------------------------------------------
    async def _on_cache_message(self, wid: str, rec: WorkerRecord | None, msg) -> bool:
        """Take what concerns the cluster cache; True when ``msg`` needs nothing more."""
        if isinstance(msg, (m.KvCacheEvent, m.EmbeddingCacheEvent)):
            # Events of another role epoch, or sent while it switches, describe caches it no longer has.
            if (rec is not None and rec.alive and rec.info.incarnation == msg.incarnation
                    and rec.info.epoch == msg.epoch and rec.switch != "switching"):
                if isinstance(msg, m.KvCacheEvent):
                    self.index.kv_event(wid, msg.stored, msg.evicted)
                else:
                    for ref in msg.stored:
                        self.index.embedding_stored(wid, ref)
                    for h in msg.evicted:
                        self.index.embedding_evicted(wid, h)
            return True
        if isinstance(msg, m.PrefixQuery):
            await self._prefix_query(wid, msg)
            return True
        if isinstance(msg, m.PrefixExported):
            await self._prefix_exported(wid, msg)
            return True
        if isinstance(msg, m.KvTaken) and msg.kv_key in self.prefix_exports:
            _, holder, _ = self.prefix_exports.pop(msg.kv_key)
            await self._send_quiet(holder, m.ReleaseKv(msg.kv_key))
            return True
        # Encode results settle every request waiting on them, even when their own client left.
        if isinstance(msg, m.EncodeDone):
            job = self.encode_jobs.pop(msg.request_id, None)
            if job is not None and "#e" in msg.request_id:  # a planned encode's part: done there
                self.holdings.finish(_request_of_part(msg.request_id), wid)
            if job is not None:
                for k, ref in zip(job[1], msg.images):
                    if self.cluster_cache:
                        self.index.learn_alias(k, ref.content_hash)
                    self.index.embedding_stored(wid, ref)
                    self._settle(k, ref)
        elif isinstance(msg, m.RequestFailed) and msg.request_id in self.encode_jobs:
            _, keys = self.encode_jobs.pop(msg.request_id)
            if "#e" in msg.request_id:
                self.holdings.finish(_request_of_part(msg.request_id), wid)
            for k in keys:
                self._settle(k, error=ApiError(msg.status, msg.message, msg.type))
        return False

    def _forget_cache_of(self, rec: WorkerRecord, why: str) -> None:
        """A dead or restarted worker holds nothing: its index entries, exports and encodes go."""
        self.index.forget_worker(rec.worker_id)
        for key, (asker, holder, rid) in list(self.prefix_exports.items()):
            if rec.worker_id in (asker, holder):
                del self.prefix_exports[key]
                if rec.worker_id == holder:  # the asker computes now instead of timing out
                    asyncio.get_running_loop().create_task(
                        self._send_quiet(asker, m.PrefixAnswer(rid, "", {}, 0)))
        for rid, (wid, keys) in list(self.encode_jobs.items()):
            if wid == rec.worker_id:
                del self.encode_jobs[rid]
                for k in keys:
                    self._settle(k, error=ApiError(503, f"the encode worker {wid} failed ({why})", "server_error"))

    # ---- the prefix cache across workers ------------------------------------------------------
    async def _prefix_query(self, wid: str, q: m.PrefixQuery) -> None:
        """Point the asker at the worker holding most of its prompt's blocks (via its export)."""
        self.cache_stats["prefix_queries"] += 1
        alive = {w.worker_id for w in self.registry.workers.values()
                 if w.alive and w.role != "encode" and w.switch == "active"}
        holders, n = self.index.longest_prefix(q.block_hashes, wid, alive)
        if n > q.local_blocks and self.cluster_cache:
            flight, _ = self._flight_of(q.request_id)
            holder = self.policy.choose("kv_holder", [self.registry.workers[h] for h in holders],
                                        flight.req if flight else None)
            key = prefix_key(q.request_id, uuid.uuid4().hex[:8])
            self.prefix_exports[key] = (wid, holder.worker_id, q.request_id)
            try:
                await self.sock.send(m.PrefixExport(q.request_id, q.block_hashes[:n], key),
                                     to=holder.worker_id.encode())
                return
            except PeerGone:
                self.prefix_exports.pop(key, None)
        await self._send_quiet(wid, m.PrefixAnswer(q.request_id, "", {}, 0))

    async def _prefix_exported(self, holder: str, msg: m.PrefixExported) -> None:
        entry = self.prefix_exports.get(msg.key)
        if entry is None:
            return
        asker = entry[0]
        rec = self.registry.workers.get(holder)
        if msg.num_blocks == 0 or rec is None:
            self.prefix_exports.pop(msg.key, None)
            await self._send_quiet(asker, m.PrefixAnswer(msg.request_id, "", {}, 0))
            return
        self.cache_stats["prefix_hits"] += 1
        await self._send_quiet(asker, m.PrefixAnswer(msg.request_id, msg.key, rec.info.transfer, msg.num_blocks))


def _request_of_part(part_id: str) -> str:
    """The request id of a planned encode's part id ``<request id>[@r<n>]#e<j>``."""
    base = part_id.partition("#e")[0]
    return base.rpartition("@r")[0] if "@r" in base else base


def _retrieve(fut: asyncio.Future) -> None:
    """Mark a settled future's exception as seen: its waiter may have gone (client left)."""
    if not fut.cancelled():
        fut.exception()
