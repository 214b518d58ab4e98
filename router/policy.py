"""Every dispatch decision goes through one interface: ``DispatchPolicy.choose``.

Later policies (SLO-aware costs, cache affinity via the cluster index) plug
in here without touching the request lifecycle.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod

from router.backend import ApiRequest
from router.registry import WorkerRecord


class DispatchPolicy(ABC):
    name: str

    @abstractmethod
    def choose(self, role: str, candidates: list[WorkerRecord], request: ApiRequest) -> WorkerRecord:
        """Pick one of ``candidates`` (all alive, all of ``role``; never empty)."""


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
        return min(candidates, key=lambda w: (w.load, w.kv_blocks_used - w.kv_blocks_total, w.worker_id))


POLICIES = {p.name: p for p in (RoundRobin, LeastLoaded)}


def make_policy(name: str) -> DispatchPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown dispatch policy {name!r}; choose one of {sorted(POLICIES)}")
    return POLICIES[name]()
