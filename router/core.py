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

Failures (``router.registry`` has the worker states). Each flight records the
worker and incarnation running its current stage and the tokens its client
has been sent. When that worker dies (or fails the request with a 503), the
request runs again under a new attempt id ``<id>@r<n>``: from its prompt when
nothing was sent yet, else on a decode-capable worker from prompt + the tokens
sent (``Resume``), which recomputes their KV and continues the same stream.
Output of an older attempt is dropped (and its work aborted), so a late delta
never duplicates a token. A lost encoder costs nothing: the prefill worker
encodes the raw images. ``retry_budget`` recoveries per request; a missing
role is waited for ``worker_wait_s`` while a worker of it may come back.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

from bus import messages as m
from bus.sockets import AsyncSocket, PeerGone
from router.backend import ApiDelta, ApiError, ApiRequest
from router.cluster_cache import ClusterCacheMixin
from router.plan import Plan, Planner, Slo
from router.plan_metrics import PlanMetrics
from router.policy import DispatchPolicy, PlanInputs, SloAware
from router.registry import Registry, WorkerRecord
from router.role_switch import RoleSwitcher
from router.tokenize_calls import TokenizeMixin

log = logging.getLogger("epd.router")


class _Superseded(Exception):
    """A send of an attempt that a recovery has replaced meanwhile: dropped."""


@dataclass
class _Flight:
    """One request in flight: where it is, what its client has seen, and the queue it reads."""

    req: ApiRequest
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    kv: tuple[str, str] | None = None  # (prefill worker, key) while P still holds the KV
    done: bool = False
    wire_id: str = ""  # the id the current attempt runs under on the workers
    attempt: int = 0  # recoveries so far
    stage: str = ""  # role of the worker running the current stage
    owner: tuple[str, str] | None = None  # (worker id, incarnation) running it
    refs: list[m.ImageRef] = field(default_factory=list)  # the E stage's result
    tokens: list[int] = field(default_factory=list)  # every token the client has been sent
    text_len: int = 0  # characters of the answer the client has been sent
    logprob_sum: float | None = None
    recovering: bool = False
    handovers: int = 0  # recoveries that were role switches' hand-overs, not failures (no budget)
    plan: Plan | None = None  # chosen at admission by the policy (router.plan)

    def __post_init__(self):
        self.wire_id = self.wire_id or self.req.request_id


