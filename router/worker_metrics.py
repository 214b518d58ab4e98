"""Per-worker metrics fed by heartbeats, on the API's Prometheus registry.

Workers report their counts as running totals; the router exposes every ``*_total`` as a
Prometheus counter (``ReportedCounters``), never as a gauge: a restarted worker's totals start
again from 0, so the counter keeps what the previous incarnation counted and stays monotonic.
Encode workers run no prefill or decode: they report no KV pool.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client.core import CounterMetricFamily

from bus.messages import CACHE_COUNTERS
from router.metrics import ApiMetrics
from router.registry import WorkerRecord


class _Reported:
    """One label set of a reported counter: the running total a worker sends, made monotonic."""

    __slots__ = ("base", "last")

    def __init__(self):
        self.base = 0.0  # what earlier incarnations (or a reset reporter) had counted
        self.last = 0.0

    def set(self, value: float) -> None:
        """The reporter's running total now; a total lower than the last one means it started again."""
        if value < self.last:
            self.restarted()
        self.last = value

    def restarted(self) -> None:
        """The reporter started again from 0 (a new incarnation)."""
        self.base += self.last
        self.last = 0.0

    @property
    def value(self) -> float:
        return self.base + self.last


class ReportedCounters:
    """A counter family whose values are running totals reported by someone else (a worker's
    heartbeat, the router core's own tallies): ``labels(...).set(total)`` like a gauge, exposed
    as a Prometheus counter ``<name>_total``."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str] = ()):
        self.name = name.removesuffix("_total")
        self.documentation = documentation
        self.label_names = tuple(labels)
        self._children: dict[tuple[str, ...], _Reported] = {}

    def labels(self, **labels: str) -> _Reported:
        key = tuple(str(labels[k]) for k in self.label_names)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = _Reported()
        return child

    def restarted(self, worker: str) -> None:
        """Every label set of ``worker`` (the ``worker`` label) starts again from 0."""
        i = self.label_names.index("worker")
        for key, child in self._children.items():
            if key[i] == worker:
                child.restarted()

    def collect(self):
        family = CounterMetricFamily(self.name, self.documentation, labels=self.label_names)
        for key, child in self._children.items():
            family.add_metric(key, child.value)
        yield family


class WorkerMetrics:
    def __init__(self, api: ApiMetrics):
        g = api.gauge

        def c(name: str, documentation: str, labels: Sequence[str]) -> ReportedCounters:
            counters = ReportedCounters(name, documentation, labels)
            api.registry.register(counters)
            return counters

        self.kv_used = g("epd:kv_cache_blocks_used", "KV cache blocks in use (prefill, decode and mixed "
                         "workers).", ["worker", "role"])
        self.kv_blocks = g("epd:kv_cache_blocks_capacity", "KV cache blocks in the worker's pool.",
                           ["worker", "role"])
        self.kv_usage = g("epd:kv_cache_usage_perc", "Fraction of the worker's KV cache blocks in use (0-1).",
                          ["worker", "role"])
        self.running = g("epd:worker_requests_running", "Requests running on the worker.", ["worker", "role"])
        self.waiting = g("epd:worker_requests_waiting", "Requests queued on the worker.", ["worker", "role"])
        self.encoded = c("epd:images_encoded_total", "Images run through the vision encoder.",
                         ["worker", "role"])
        self.prefix_hits = c("epd:prefix_cache_hit_tokens_total", "Prompt tokens served from the prefix cache.",
                             ["worker", "role"])
        self.prefix_queries = c("epd:prefix_cache_query_tokens_total", "Prompt tokens looked up in the prefix "
                                "cache.", ["worker", "role"])
        self.pulls = c("epd:transfer_pulls_total", "Tensors pulled from peers, by transfer backend.",
                       ["worker", "role", "backend"])
        self.alive = g("epd:workers_alive", "Workers registered and heartbeating.", ["role"])
        self.cache = {name: c(f"epd:{name}_total", doc, ["worker", "role"]) for name, doc in CACHE_COUNTERS.items()}
        self.index = g("epd:cluster_index_entries", "Entries in the router's cluster index, by kind.", ["kind"])
        self.index_capacity = g("epd:cluster_index_capacity", "Most entries the router's cluster index keeps, by "
                                "kind (router.cluster_cache: max_kv_entries, max_embedding_entries, max_aliases).",
                                ["kind"])
        self.index_evictions = c("epd:cluster_index_evictions_total", "Entries the router's cluster index forgot "
                                 "because it was full (least recently used first), by kind.", ["kind"])
        self.recoveries = c("epd:request_recoveries_total", "Requests moved off a failed worker, by the "
                            "stage that failed (encode: the prefill worker encoded instead).", ["stage"])
        self.states = g("epd:workers", "Registered workers by state (alive, suspect, dead, given_up).",
                        ["role", "state"])
        self.restarts = c("epd:worker_restarts_total", "Times a worker registered again with a new incarnation.",
                          ["worker", "role"])
        self.router_cache = c("epd:cluster_cache_total", "Cluster-cache events seen by the router: images "
                              "served from an encode worker's cache or from another request's encode, "
                              "prefix queries and the ones another worker answered.", ["event"])
        self._per_worker = [self.encoded, self.prefix_hits, self.prefix_queries, self.pulls, *self.cache.values()]
        self._incarnations: dict[str, str] = {}

    def update_worker(self, rec: WorkerRecord) -> None:
        labels = {"worker": rec.worker_id, "role": rec.role}
        if self._incarnations.setdefault(rec.worker_id, rec.info.incarnation) != rec.info.incarnation:
            self._incarnations[rec.worker_id] = rec.info.incarnation
            for counters in self._per_worker:
                counters.restarted(rec.worker_id)
        if rec.role != "encode":
            self.kv_used.labels(**labels).set(rec.kv_blocks_used)
            self.kv_blocks.labels(**labels).set(rec.kv_blocks_total)
            self.kv_usage.labels(**labels).set(rec.kv_blocks_used / rec.kv_blocks_total if rec.kv_blocks_total else 0)
        self.running.labels(**labels).set(rec.running)
        self.waiting.labels(**labels).set(rec.waiting)
        self.encoded.labels(**labels).set(rec.images_encoded)
        self.prefix_hits.labels(**labels).set(rec.prefix_hit_tokens)
        self.prefix_queries.labels(**labels).set(rec.prefix_query_tokens)
        for backend, n in rec.transfer_pulls.items():
            self.pulls.labels(backend=backend, **labels).set(n)
        for name, n in rec.counters.items():
            counters = self.cache.get(name)
            if counters is not None:
                counters.labels(**labels).set(n)

    def forget_role(self, worker_id: str, role: str) -> None:
        """A worker switched away from ``role``: its gauges under that role go (running totals stay,
        their series simply stop)."""
        for gauge in (self.kv_used, self.kv_blocks, self.kv_usage, self.running, self.waiting):
            try:
                gauge.remove(worker_id, role)
            except KeyError:
                pass

    def update_cluster(self, index_stats: dict[str, int], router_stats: dict[str, int],
                       capacity: dict[str, int] | None = None, evictions: dict[str, int] | None = None) -> None:
        for kind, n in index_stats.items():
            self.index.labels(kind=kind).set(n)
        for kind, n in (capacity or {}).items():
            self.index_capacity.labels(kind=kind).set(n)
        for kind, n in (evictions or {}).items():
            self.index_evictions.labels(kind=kind).set(n)
        for event, n in router_stats.items():
            self.router_cache.labels(event=event).set(n)

    def update_resilience(self, registry, recoveries: dict[str, int]) -> None:
        for stage in ("encode", "prefill", "decode", "mixed"):
            self.recoveries.labels(stage=stage).set(recoveries.get(stage, 0))
        counts: dict[tuple[str, str], int] = {}
        for w in registry.workers.values():
            state = "given_up" if w.worker_id in registry.given_up else registry.state(w)
            counts[w.role, state] = counts.get((w.role, state), 0) + 1
            self.restarts.labels(worker=w.worker_id, role=w.role).set(registry.restarts.get(w.worker_id, 0))
        for role in ("encode", "prefill", "decode", "mixed"):
            for state in ("alive", "suspect", "dead", "given_up"):
                self.states.labels(role=role, state=state).set(counts.get((role, state), 0))

    def update_counts(self, counts: dict[str, int]) -> None:
        for role in ("encode", "prefill", "decode", "mixed"):
            self.alive.labels(role=role).set(counts.get(role, 0))
