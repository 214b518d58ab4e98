"""One plan per request, chosen at admission: which encoder gets which image, which prefill
worker, which decode worker, and what that is predicted to cost.

``Planner`` is the router core's component for it. It keeps each worker's cost model
(``router.cost_model``, corrected by heartbeat timings), counts the request's tokens
(``router.request_size``), and prices a candidate plan:

    TTFT = max(prefill queue, images ready) + prefill(prompt - cached, on top of cached)
           [+ a prefix pull when another worker holds more of it] [+ own encode without E]
    cached = the prompt's leading blocks the worker's prefix cache holds, or another worker's
             that it would pull through the cluster cache (``router.prefix_price``)
    images ready = per encoder: its queue + its share of the images (largest first, each to
                   the encoder that finishes it first), plus a pull
    TPOT = the decode worker's step with this request added to its batch and context

A worker's queue is the predicted work of the requests it runs (``WorkerRecord.in_flight``,
read from ``router.holdings``) that has not run yet. The policy (``router.policy``) picks the plan; the core follows it stage
by stage, re-planning the rest when a planned worker is gone.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import deque
from dataclasses import dataclass, field

from router.cost_model import WorkerCost
from router.prefix_price import PREFIX_PULL_S, PrefixView
from router.request_size import PromptSizer, RequestSize, estimate

log = logging.getLogger("epd.router")
# The learned TTFT/TPOT offsets: the median of the last residuals (actual - modelled), not a mean:
# on a shared host one descheduled request is off by 10x, and one such outlier would drag a mean
# (and so every prediction after it) far from the typical request.
OFFSET_WINDOW = 32
PULL_S = 0.002  # one embedding pull between workers of a host (perf/bench_transfer.py: ~1-2 ms)


@dataclass
class Plan:
    size: RequestSize
    encoders: list[str | None] = field(default_factory=list)  # per image; None: cached / the prefill encodes
    prefill: str | None = None  # prefill or mixed worker
    decode: str | None = None
    ttft_s: float = 0.0  # predicted
    tpot_s: float = 0.0  # predicted
    wait_s: float = 0.0  # predicted queueing before its work starts (admission)
    cached_images: int = 0
    cached_tokens: int = 0  # of the prompt, in the prefill worker's prefix cache or pulled to it
    work: dict[str, float] = field(default_factory=dict)  # worker -> predicted seconds of its stage
    started: dict[str, float] = field(default_factory=dict)  # worker -> when it got the stage
    policy: str = ""
    slo: Slo | None = None
    admitted_at: float = 0.0  # time.monotonic() at admission
    first_token_at: float | None = None
    tokens: int = 0  # output tokens delivered
    overhead_s: float = 0.0  # the learned TTFT offset included in ttft_s
    tpot_overhead_s: float = 0.0  # the learned TPOT offset included in tpot_s
    parts: dict[str, float] = field(default_factory=dict)  # the TTFT's terms, for the log and the bench

    def worker_for(self, roles: tuple[str, ...]) -> str | None:
        """The planned worker of a stage (``roles`` as the core asks for it), or None."""
        if roles[0] == "decode":
            return self.decode
        if roles[0] in ("prefill", "mixed"):
            return self.prefill
        if roles[0] == "encode":
            return next((e for e in self.encoders if e), None)
        return None

    def to_dict(self) -> dict:
        return {"encoders": self.encoders, "prefill": self.prefill, "decode": self.decode,
                "ttft_s": round(self.ttft_s, 4), "tpot_s": round(self.tpot_s, 5), "wait_s": round(self.wait_s, 4),
                "prompt_tokens": self.size.prompt_tokens, "cached_tokens": self.cached_tokens,
                "cached_images": self.cached_images}


@dataclass
class Slo:
    ttft_s: float | None = None
    tpot_s: float | None = None

    @classmethod
    def of(cls, default: Slo, override: dict | None) -> Slo:
        if not override:
            return default
        ttft, tpot = override.get("ttft_ms"), override.get("tpot_ms")
        return cls(ttft / 1e3 if ttft is not None else default.ttft_s,
                   tpot / 1e3 if tpot is not None else default.tpot_s)


class Planner:
    """Cost models, request sizes and plan prices; needs the core's registry and flights."""

    def __init__(self, registry, flights: dict, slo: Slo | None = None):
        self.registry = registry
        self.flights = flights
        self.slo = slo or Slo()
        self.costs: dict[tuple[str, str], WorkerCost] = {}  # (worker id, incarnation) -> model
        # Actual TTFT - modelled (the hops, transfers, tokenization and queueing no step timing
        # sees; negative when the profiles ran on a busier host), added to every TTFT prediction:
        # one for requests with an E stage (its extra hops and pulls), one without; the same of
        # TPOT. Each a running median (``OFFSET_WINDOW``). Shared by the workers, not one each:
        # what sets one worker apart (its speed, its queue) is measured by its steps; a per-worker
        # offset made an unlucky first request (descheduled: 10x its prediction) price that worker
        # out, and a worker sent nothing never learns it was wrong (seen: the fast prefill worker
        # of two got 9 of 96 requests).
        self.overhead: dict[str, float] = {}
        self.tpot_overhead: dict[str, float] = {}
        self._residuals: dict[str, deque] = {}
        self._sizer: PromptSizer | None = None
        self._sizer_dir: str | None = None
        self.index = None  # the cluster index (``router.cluster_index``), set by the core
        self.remote_prefix = False  # whether a worker can pull a prefix another one holds

    # ---- what workers tell ------------------------------------------------------------------
    def on_ready(self, info) -> None:
        self.costs[(info.worker_id, info.incarnation)] = WorkerCost(getattr(info, "cost_model", None))
        if self._sizer_dir is None and info.model:
            self._sizer_dir = info.model

    def on_heartbeat(self, hb) -> None:
        cost = self.costs.get((hb.worker_id, hb.incarnation))
        if cost is not None:
            for row in getattr(hb, "timings", None) or ():
                cost.observe(row)

    def cost(self, rec) -> WorkerCost:
        key = (rec.worker_id, rec.info.incarnation)
        if key not in self.costs:
            self.costs[key] = WorkerCost(getattr(rec.info, "cost_model", None))
        return self.costs[key]

    # ---- the request's size -------------------------------------------------------------------
    def size(self, req) -> RequestSize:
        if self._sizer is None and self._sizer_dir is not None:
            try:
                self._sizer = PromptSizer(self._sizer_dir)
            except Exception as e:  # noqa: BLE001 - predictions fall back to an estimate
                log.warning("cannot count prompt tokens in the router (%s): estimating", e)
                self._sizer_dir = ""
        if self._sizer is not None:
            try:
                return self._sizer.count(req)
            except Exception as e:  # noqa: BLE001 - a template the router cannot render: estimate
                log.debug("prompt count failed: %s", e)
        return estimate(req)

    def prefix_view(self, req, size: RequestSize) -> PrefixView:
        alive = {w.worker_id for w in self.registry.workers.values() if w.alive and w.role != "encode"}
        return PrefixView(self.index, size, list(req.images), self.remote_prefix, alive)

    # ---- what workers hold now ----------------------------------------------------------------
    def queue_s(self, rec, now: float | None = None) -> float:
        """Predicted seconds of work already sent to ``rec`` and not done yet."""
        now = time.monotonic() if now is None else now
        total = 0.0
        for rid in rec.in_flight:
            flight = self.flights.get(rid)
            plan = getattr(flight, "plan", None)
            if plan is None:
                continue
            work = plan.work.get(rec.worker_id, 0.0)
            elapsed = now - plan.started.get(rec.worker_id, now)
            total += max(work - elapsed, 0.1 * work)
        return total

    def decode_load(self, rec) -> tuple[int, int]:
        """(sequences, context tokens) on a decode-capable worker, this router's requests counted."""
        seqs, ctx = 0, 0
        for rid in rec.in_flight:
            flight = self.flights.get(rid)
            plan = getattr(flight, "plan", None)
            seqs += 1
            ctx += (plan.size.prompt_tokens if plan else 0) + len(getattr(flight, "tokens", ()) or ())
        block = max(rec.info.block_size, 1)
        return max(seqs, rec.running), max(ctx, rec.kv_blocks_used * block if rec.role != "prefill" else 0)

    # ---- prices -------------------------------------------------------------------------------
    def assign_images(self, size: RequestSize, todo: list[int], encoders: list, spread: bool,
                      now: float) -> tuple[dict[int, str], float, dict[str, float]]:
        """Images ``todo`` (indices) to encoders, largest first, each to the one that finishes it
        first (``spread``) or all to the first; (assignment, when all are ready, work per encoder)."""
        if not todo or not encoders:
            return {}, 0.0, {}
        free = {e.worker_id: self.queue_s(e, now) for e in encoders}
        costs = {e.worker_id: self.cost(e) for e in encoders}
        mine: dict[str, list[int]] = {e.worker_id: [] for e in encoders}
        work: dict[str, float] = {}
        assignment: dict[int, str] = {}

        def busy(wid: str, extra: list[int]) -> float:
            imgs = mine[wid] + extra
            return costs[wid].encode_s(len(imgs), sum(size.image_tokens[i] for i in imgs))

        for i in sorted(todo, key=lambda i: -size.image_tokens[i]):
            if spread:
                wid = min(mine, key=lambda w: (free[w] + busy(w, [i]), w))
            else:
                wid = encoders[0].worker_id
            mine[wid].append(i)
            assignment[i] = wid
        ready = 0.0
        for wid, imgs in mine.items():
            if imgs:
                work[wid] = busy(wid, [])
                ready = max(ready, free[wid] + work[wid] + PULL_S * len(imgs))
        return assignment, ready, work

    def price(self, plan: Plan, size: RequestSize, prefill, decode, images_ready: float, own_encode: list[int],
              max_tokens: int, now: float, prefix: PrefixView | None = None) -> None:
        """Fill ``plan``'s predictions for these workers (``prefix``: what their caches hold)."""
        cost = self.cost(prefill)
        queue = self.queue_s(prefill, now)
        local, pulled = prefix.cached(prefill.worker_id, prefill.info.block_size) if prefix else (0, 0)
        cached = plan.cached_tokens = local + pulled
        # The runner encodes only the images a computed chunk needs: not those wholly cached.
        own_encode = [i for i in own_encode if not size.image_offsets
                      or size.image_offsets[i] + size.image_tokens[i] > cached]
        encode = cost.encode_s(len(own_encode), sum(size.image_tokens[i] for i in own_encode))
        prefill_s = cost.prefill_s(size.prompt_tokens - cached, cached) + (PREFIX_PULL_S if pulled else 0.0)
        plan.prefill = prefill.worker_id
        plan.work[prefill.worker_id] = encode + prefill_s
        raw = max(queue, images_ready) + encode + prefill_s
        plan.overhead_s = max(self.overhead.get(_offset_key(plan), 0.0), -0.9 * raw)
        plan.ttft_s = raw + plan.overhead_s
        plan.parts = {"queue": queue, "images": images_ready, "encode": encode, "prefill": prefill_s,
                      "overhead": plan.overhead_s}
        plan.wait_s = max(queue, plan.wait_s)
        target = decode or prefill
        seqs, ctx = self.decode_load(target)
        plan.decode = decode.worker_id if decode is not None else None
        raw = self.cost(target).decode_step_s(seqs + 1, ctx + size.prompt_tokens + max_tokens // 2)
        plan.tpot_overhead_s = max(self.tpot_overhead.get("tpot", 0.0), -0.9 * raw)
        plan.tpot_s = raw + plan.tpot_overhead_s

    def least_wait(self, x) -> float:
        """The shortest predicted queueing of any plan for ``x`` (``PlanInputs``): the least busy
        prefill worker, after the least busy encoder when images need one."""
        now = time.monotonic()
        wait = min(self.queue_s(p, now) for p in x.prefills)
        if x.todo and x.encoders:
            wait = max(wait, min(self.queue_s(e, now) for e in x.encoders))
        return wait

    def first_token(self, plan: Plan, ttft_s: float) -> None:
        """A planned request's actual TTFT: learn the TTFT offset."""
        if plan.prefill is None:
            return
        self._learn(self.overhead, _offset_key(plan), ttft_s - (plan.ttft_s - plan.overhead_s))

    def finished(self, plan: Plan, tpot_s: float) -> None:
        """A planned request's actual TPOT: learn the TPOT offset."""
        worker = plan.decode or plan.prefill
        if worker is not None:
            self._learn(self.tpot_overhead, "tpot", tpot_s - (plan.tpot_s - plan.tpot_overhead_s))

    def meets(self, plan: Plan, slo: Slo) -> bool:
        return slo.tpot_s is None or plan.tpot_s <= slo.tpot_s

    def _learn(self, table: dict[str, float], key: str, residual: float) -> None:
        window = self._residuals.setdefault(key, deque(maxlen=OFFSET_WINDOW))
        window.append(residual)
        table[key] = statistics.median(window)


def _offset_key(plan: Plan) -> str:
    """Requests whose images an encode worker ran pay its hops and pulls: learned apart."""
    return "ttft+E" if any(plan.encoders) else "ttft"
