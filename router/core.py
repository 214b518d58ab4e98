"""The request lifecycle across the stages, behind the HTTP layer's ``Backend`` interface.

Aggregated (mixed workers):   router -> M: GenerateRequest -> TokenDelta* -> done
Disaggregated:                router -> E: EncodeRequest -> EncodeDone (image refs)
                              router -> P: GenerateRequest(prefill_only) -> TokenDelta (1st token)
                                           -> PrefillDone (KV waits at P)
                              router -> D: DecodeRequest -> D pulls KV from P -> KvTaken
                              router -> P: ReleaseKv;  D: TokenDelta* -> done
Without encode workers, P encodes its request's images itself (PD). Bytes
never pass through here: only control messages and the deltas for clients.

The cluster cache (``router.cluster_cache``, mixed in) lets a request skip
work done before anywhere in the cluster: images already encoded, prompt
blocks already computed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from bus import messages as m
from bus.sockets import AsyncSocket, PeerGone
from router.backend import ApiDelta, ApiError, ApiRequest
from router.cluster_cache import ClusterCacheMixin
from router.policy import DispatchPolicy, LeastLoaded
from router.registry import Registry, WorkerRecord
from router.tokenize import TokenizeMixin

log = logging.getLogger("epd.router")


@dataclass
class _Flight:
    """One request in flight: where it is, and the queue its client reads."""

    req: ApiRequest
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    workers: set[str] = field(default_factory=set)  # every worker that holds some of its state
    kv: tuple[str, str] | None = None  # (prefill worker, key) while P still holds the KV
    done: bool = False


class RouterCore(ClusterCacheMixin, TokenizeMixin):
    def __init__(self, served_models: list[str], policy: DispatchPolicy | None = None,
                 expected: dict[str, int] | None = None, heartbeat_timeout: float = 5.0, metrics=None,
                 cluster_cache: bool = True):
        self.served_models = served_models
        self.policy = policy or LeastLoaded()
        self.expected = expected or {}
        self.registry = Registry(heartbeat_timeout)
        self.flights: dict[str, _Flight] = {}
        self.metrics = metrics
        self._tasks: list[asyncio.Task] = []
        self.pub: AsyncSocket | None = None
        self._init_cluster_cache(cluster_cache)
        self._init_tokenize()

    # ---- sockets ----------------------------------------------------------------------------
    async def start(self, worker_addr: str, control_addr: str | None = None) -> None:
        self.sock = AsyncSocket("router", worker_addr, bind=True)
        self.pub = AsyncSocket("pub", control_addr, bind=True) if control_addr else None
        self._tasks = [asyncio.create_task(self._recv_loop()), asyncio.create_task(self._monitor())]

    @property
    def worker_address(self) -> str:
        return self.sock.address

    async def close(self, shutdown_workers: bool = False) -> None:
        if shutdown_workers and self.pub is not None:
            await self.pub.send(m.Shutdown("router closing"), to=b"ctl")
        for t in self._tasks:
            t.cancel()
        self.sock.close()
        if self.pub is not None:
            self.pub.close()

    async def _send(self, worker: WorkerRecord, msg) -> None:
        try:
            await self.sock.send(msg, to=worker.worker_id.encode())
        except PeerGone:
            self._worker_died(worker, "its connection is gone")
            raise ApiError(503, f"{worker.role} worker {worker.worker_id} is unreachable", "server_error")

    # ---- Backend ----------------------------------------------------------------------------
    def health(self) -> tuple[bool, dict]:
        counts = self.registry.counts()
        missing = {r: n - counts.get(r, 0) for r, n in self.expected.items() if counts.get(r, 0) < n}
        ready = not missing and bool(counts)
        detail = {"workers": {w.worker_id: {"role": w.role, "alive": w.alive, "load": w.load,
                                            "incarnation": w.info.incarnation, "device": w.info.device}
                              for w in self.registry.workers.values()},
                  "missing": missing}
        return ready, detail

    async def generate(self, req: ApiRequest):
        flight = _Flight(req)
        self.flights[req.request_id] = flight
        try:
            await self._dispatch_first(flight)
            while True:
                item = await flight.queue.get()
                if isinstance(item, ApiError):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        except ApiError:
            await self._cleanup(flight)
            raise
        finally:
            # An unfinished request left by its client stays until ``abort`` cleans it up.
            if flight.done:
                self.flights.pop(req.request_id, None)

    async def abort(self, request_id: str) -> None:
        flight = self.flights.pop(request_id, None)
        if flight is not None and not flight.done:
            await self._cleanup(flight)

    async def _cleanup(self, flight: _Flight) -> None:
        """Abort the request on every worker that holds part of it and free parked KV."""
        flight.done = True
        rid = flight.req.request_id
        for wid in flight.workers:
            rec = self.registry.workers.get(wid)
            if rec is None or not rec.alive:
                continue
            rec.in_flight.discard(rid)
            try:
                await self.sock.send(m.AbortRequest(rid), to=wid.encode())
            except PeerGone:
                pass
        flight.kv = None

    # ---- dispatch -----------------------------------------------------------------------------
    def _pick(self, role: str, req: ApiRequest) -> WorkerRecord:
        candidates = self.registry.alive(role)
        if not candidates:
            raise ApiError(503, f"no {role} worker is available", "server_error")
        return self.policy.choose(role, candidates, req)

    async def _to(self, flight: _Flight, role: str, msg) -> WorkerRecord:
        worker = self._pick(role, flight.req)
        flight.workers.add(worker.worker_id)
        worker.in_flight.add(flight.req.request_id)
        await self._send(worker, msg)
        return worker

    def _generate_msg(self, req: ApiRequest, prefill_only: bool, refs=()) -> m.GenerateRequest:
        # Raw images ride along with refs: the worker encodes one itself if its pull fails.
        return m.GenerateRequest(req.request_id, req.sampling, req.messages, req.prompt, req.prompt_token_ids,
                                 req.add_generation_prompt, list(req.images), list(refs), prefill_only)

    # ---- worker messages ------------------------------------------------------------------------
    async def _recv_loop(self) -> None:
        while True:
            try:
                ident, msg = await self.sock.recv()
            except ValueError as e:  # a malformed message: log it, keep serving
                log.warning("dropping a malformed worker message: %s", e)
                continue
            wid = ident.decode() if ident else "?"
            try:
                await self._on_worker_message(wid, msg)
            except ApiError as e:
                rid = getattr(msg, "request_id", None)
                flight = self.flights.get(rid) if rid else None
                if flight is not None:
                    flight.queue.put_nowait(e)
            except Exception:  # noqa: BLE001 - one bad message never stops the router
                log.exception("error handling %s from %s", type(msg).__name__, wid)

    async def _on_worker_message(self, wid: str, msg) -> None:
        if isinstance(msg, m.WorkerReady):
            old = self.registry.register(msg.info)
            if old is not None and old.info.incarnation != msg.info.incarnation:
                self._fail_requests_of(old, "it restarted")
            log.info("worker %s registered: %s on %s", wid, msg.info.role, msg.info.device)
            return
        if isinstance(msg, m.Heartbeat):
            rec = self.registry.heartbeat(msg)
            if rec is not None and self.metrics is not None:
                self.metrics.update_worker(rec)
                self.metrics.update_counts(self.registry.counts())
                self.metrics.update_cluster(self.index.stats(), self.cache_stats)
            return
        rec = self.registry.seen(wid)
        if self._on_tokenize_message(msg):
            return
        if await self._on_cache_message(wid, rec, msg):
            return
        flight = self.flights.get(getattr(msg, "request_id", ""))
        if isinstance(msg, m.KvTaken):
            await self._release_kv(flight, msg.kv_key)
            return
        if flight is None or flight.done:
            if isinstance(msg, m.PrefillDone):  # its client left: free the parked KV
                await self._send_quiet(wid, m.ReleaseKv(msg.kv_key))
            return
        if isinstance(msg, m.TokenDelta):
            self._deliver(flight, wid, msg)
        elif isinstance(msg, m.EncodeDone):
            self._done_with(flight, wid)  # _encode_stage goes on from the settled refs
        elif isinstance(msg, m.PrefillDone):
            flight.kv = (wid, msg.kv_key)
            self._done_with(flight, wid, keep=True)
            await self._to(flight, "decode", m.DecodeRequest(msg.request_id, msg.header, msg.kv_key, msg.holder))
        elif isinstance(msg, m.RequestFailed):
            flight.queue.put_nowait(ApiError(msg.status, msg.message, msg.type))

    def _deliver(self, flight: _Flight, wid: str, d: m.TokenDelta) -> None:
        logprobs = None
        if d.logprobs is not None:
            logprobs = [{"token_id": lp.token_id, "token": lp.token, "logprob": lp.logprob,
                         "top": [{"token_id": t.token_id, "token": t.token, "logprob": t.logprob}
                                 for t in lp.top]} for lp in d.logprobs]
        flight.queue.put_nowait(ApiDelta(d.text, list(d.token_ids), d.finish_reason, d.prompt_tokens,
                                         d.completion_tokens, d.cached_tokens, logprobs))
        if d.finish_reason is not None:
            flight.done = True
            for w in flight.workers:
                rec = self.registry.workers.get(w)
                if rec is not None:
                    rec.in_flight.discard(flight.req.request_id)

    def _done_with(self, flight: _Flight, wid: str, keep: bool = False) -> None:
        rec = self.registry.workers.get(wid)
        if rec is not None:
            rec.in_flight.discard(flight.req.request_id)
        if not keep:
            flight.workers.discard(wid)

    async def _release_kv(self, flight: _Flight | None, key: str) -> None:
        if flight is None or flight.kv is None:
            return
        holder, _ = flight.kv
        flight.kv = None
        flight.workers.discard(holder)
        await self._send_quiet(holder, m.ReleaseKv(key))

    async def _send_pub(self, msg) -> None:
        try:
            await self.pub.send(msg, to=b"ctl")
        except Exception:  # noqa: BLE001 - a broadcast is best effort
            log.exception("broadcasting %s failed", type(msg).__name__)

    async def _send_quiet(self, wid: str, msg) -> None:
        try:
            await self.sock.send(msg, to=wid.encode())
        except PeerGone:
            pass

    # ---- failures -------------------------------------------------------------------------------
    async def _monitor(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            for rec in self.registry.expire():
                self._worker_died(rec, f"no heartbeat for {self.registry.heartbeat_timeout:.0f} s")

    def _worker_died(self, rec: WorkerRecord, why: str) -> None:
        rec.alive = False
        log.error("%s worker %s is dead: %s", rec.role, rec.worker_id, why)
        self._fail_requests_of(rec, why)

    def _fail_requests_of(self, rec: WorkerRecord, why: str) -> None:
        self._forget_cache_of(rec, why)
        if self.pub is not None:  # pulls waiting on it end now, not at their timeout
            asyncio.get_running_loop().create_task(
                self._send_pub(m.WorkerGone(rec.worker_id, rec.info.transfer, why)))
        for flight in list(self.flights.values()):
            if rec.worker_id in flight.workers and not flight.done:
                flight.queue.put_nowait(ApiError(
                    503, f"the {rec.role} worker {rec.worker_id} serving this request failed ({why})",
                    "server_error"))
                flight.workers.discard(rec.worker_id)

    def stats(self) -> dict:
        return {"requests_in_flight": len(self.flights), "workers": self.registry.counts(),
                "cluster_index": self.index.stats(), "cache": dict(self.cache_stats), "time": time.time()}

