"""The request lifecycle across the stages, behind the HTTP layer's ``Backend`` interface.

Aggregated (mixed workers):   router -> M: GenerateRequest -> TokenDelta* -> done
Disaggregated:                router -> E: EncodeRequest -> EncodeDone (image refs)
                              router -> P: GenerateRequest(prefill_only) -> TokenDelta (1st token)
                                           -> PrefillDone (KV waits at P)
                              router -> D: DecodeRequest -> D pulls KV from P -> KvTaken
                              router -> P: ReleaseKv;  D: TokenDelta* -> done
Without encode workers, P encodes its request's images itself (PD). Bytes
never pass through here: only control messages and the deltas for clients.

The core owns its parts and calls them through narrow interfaces: the
registry of workers and ``Holdings`` (which worker holds which request,
``router.registry``, ``router.holdings``), the cluster cache (``router.cluster_cache``:
a request skips work done before anywhere in the cluster, images already
encoded, prompt blocks already computed), tokenize calls (``router.tokenize_calls``),
the planner and policy (``router.plan``, ``router.policy``), live role switches
(``router.role_switch``), where stages go (``router.placement``), worker liveness
(``router.liveness``) and the sockets (``router.link``). Worker messages reach one
handler per message type (``router.inbox``).

Failures: when the worker running a request's stage dies (or fails it with a 503), the
request runs again under a new attempt id ``<id>@r<n>`` (``_recover``): from its prompt
when nothing was sent yet, else on a decode-capable worker from prompt + the tokens sent
(``Resume``). Output of an older attempt is dropped and its work aborted, so no token is
duplicated (docs/architecture.md, "Failures", has the whole story).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter

from bus import messages as m
from bus.sockets import PeerGone
from router.backend import ApiError, ApiRequest
from router.cluster_cache import ClusterCache
from router.flight import Flight, Flights, Superseded
from router.inbox import Inbox
from router.link import WorkerLink
from router.liveness import Liveness
from router.placement import Placement
from router.plan import Planner, Slo
from router.plan_metrics import PlanMetrics
from router.policy import DispatchPolicy, SloAware
from router.registry import Registry, WorkerRecord
from router.role_switch import RoleSwitcher
from router.tokenize_calls import TokenizeCalls

log = logging.getLogger("epd.router")


class RouterCore:
    def __init__(self, served_models: list[str], policy: DispatchPolicy | None = None,
                 expected: dict[str, int] | None = None, heartbeat_timeout: float = 5.0, metrics=None,
                 cluster_cache: bool = True, retry_budget: int = 2, worker_wait_s: float = 60.0,
                 slo: Slo | None = None, max_queue_s: float | None = None, plan_metrics: PlanMetrics | None = None,
                 cluster_index_bounds: dict[str, int] | None = None, switch_drain_s: float = 30.0):
        self.served_models = served_models
        self._policy = policy or SloAware()
        self.expected = expected or {}
        self.registry = Registry(heartbeat_timeout)
        self.holdings = self.registry.holdings  # which workers hold which request (router.holdings)
        self.flights = Flights()
        self.metrics = metrics
        self.retry_budget = retry_budget
        self.router_id = uuid.uuid4().hex  # workers see a restarted router by its new id
        self.recoveries: Counter[str] = Counter()  # stage -> requests moved off a failed worker
        self.link = WorkerLink()  # the worker and control sockets (router.link)
        self._send, self._send_quiet, self._spawn = self.link.send, self.link.send_quiet, self.link.spawn
        self.planner = Planner(self.registry, self.flights, slo)
        self.plan_metrics = plan_metrics or PlanMetrics()
        self.cache = ClusterCache(self.registry, self._policy, self._send, self._to, self.flights.request_of,
                                  self._count_recovery, cluster_cache, cluster_index_bounds)
        self.placement = Placement(self.registry, self.planner, self._policy, self.cache.images_to_encode,
                                   self.plan_metrics, worker_wait_s, max_queue_s)
        self.index = self.cache.index
        self.planner.index, self.planner.remote_prefix = self.index, cluster_cache
        self.tokens = TokenizeCalls(self.registry, self._send)
        # The Backend's optional calls, answered by the workers (the router holds no tokenizer).
        self.model_card, self.tokenize, self.detokenize = self.tokens.model_card, self.tokens.tokenize, \
            self.tokens.detokenize
        self.switches = RoleSwitcher(self.registry, self.flights, self.index, self._send, self._spawn,  # admin
                                     self._hand_over, self.expected, metrics, switch_drain_s)
        self.liveness = Liveness(self.registry, self.planner, self._send, self.router_id, self._worker_lost,
                                 self.switches.on_ready)
        live, cache = self.liveness, self.cache
        handlers = {  # one per message type (router.inbox)
            m.WorkerReady: live.on_ready, m.WorkerGaveUp: live.on_gave_up, m.Heartbeat: self._on_heartbeat,
            m.PullFailed: live.on_pull_failed, m.Tokenized: lambda wid, msg: self.tokens.on_answer(msg),
            m.KvCacheEvent: cache.on_cache_event, m.EmbeddingCacheEvent: cache.on_cache_event,
            m.PrefixQuery: cache.on_prefix_query, m.PrefixExported: cache.on_prefix_exported,
            m.KvTaken: self._on_kv_taken, m.EncodeDone: self._on_encode_done, m.PrefillDone: self._on_prefill_done,
            m.TokenDelta: self._on_token_delta, m.RequestFailed: self._on_request_failed,
        }
        self.inbox = Inbox(handlers, live.seen, self._fail_flight)

    @property
    def policy(self) -> DispatchPolicy:
        return self._policy

    @policy.setter
    def policy(self, policy: DispatchPolicy) -> None:
        self._policy = self.cache.policy = self.placement.policy = policy

    @property
    def max_queue_s(self) -> float | None:
        return self.placement.max_queue_s

    # ---- sockets ----------------------------------------------------------------------------
    async def start(self, worker_addr: str, control_addr: str | None = None) -> None:
        self.link.start(worker_addr, control_addr)
        self._spawn(self.inbox.run(self.link.sock))
        self._spawn(self._monitor())

    @property
    def worker_address(self) -> str:
        return self.link.address

    async def close(self, shutdown_workers: bool = False) -> None:
        await self.link.close(shutdown_workers)

    # ---- Backend ----------------------------------------------------------------------------
    def health(self) -> tuple[bool, dict]:
        counts = self.registry.counts()
        missing = {r: n - counts.get(r, 0) for r, n in self.expected.items() if counts.get(r, 0) < n}
        ready = not missing and bool(counts)
        return ready, {"workers": self.registry.health_view(), "missing": missing,
                       "recoveries": dict(self.recoveries)}

    async def generate(self, req: ApiRequest):
        flight = Flight(req)
        self.flights[req.request_id] = flight
        try:
            try:
                await self._dispatch_first(flight)
            except Superseded:
                pass  # a recovery took over while it was being dispatched
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

    async def _cleanup(self, flight: Flight) -> None:
        """Abort the request on every worker that holds part of it and free parked KV."""
        flight.done = True
        await self._abort_attempt(flight)

    async def _abort_attempt(self, flight: Flight) -> None:
        """Stop the current attempt wherever it runs; give back the KV it parked."""
        for wid in sorted(self.holdings.drop_request(flight.req.request_id)):
            rec = self.registry.workers.get(wid)
            if rec is not None and rec.alive:
                await self._send_quiet(wid, m.AbortRequest(request_id=flight.wire_id))
        if flight.kv is not None:
            holder, key = flight.kv
            await self._send_quiet(holder, m.ReleaseKv(kv_key=key))
        flight.kv = flight.owner = None

    # ---- dispatch -----------------------------------------------------------------------------
    async def _dispatch_first(self, flight: Flight) -> None:
        """Start a request from its prompt (first dispatch, or a recovery before any output)."""
        req, reg = flight.req, self.registry
        if req.model not in self.served_models:
            raise ApiError(404, f"the model {req.model!r} does not exist", code="model_not_found")
        has = {r: any(w.role == r for w in reg.workers.values()) for r in ("mixed", "prefill")}  # the shape
        flight.plan = self.placement.plan(flight, mixed=has["mixed"] and not has["prefill"])
        if has["mixed"] and not has["prefill"]:
            await self._to(flight, "mixed", flight.generate_msg(prefill_only=False))
        elif req.images and reg.alive("encode"):
            flight.refs = await self.cache.encode_stage(flight)
            await self._to(flight, "prefill", flight.generate_msg(True, flight.refs))
        else:
            await self._to(flight, "prefill", flight.generate_msg(prefill_only=True))

    async def _to(self, flight: Flight, roles: str | tuple[str, ...], msg, wait: bool = True) -> WorkerRecord:
        """Send ``msg`` (of the current attempt) to a worker of ``roles``; it owns the stage now."""
        roles = (roles,) if isinstance(roles, str) else roles
        while True:
            worker = await self.placement.pick(flight, roles, wait)
            if msg.request_id != flight.wire_id:
                raise Superseded
            rid = flight.req.request_id
            self.holdings.add(rid, worker.worker_id)
            flight.stage, flight.owner = worker.role, (worker.worker_id, worker.info.incarnation)
            if flight.plan is not None:
                flight.plan.started[worker.worker_id] = time.monotonic()
            try:
                await self._send(worker.worker_id, msg)
                return worker
            except PeerGone:  # gone since its last message: count it dead, pick again
                self.holdings.remove(rid, worker.worker_id)
                flight.owner = None
                self.liveness.died(worker, "its connection is gone")

    def _count_recovery(self, stage: str) -> None:
        self.recoveries[stage] += 1

    # ---- worker messages ------------------------------------------------------------------------
    def _fail_flight(self, msg, e: ApiError) -> None:
        """A handler's error about a request: its client gets it (if it reads the current attempt)."""
        flight, current = self.flights.of(getattr(msg, "request_id", None) or "")
        if flight is not None and current:
            flight.queue.put_nowait(e)

    def _on_heartbeat(self, wid: str, msg: m.Heartbeat) -> None:
        rec = self.liveness.on_heartbeat(wid, msg)
        if rec is not None and self.metrics is not None:
            self.metrics.update_worker(rec)
            self.metrics.update_counts(self.registry.counts())
            self.metrics.update_cluster(self.index.stats(), self.cache.stats, self.index.capacity,
                                        self.index.evictions)

    async def _on_kv_taken(self, wid: str, msg: m.KvTaken) -> None:
        if await self.cache.on_kv_taken(msg):
            return  # a prefix export's copy
        flight, current = self.flights.of(msg.request_id)
        await self._release_kv(flight if current else None, msg.kv_key)

    async def _on_encode_done(self, wid: str, msg: m.EncodeDone) -> None:
        self.cache.on_encode_done(wid, msg)  # settles every request waiting on these images
        flight = await self._owned_flight(wid, msg, any_owner=True)
        if flight is not None:
            self._done_with(flight, wid)  # the E stage goes on from the settled refs

    async def _on_prefill_done(self, wid: str, msg: m.PrefillDone) -> None:
        flight = await self._owned_flight(wid, msg)
        if flight is None:
            return
        flight.kv = (wid, msg.kv_key)
        self._done_with(flight, wid, keep=True)
        self._spawn(self._to_decode(flight, m.DecodeRequest(request_id=msg.request_id, header=msg.header,
                                                            kv_key=msg.kv_key, holder=msg.holder)))

    async def _on_token_delta(self, wid: str, msg: m.TokenDelta) -> None:
        flight = await self._owned_flight(wid, msg)
        if flight is not None:
            self._deliver(flight, msg)

    async def _on_request_failed(self, wid: str, msg: m.RequestFailed) -> None:
        if self.tokens.on_answer(msg):
            return
        self.cache.on_encode_failed(wid, msg)
        flight = await self._owned_flight(wid, msg)
        if flight is None or flight.stage == "encode":
            return  # the E stage settles it (router.cluster_cache)
        if msg.status == 503:  # a peer or a transfer failed, not the request: run it again
            self._spawn(self._recover(flight, flight.stage, f"{wid}: {msg.message}"))
        else:
            flight.queue.put_nowait(ApiError(msg.status, msg.message, msg.type))

    async def _owned_flight(self, wid: str, msg, any_owner: bool = False) -> Flight | None:
        """The flight ``msg`` is about when someone still reads it: its current attempt, from the
        worker owning its stage (or any worker, ``any_owner``). Else None, and what ``msg`` left
        behind is cleaned up: parked KV released, orphaned work aborted."""
        flight, current = self.flights.of(msg.request_id)
        if (flight is None or flight.done or not current
                or (not any_owner and flight.owner is not None and flight.owner[0] != wid)):
            # A finished request, its client gone, or an older attempt's owner: nobody reads this.
            if isinstance(msg, m.PrefillDone):
                await self._send_quiet(wid, m.ReleaseKv(kv_key=msg.kv_key))
            elif isinstance(msg, m.TokenDelta) and msg.finish_reason is None:
                await self._send_quiet(wid, m.AbortRequest(request_id=msg.request_id))  # stop orphaned work
            return None
        return flight

    async def _to_decode(self, flight: Flight, msg: m.DecodeRequest) -> None:
        try:
            await self._to(flight, "decode", msg)
        except Superseded:
            pass
        except ApiError as e:
            if not flight.done:
                flight.queue.put_nowait(e)

    def _deliver(self, flight: Flight, d: m.TokenDelta) -> None:
        if flight.plan is not None:
            ttft, tpot = self.plan_metrics.on_delta(flight.plan, flight.req, d,
                                                    first=not flight.tokens and flight.attempt == 0)
            if ttft is not None:
                self.planner.first_token(flight.plan, ttft)
            if tpot is not None:
                self.planner.finished(flight.plan, tpot)
        flight.queue.put_nowait(flight.take(d))
        if d.finish_reason is not None:
            flight.done = True
            self.holdings.drop_request(flight.req.request_id)

    def _done_with(self, flight: Flight, wid: str, keep: bool = False) -> None:
        if keep:  # its stage is done, but it keeps part of the request (parked KV)
            self.holdings.finish(flight.req.request_id, wid)
        else:
            self.holdings.remove(flight.req.request_id, wid)

    async def _release_kv(self, flight: Flight | None, key: str) -> None:
        if flight is None or flight.kv is None or flight.kv[1] != key:
            return
        holder, _ = flight.kv
        flight.kv = None
        self.holdings.remove(flight.req.request_id, holder)
        await self._send_quiet(holder, m.ReleaseKv(kv_key=key))

    # ---- failures -------------------------------------------------------------------------------
    async def _monitor(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            await self.liveness.check()
            if self.metrics is not None and hasattr(self.metrics, "update_resilience"):
                self.metrics.update_resilience(self.registry, self.recoveries)

    def _worker_lost(self, rec: WorkerRecord, why: str) -> None:
        """A dead or restarted incarnation holds nothing: requests it ran move elsewhere."""
        self.cache.forget_worker(rec, why)
        self.holdings.drop_worker(rec.worker_id)
        # Pulls waiting on it end now, not at their timeout.
        gone = m.WorkerGone(worker_id=rec.worker_id, transfer=rec.info.transfer, reason=why)
        self._spawn(self.link.broadcast(gone))
        me = (rec.worker_id, rec.info.incarnation)
        for flight in list(self.flights.values()):
            if flight.done:
                continue
            if flight.kv is not None and flight.kv[0] == rec.worker_id:
                flight.kv = None  # a decode still pulling it fails with a 503, and the request recovers
            if flight.owner == me and flight.stage != "encode":  # the E stage recovers on its own
                self._spawn(self._recover(flight, flight.stage, f"the {rec.role} worker {rec.worker_id} "
                                                                f"failed: {why}"))

    async def _hand_over(self, flight: Flight, stage: str, why: str) -> None:
        """A role switch moves ``flight`` off its draining worker (no retry budget charged)."""
        await self._recover(flight, stage, why, budgeted=False)

    async def _recover(self, flight: Flight, stage: str, why: str, budgeted: bool = True) -> None:
        """Run the request again under a new attempt id: from its prompt if the client has seen
        nothing yet, else on a decode-capable worker from prompt + the tokens it was sent."""
        if flight.done or flight.recovering:
            return
        flight.recovering = True
        rid = flight.req.request_id
        try:
            await self._abort_attempt(flight)
            if budgeted and flight.attempt - flight.handovers >= self.retry_budget:
                raise ApiError(503, f"{why}; this request was already moved {flight.attempt} time(s), "
                                    f"its retry budget: giving up", "server_error")
            flight.attempt += 1
            flight.handovers += not budgeted
            flight.wire_id = f"{rid}@r{flight.attempt}"
            self.recoveries[stage] += 1
            log.warning("request %s: %s; recovery %d from %d streamed token(s)", rid, why, flight.attempt,
                        len(flight.tokens))
            if flight.tokens:
                await self._to(flight, ("decode", "mixed"), flight.resume_msg())
            else:
                await self._dispatch_first(flight)
        except Superseded:
            pass
        except ApiError as e:
            if not flight.done:
                flight.queue.put_nowait(e)
        finally:
            flight.recovering = False

    def stats(self) -> dict:
        return {"requests_in_flight": len(self.flights), "workers": self.registry.counts(),
                "cluster_index": self.index.stats(), "cache": dict(self.cache.stats),
                "recoveries": dict(self.recoveries), "time": time.time()}
