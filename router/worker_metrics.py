"""Per-worker gauges fed by heartbeats, on the API's Prometheus registry."""

from __future__ import annotations

from bus.messages import CACHE_COUNTERS
from router.metrics import ApiMetrics
from router.registry import WorkerRecord


class WorkerMetrics:
    def __init__(self, api: ApiMetrics):
        g = api.gauge
        self.kv_used = g("epd:kv_cache_blocks_used", "KV cache blocks in use.", ["worker", "role"])
        self.kv_total = g("epd:kv_cache_blocks_total", "KV cache blocks in the pool.", ["worker", "role"])
        self.running = g("epd:worker_requests_running", "Requests running on the worker.", ["worker", "role"])
        self.waiting = g("epd:worker_requests_waiting", "Requests queued on the worker.", ["worker", "role"])
        self.encoded = g("epd:images_encoded_total", "Images run through the vision encoder.",
                         ["worker", "role"])
        self.prefix_hits = g("epd:prefix_cache_hit_tokens_total", "Prompt tokens served from the prefix cache.",
                             ["worker", "role"])
        self.prefix_queries = g("epd:prefix_cache_query_tokens_total", "Prompt tokens looked up in the prefix cache.",
                                ["worker", "role"])
        self.pulls = g("epd:transfer_pulls_total", "Tensors pulled from peers, by transfer backend.",
                       ["worker", "role", "backend"])
        self.alive = g("epd:workers_alive", "Workers registered and heartbeating.", ["role"])
        self.cache = {name: g(f"epd:{name}_total", doc, ["worker", "role"]) for name, doc in CACHE_COUNTERS.items()}
        self.index = g("epd:cluster_index_entries", "Entries in the router's cluster index, by kind.", ["kind"])
        self.router_cache = g("epd:cluster_cache_total", "Cluster-cache events seen by the router: images "
                              "served from an encode worker's cache or from another request's encode, "
                              "prefix queries and the ones another worker answered.", ["event"])

    def update_worker(self, rec: WorkerRecord) -> None:
        labels = {"worker": rec.worker_id, "role": rec.role}
        self.kv_used.labels(**labels).set(rec.kv_blocks_used)
        self.kv_total.labels(**labels).set(rec.kv_blocks_total)
        self.running.labels(**labels).set(rec.running)
        self.waiting.labels(**labels).set(rec.waiting)
        self.encoded.labels(**labels).set(rec.images_encoded)
        self.prefix_hits.labels(**labels).set(rec.prefix_hit_tokens)
        self.prefix_queries.labels(**labels).set(rec.prefix_query_tokens)
        for backend, n in rec.transfer_pulls.items():
            self.pulls.labels(backend=backend, **labels).set(n)
        for name, n in rec.counters.items():
            gauge = self.cache.get(name)
            if gauge is not None:
                gauge.labels(**labels).set(n)

    def update_cluster(self, index_stats: dict[str, int], router_stats: dict[str, int]) -> None:
        for kind, n in index_stats.items():
            self.index.labels(kind=kind).set(n)
        for event, n in router_stats.items():
            self.router_cache.labels(event=event).set(n)

    def update_counts(self, counts: dict[str, int]) -> None:
        for role in ("encode", "prefill", "decode", "mixed"):
            self.alive.labels(role=role).set(counts.get(role, 0))
