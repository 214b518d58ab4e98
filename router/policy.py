"""Every dispatch decision goes through one interface: ``DispatchPolicy``.

At admission ``plan`` picks the whole route of a request (encoder per image, prefill worker,
decode worker) and ``router.plan.Planner`` prices it (predicted TTFT and TPOT); the core
follows the plan stage by stage. ``choose`` picks one worker of a role alone: a stage whose
planned worker is gone (recovery re-plans the rest), and the prefix-cache holder.

- ``round_robin`` / ``least_loaded``: baselines, one worker per role by their rule, all of a
  request's images on one encoder;
- ``slo_aware``: images spread over the encoders by predicted finish time (largest first), and
  of the (prefill, decode) pairs whose predicted TPOT meets the SLO, the lowest predicted TTFT
  (ties: most of the prompt cached, then least load); when none meets it, the lowest TPOT. A
  prefill worker holding the prompt's prefix is predicted faster by what it need not compute,
  so it wins when that outweighs its queue (the baselines ignore caches).
"""

from __future__ import annotations

import itertools
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

from router.backend import ApiRequest
from router.plan import Plan, Planner, Slo
from router.prefix_price import PrefixView
from router.registry import WorkerRecord
from router.request_size import RequestSize


@dataclass
class PlanInputs:
    """What a policy plans from: the request, its size, the images that need an encode
    (neither cached nor being encoded for another request) and the live candidates."""

    req: ApiRequest
    size: RequestSize
    todo: list[int]
    encoders: list[WorkerRecord]
    prefills: list[WorkerRecord]  # prefill or mixed workers; never empty
    decodes: list[WorkerRecord]  # empty when prefills are mixed workers
    slo: Slo
    max_tokens: int
    prefix: PrefixView | None = None  # the prompt's blocks in the workers' prefix caches


class DispatchPolicy(ABC):
    name: str

    @abstractmethod
    def choose(self, role: str, candidates: list[WorkerRecord], request: ApiRequest | None) -> WorkerRecord:
        """Pick one of ``candidates`` (all alive, all of ``role``; never empty)."""

    def plan(self, planner: Planner, x: PlanInputs) -> Plan:
        """One worker per role by ``choose``; every image to be encoded on one encoder."""
        now = time.monotonic()
        plan = Plan(x.size, [None] * len(x.size.image_tokens), policy=self.name)
        encoders = [self.choose("encode", x.encoders, x.req)] if x.encoders and x.todo else []
        assignment, ready, work = planner.assign_images(x.size, x.todo, encoders, False, now)
        prefill = self.choose(x.prefills[0].role, x.prefills, x.req)
        decode = self.choose("decode", x.decodes, x.req) if x.decodes else None
        return _finish(planner, plan, x, assignment, ready, work, prefill, decode, now)


def _finish(planner, plan, x, assignment, ready, work, prefill, decode, now) -> Plan:
    for i, wid in assignment.items():
        plan.encoders[i] = wid
    plan.work.update(work)
    plan.wait_s = max((planner.queue_s(w, now) for w in x.encoders if w.worker_id in work), default=0.0)
    own = [] if x.encoders else list(x.todo)  # no encoder: the prefill worker encodes
    planner.price(plan, x.size, prefill, decode, ready, own, x.max_tokens, now, x.prefix)
    return plan


class RoundRobin(DispatchPolicy):
    name = "round_robin"

    def __init__(self):
        self._counters: dict[str, itertools.count] = {}

    def choose(self, role, candidates, request):
        n = next(self._counters.setdefault(role, itertools.count()))
        ordered = sorted(candidates, key=lambda w: w.worker_id)
        return ordered[n % len(ordered)]


class LeastLoaded(DispatchPolicy):
    """Fewest requests in flight, then most free KV blocks, then id (deterministic)."""

    name = "least_loaded"

    def choose(self, role, candidates, request):
        return min(candidates, key=_load_key)


def _load_key(w: WorkerRecord):
    return (w.load, w.kv_blocks_used - w.kv_blocks_total, w.worker_id)


class SloAware(DispatchPolicy):
    """Lowest predicted TTFT among the plans whose predicted TPOT meets the SLO."""

    name = "slo_aware"

    def choose(self, role, candidates, request):
        return min(candidates, key=_load_key)

    def plan(self, planner, x):
        now = time.monotonic()
        assignment, ready, work = planner.assign_images(x.size, x.todo, x.encoders, True, now)
        best, best_key = None, None
        for prefill in x.prefills:
            for decode in x.decodes or [None]:
                plan = Plan(x.size, [None] * len(x.size.image_tokens), policy=self.name)
                _finish(planner, plan, x, assignment, ready, work, prefill, decode, now)
                meets = planner.meets(plan, x.slo)
                load = prefill.load + (decode.load if decode is not None else 0)
                # TTFT within a millisecond counts as a tie: identical idle workers differ by noise.
                key = (not meets, plan.tpot_s if not meets else 0.0, round(plan.ttft_s, 3), -plan.cached_tokens,
                       load, plan.tpot_s, prefill.worker_id, decode.worker_id if decode else "")
                if best_key is None or key < best_key:
                    best, best_key = plan, key
        return best


POLICIES = {p.name: p for p in (RoundRobin, LeastLoaded, SloAware)}


def make_policy(name: str) -> DispatchPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown dispatch policy {name!r}; choose one of {sorted(POLICIES)}")
    return POLICIES[name]()
