"""Where a request goes: its plan at admission (and the 429 when every plan would queue too
long), and the worker for each stage as it is dispatched (the planned one while it is alive,
else the policy's pick; while none is alive but one may come back, a wait, then a 503).

A component of ``RouterCore``: it reads the registry and the planner, asks the policy, and
sends nothing.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Callable

from router.backend import ApiError
from router.flight import Flight
from router.plan import Plan, Planner, Slo
from router.plan_metrics import PlanMetrics
from router.policy import DispatchPolicy, PlanInputs
from router.registry import Registry, WorkerRecord


class Placement:
    """``images_to_encode(req)`` is the cluster cache's: which images this request must encode."""

    def __init__(self, registry: Registry, planner: Planner, policy: DispatchPolicy,
                 images_to_encode: Callable, plan_metrics: PlanMetrics, worker_wait_s: float = 60.0,
                 max_queue_s: float | None = None):
        self.registry, self.planner, self.policy = registry, planner, policy
        self._images_to_encode, self.plan_metrics = images_to_encode, plan_metrics
        self.worker_wait_s = worker_wait_s  # a missing role is waited for this long
        self.max_queue_s = max_queue_s  # admission: 429 when every plan waits longer (None: queue)

    async def pick(self, flight: Flight, roles: tuple[str, ...], wait: bool = True) -> WorkerRecord:
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

    def plan(self, flight: Flight, mixed: bool) -> Plan | None:
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