class RouterCore(ClusterCacheMixin, TokenizeMixin):
    def __init__(self, served_models: list[str], policy: DispatchPolicy | None = None,
                 expected: dict[str, int] | None = None, heartbeat_timeout: float = 5.0, metrics=None,
                 cluster_cache: bool = True, retry_budget: int = 2, worker_wait_s: float = 60.0,
                 slo: Slo | None = None, max_queue_s: float | None = None, plan_metrics: PlanMetrics | None = None,
                 cluster_index_bounds: dict[str, int] | None = None, switch_drain_s: float = 30.0):
        self.served_models = served_models
        self.policy = policy or SloAware()
        self.expected = expected or {}
        self.registry = Registry(heartbeat_timeout)
        self.holdings = self.registry.holdings  # which workers hold which request (router.holdings)
        self.flights: dict[str, _Flight] = {}
        self.metrics = metrics
        self.retry_budget = retry_budget
        self.worker_wait_s = worker_wait_s
        self.router_id = uuid.uuid4().hex  # workers see a restarted router by its new id
        self.recoveries: Counter[str] = Counter()  # stage -> requests moved off a failed worker
        self._tasks: list[asyncio.Task] = []
        self._background: set[asyncio.Task] = set()
        self.pub: AsyncSocket | None = None
        self.planner = Planner(self.registry, self.flights, slo)
        self.max_queue_s = max_queue_s  # admission: 429 when every plan waits longer (None: queue)
        self.plan_metrics = plan_metrics or PlanMetrics()
        self._init_cluster_cache(cluster_cache, cluster_index_bounds)
        self.planner.index, self.planner.remote_prefix = self.index, cluster_cache
        self._init_tokenize()
        self.switches = RoleSwitcher(self, switch_drain_s)  # live role switches (admin)

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
        for t in [*self._tasks, *self._background]:
            t.cancel()
        self.sock.close()
        if self.pub is not None:
            self.pub.close()

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---- Backend ----------------------------------------------------------------------------
    def health(self) -> tuple[bool, dict]:
        counts = self.registry.counts()
        missing = {r: n - counts.get(r, 0) for r, n in self.expected.items() if counts.get(r, 0) < n}
        ready = not missing and bool(counts)
        now = time.monotonic()
        reg = self.registry
        detail = {"workers": {w.worker_id: {"role": w.role, "alive": w.alive, "state": reg.state(w, now),
                                            "load": w.load, "incarnation": w.info.incarnation,
                                            "device": w.info.device, "pid": w.info.pid,
                                            "restarts": reg.restarts.get(w.worker_id, 0),
                                            **({"given_up": reg.given_up[w.worker_id]}
                                               if w.worker_id in reg.given_up else {}),
                                            **({"suspect": w.suspect_why} if now < w.suspect_until else {})}
                              for w in reg.workers.values()},
                  "missing": missing, "recoveries": dict(self.recoveries)}
        return ready, detail

    async def generate(self, req: ApiRequest):
        flight = _Flight(req)
        self.flights[req.request_id] = flight
        try:
            try:
                await self._dispatch_first(flight)
            except _Superseded:
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

    async def _cleanup(self, flight: _Flight) -> None:
        """Abort the request on every worker that holds part of it and free parked KV."""
        flight.done = True
        await self._abort_attempt(flight)

    async def _abort_attempt(self, flight: _Flight) -> None:
        """Stop the current attempt wherever it runs; give back the KV it parked."""
        for wid in sorted(self.holdings.drop_request(flight.req.request_id)):
            rec = self.registry.workers.get(wid)
            if rec is not None and rec.alive:
                await self._send_quiet(wid, m.AbortRequest(flight.wire_id))
        if flight.kv is not None:
            holder, key = flight.kv
            await self._send_quiet(holder, m.ReleaseKv(key))
        flight.kv = flight.owner = None

    # ---- dispatch -----------------------------------------------------------------------------
    async def _pick(self, flight: _Flight, roles: tuple[str, ...], wait: bool = True) -> WorkerRecord:
        """A worker of one of ``roles`` for ``flight``; while none is alive but one may come back
        (restarting, or suspect), wait for it up to ``worker_wait_s``; else a 503 naming the gap."""
        reg, deadline = self.registry, None
        while True:
            if flight.done:
                raise ApiError(499, "the client left", "server_error")
            candidates = [w for r in roles for w in reg.alive(r)]
            planned = flight.plan.worker_for(roles) if flight.plan is not None else None
            for w in candidates:
                if w.worker_id == planned:
                    return w
            if candidates:  # no plan, or its worker is gone: this stage is chosen anew
                return self.policy.choose(roles[0], candidates, flight.req)
            awaited = [w for r in roles for w in reg.may_return(r)]
            names = " or ".join(roles)
            if not awaited or not wait:
                gone = [f"{w} ({why})" for w, why in reg.given_up.items() if reg.workers[w].role in roles]
                raise ApiError(503, f"no {names} worker is available" + (f"; given up: {', '.join(gone)}"
                                                                        if gone else ""), "server_error")
            now = time.monotonic()
            deadline = deadline or now + self.worker_wait_s
            if now >= deadline:
                raise ApiError(503, f"no {names} worker came back within {self.worker_wait_s:.0f} s ("
                               + ", ".join(f"{w.worker_id} {reg.state(w)}" for w in awaited) + ")",
                               "server_error")
            await asyncio.sleep(0.2)

    def _plan_request(self, flight: _Flight, mixed: bool) -> Plan | None:
        """The policy's plan for ``flight`` over the workers alive now (None when no prefill-capable
        worker is: the stages then wait or fail as usual). With admission on, a 429 when even the
        plan that waits least would queue past ``max_queue_s``."""
        req, reg = flight.req, self.registry
        prefills = reg.alive("mixed" if mixed else "prefill")
        if not prefills:
            return None
        encoders = reg.alive("encode") if req.images and not mixed else []
        todo = list(self._images_to_encode(req)[2].values()) if encoders else list(range(len(req.images)))
        size = self.planner.size(req)
        slo = Slo.of(self.planner.slo, getattr(req, "slo", None))
        max_tokens = req.sampling.get("max_tokens") or 16
        inputs = PlanInputs(req, size, todo, encoders, prefills, [] if mixed else reg.alive("decode"), slo, max_tokens,
                            self.planner.prefix_view(req, size))
        plan = self.policy.plan(self.planner, inputs)
        plan.slo = slo
        old = flight.plan
        plan.admitted_at = old.admitted_at if old is not None else time.monotonic()
        if self.max_queue_s is not None and flight.attempt == 0:
            wait = self.planner.least_wait(inputs)
            if wait > self.max_queue_s:
                self.plan_metrics.rejected.labels(reason="queue").inc()
                raise ApiError(429, f"the server is busy: the shortest predicted queue is {wait:.1f} s, over the "
                                    f"limit of {self.max_queue_s:g} s; retry later", type="requests",
                               code="rate_limit_exceeded",
                               headers={"Retry-After": str(max(1, math.ceil(wait - self.max_queue_s)))})
        return plan

    async def _to(self, flight: _Flight, roles: str | tuple[str, ...], msg, wait: bool = True) -> WorkerRecord:
        """Send ``msg`` (of the current attempt) to a worker of ``roles``; it owns the stage now."""
        roles = (roles,) if isinstance(roles, str) else roles
        while True:
            worker = await self._pick(flight, roles, wait)
            if msg.request_id != flight.wire_id:
                raise _Superseded
            rid = flight.req.request_id
            self.holdings.add(rid, worker.worker_id)
            flight.stage, flight.owner = worker.role, (worker.worker_id, worker.info.incarnation)
            if flight.plan is not None:
                flight.plan.started[worker.worker_id] = time.monotonic()
            try:
                await self.sock.send(msg, to=worker.worker_id.encode())
                return worker
            except PeerGone:  # gone since its last message: count it dead, pick again
                self.holdings.remove(rid, worker.worker_id)
                flight.owner = None
                self._worker_died(worker, "its connection is gone")

    def _generate_msg(self, flight: _Flight, prefill_only: bool, refs=(), resume: m.Resume | None = None):
        # Raw images ride along with refs: the worker encodes one itself if its pull fails.
        req = flight.req
        return m.GenerateRequest(flight.wire_id, req.sampling, req.messages, req.prompt, req.prompt_token_ids,
                                 req.add_generation_prompt, list(req.images), list(refs), prefill_only, resume)

    def _flight_of(self, rid: str) -> tuple[_Flight | None, bool]:
        """The flight a worker's request id belongs to, and whether it names the current attempt."""
        flight = self.flights.get(rid)
        if flight is None and "@r" in rid:
            flight = self.flights.get(rid.rpartition("@r")[0])
        return flight, flight is not None and flight.wire_id == rid

    # ---- worker messages ------------------------------------------------------------------------
    async def _recv_loop(self) -> None:
        while True:
            try:
                ident, msg = await self.sock.recv()
            except ValueError as e:  # a malformed message: log it, keep serving
                log.warning("dropping a malformed worker message: %s", e)
                continue
            wid = ident.decode() if ident else "?"
            # A step's batch is handled delta by delta: each passes the ownership checks alone.
            for one in msg.deltas if isinstance(msg, m.TokenDeltas) else (msg,):
                await self._on_one_message(wid, one)

    async def _on_one_message(self, wid: str, msg) -> None:
        try:
            await self._on_worker_message(wid, msg)
        except ApiError as e:
            flight, current = self._flight_of(getattr(msg, "request_id", None) or "")
            if flight is not None and current:
                flight.queue.put_nowait(e)
        except Exception:  # noqa: BLE001 - one bad message never stops the router
            log.exception("error handling %s from %s", type(msg).__name__, wid)

    async def _on_worker_message(self, wid: str, msg) -> None:
        if isinstance(msg, m.WorkerReady):
            prev = self.registry.workers.get(wid)
            old_role = prev.role if prev is not None else None
            rec, old = self.registry.register(msg.info)
            if rec.info is not msg.info:
                return  # of a role epoch it has left since
            self.switches.on_ready(rec, old_role)
            self.planner.on_ready(msg.info)
            if old is not None:
                self._worker_lost(old, "it restarted")
            log.info("worker %s registered: %s on %s%s", wid, msg.info.role, msg.info.device,
                     "" if old is None else f" (restart {self.registry.restarts.get(wid, 0)})")
            return
        if isinstance(msg, m.WorkerGaveUp):
            self.registry.given_up[msg.worker_id] = msg.reason or f"{msg.restarts} restarts"
            log.error("worker %s given up by its supervisor: %s", msg.worker_id, msg.reason)
            return
        if isinstance(msg, m.Heartbeat):
            was_dead = (rec := self.registry.workers.get(msg.worker_id)) is not None and not rec.alive
            rec = self.registry.heartbeat(msg)
            self.planner.on_heartbeat(msg)
            if rec is not None and was_dead:
                log.warning("worker %s is back (it was only silent)", wid)
            if rec is not None and self.metrics is not None:
                self.metrics.update_worker(rec)
                self.metrics.update_counts(self.registry.counts())
                self.metrics.update_cluster(self.index.stats(), self.cache_stats, self.index.capacity,
                                            self.index.evictions)
            return
        if isinstance(msg, m.PullFailed):
            self._pull_failed(wid, msg)
            return
        rec = self.registry.seen(wid)
        if self._on_tokenize_message(msg):
            return
        if await self._on_cache_message(wid, rec, msg):
            return
        flight, current = self._flight_of(getattr(msg, "request_id", ""))
        if isinstance(msg, m.KvTaken):
            await self._release_kv(flight if current else None, msg.kv_key)
            return
        if (flight is None or flight.done or not current
                or (flight.owner is not None and flight.owner[0] != wid and not isinstance(msg, m.EncodeDone))):
            # A finished request, its client gone, or an older attempt's owner: nobody reads this.
            if isinstance(msg, m.PrefillDone):
                await self._send_quiet(wid, m.ReleaseKv(msg.kv_key))
            elif isinstance(msg, m.TokenDelta) and msg.finish_reason is None:
                await self._send_quiet(wid, m.AbortRequest(msg.request_id))  # stop orphaned work
            return
        if isinstance(msg, m.TokenDelta):
            self._deliver(flight, wid, msg)
        elif isinstance(msg, m.EncodeDone):
            self._done_with(flight, wid)  # _encode_stage goes on from the settled refs
        elif isinstance(msg, m.PrefillDone):
            flight.kv = (wid, msg.kv_key)
            self._done_with(flight, wid, keep=True)
            self._spawn(self._to_decode(flight, m.DecodeRequest(msg.request_id, msg.header, msg.kv_key,
                                                                msg.holder)))
        elif isinstance(msg, m.RequestFailed):
            if flight.stage == "encode":
                return  # the E stage settles it (router.cluster_cache)
            if msg.status == 503:  # a peer or a transfer failed, not the request: run it again
                self._spawn(self._recover(flight, flight.stage, f"{wid}: {msg.message}"))
            else:
                flight.queue.put_nowait(ApiError(msg.status, msg.message, msg.type))

    async def _to_decode(self, flight: _Flight, msg: m.DecodeRequest) -> None:
        try:
            await self._to(flight, "decode", msg)
        except _Superseded:
            pass
        except ApiError as e:
            if not flight.done:
                flight.queue.put_nowait(e)

    def _deliver(self, flight: _Flight, wid: str, d: m.TokenDelta) -> None:
        logprobs = None
        if d.logprobs is not None:
            logprobs = [{"token_id": lp.token_id, "token": lp.token, "logprob": lp.logprob,
                         "top": [{"token_id": t.token_id, "token": t.token, "logprob": t.logprob}
                                 for t in lp.top]} for lp in d.logprobs]
            flight.logprob_sum = (flight.logprob_sum or 0.0) + sum(lp.logprob for lp in d.logprobs)
        if flight.plan is not None:
            ttft, tpot = self.plan_metrics.on_delta(flight.plan, flight.req, d,
                                                    first=not flight.tokens and flight.attempt == 0)
            if ttft is not None:
                self.planner.first_token(flight.plan, ttft)
            if tpot is not None:
                self.planner.finished(flight.plan, tpot)
        flight.tokens += d.token_ids
        flight.text_len += len(d.text)
        flight.queue.put_nowait(ApiDelta(d.text, list(d.token_ids), d.finish_reason, d.prompt_tokens,
                                         d.completion_tokens, d.cached_tokens, logprobs))
        if d.finish_reason is not None:
            flight.done = True
            self.holdings.drop_request(flight.req.request_id)

    def _done_with(self, flight: _Flight, wid: str, keep: bool = False) -> None:
        if keep:  # its stage is done, but it keeps part of the request (parked KV)
            self.holdings.finish(flight.req.request_id, wid)
        else:
            self.holdings.remove(flight.req.request_id, wid)

    async def _release_kv(self, flight: _Flight | None, key: str) -> None:
        if flight is None or flight.kv is None or flight.kv[1] != key:
            return
        holder, _ = flight.kv
        flight.kv = None
        self.holdings.remove(flight.req.request_id, holder)
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
        """Expire silent workers; ping the others (a closed connection shows at once)."""
        while True:
            await asyncio.sleep(0.5)
            for rec in self.registry.expire():
                self._worker_died(rec, f"no heartbeat for {self.registry.heartbeat_timeout:.0f} s")
            ping = m.Ping(self.router_id)
            for rec in [w for w in self.registry.workers.values() if w.alive]:
                try:
                    await self.sock.send(ping, to=rec.worker_id.encode())
                except PeerGone:
                    self._worker_died(rec, "its connection closed")
            if self.metrics is not None and hasattr(self.metrics, "update_resilience"):
                self.metrics.update_resilience(self.registry, self.recoveries)

    def _pull_failed(self, wid: str, msg: m.PullFailed) -> None:
        for rec in self.registry.workers.values():
            if rec.alive and rec.info.transfer == msg.holder:
                log.warning("worker %s is suspect: %s could not pull from it (%s)", rec.worker_id, wid, msg.reason)
                self.registry.suspect(rec, f"{wid} could not pull from it: {msg.reason}")

    def _worker_died(self, rec: WorkerRecord, why: str) -> None:
        if not rec.alive:
            return
        rec.alive = False
        log.error("%s worker %s is dead: %s", rec.role, rec.worker_id, why)
        self._worker_lost(rec, why)

    def _worker_lost(self, rec: WorkerRecord, why: str) -> None:
        """A dead or restarted incarnation holds nothing: requests it ran move elsewhere."""
        self._forget_cache_of(rec, why)
        self.holdings.drop_worker(rec.worker_id)
        if self.pub is not None:  # pulls waiting on it end now, not at their timeout
            self._spawn(self._send_pub(m.WorkerGone(rec.worker_id, rec.info.transfer, why)))
        me = (rec.worker_id, rec.info.incarnation)
        for flight in list(self.flights.values()):
            if flight.done:
                continue
            if flight.kv is not None and flight.kv[0] == rec.worker_id:
                flight.kv = None  # a decode still pulling it fails with a 503, and the request recovers
            if flight.owner == me and flight.stage != "encode":  # the E stage recovers on its own
                self._spawn(self._recover(flight, flight.stage, f"the {rec.role} worker {rec.worker_id} "
                                                                f"failed: {why}"))

    async def _recover(self, flight: _Flight, stage: str, why: str, budgeted: bool = True) -> None:
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
                resume = m.Resume(list(flight.tokens), flight.text_len, flight.logprob_sum)
                await self._to(flight, ("decode", "mixed"), self._generate_msg(flight, False, flight.refs, resume))
            else:
                await self._dispatch_first(flight)
        except _Superseded:
            pass
        except ApiError as e:
            if not flight.done:
                flight.queue.put_nowait(e)
        finally:
            flight.recovering = False

    def stats(self) -> dict:
        return {"requests_in_flight": len(self.flights), "workers": self.registry.counts(),
                "cluster_index": self.index.stats(), "cache": dict(self.cache_stats),
                "recoveries": dict(self.recoveries), "time": time.time()}
