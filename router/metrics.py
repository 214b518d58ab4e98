"""Prometheus metrics of the API process, named after vLLM's (`vllm:` -> `epd:`).

Each `ApiMetrics` owns its `CollectorRegistry`, so several apps can live in one process
(tests). The HTTP layer feeds the request metrics from the deltas it sends; the router
core adds its own gauges (KV blocks per worker, ...) through `ApiMetrics.gauge`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import generate_latest

from router.backend import ApiDelta

# vLLM's buckets, so dashboards built for it read ours the same way.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class ApiMetrics:
    """The API process's metrics on a private registry; `render()` is the /metrics body."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.running = Gauge("epd:num_requests_running",
                             "Requests that have produced output and not finished.", registry=r)
        self.waiting = Gauge("epd:num_requests_waiting",
                             "Accepted requests that have produced no output yet.", registry=r)
        self.success = Counter("epd:request_success_total", "Finished requests.",
                               ["finished_reason"], registry=r)
        self.prompt_tokens = Counter("epd:prompt_tokens_total", "Prompt tokens processed.",
                                     registry=r)
        self.generation_tokens = Counter("epd:generation_tokens_total", "Tokens generated.",
                                         registry=r)
        self.ttft = Histogram("epd:time_to_first_token_seconds",
                              "From HTTP arrival to the first output token.",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("epd:inter_token_latency_seconds", "Time between output tokens.",
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("epd:e2e_request_latency_seconds",
                             "From HTTP arrival to the last output.", buckets=_E2E_BUCKETS,
                             registry=r)
        self.errors = Counter("epd:request_errors_total", "Requests answered with an error.",
                              ["status"], registry=r)
        self._extra: dict[str, Gauge] = {}

    def gauge(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Gauge:
        """A gauge on this registry for the router core, e.g.
        `gauge("epd:kv_cache_blocks_used", "KV blocks in use", ["worker"])`.
        Asking twice for one name returns the same gauge."""
        if name not in self._extra:
            self._extra[name] = Gauge(name, documentation, list(labels), registry=self.registry)
        return self._extra[name]

    def error(self, status: int) -> None:
        self.errors.labels(status=str(status)).inc()

    def track(self, start: float | None = None) -> RequestTracker:
        """Start tracking one accepted request; `start` is its arrival (perf_counter)."""
        return RequestTracker(self, start)

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of the Prometheus text exposition."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestTracker:
    """One request's timings and counts, fed with every delta the client is sent.

    A request is "waiting" until its first delta, then "running" until `finish` or
    `fail`. TTFT and inter-token latency come from step-by-step deltas; a first delta
    that is already the whole answer (several tokens, finished) has no first-token time
    and only counts towards tokens and end-to-end latency.
    """

    def __init__(self, metrics: ApiMetrics, start: float | None = None):
        self._m = metrics
        self._start = time.perf_counter() if start is None else start
        self._state = "waiting"
        self._tokens = 0
        self._last_token_at: float | None = None
        metrics.waiting.inc()

    def on_delta(self, delta: ApiDelta) -> None:
        now = time.perf_counter()
        if self._state == "waiting":
            self._m.waiting.dec()
            self._m.running.inc()
            self._state = "running"
            self._m.prompt_tokens.inc(delta.prompt_tokens)
        new = delta.completion_tokens - self._tokens
        if new <= 0:
            return
        self._m.generation_tokens.inc(new)
        if self._last_token_at is None:
            if new == 1 or delta.finish_reason is None:
                self._m.ttft.observe(now - self._start)
        else:
            gap = (now - self._last_token_at) / new
            for _ in range(new):
                self._m.itl.observe(gap)
        self._last_token_at = now
        self._tokens = delta.completion_tokens

    def finish(self, reason: str | None) -> None:
        """The request ended with `reason` ("stop", "length", "abort")."""
        if self._close():
            self._m.success.labels(finished_reason=reason or "unknown").inc()
            self._m.e2e.observe(time.perf_counter() - self._start)

    def fail(self, status: int) -> None:
        """The request ended with an error answered with HTTP `status`."""
        if self._close():
            self._m.error(status)

    def _close(self) -> bool:
        """Leave the gauges; False if already closed (ending twice counts once)."""
        if self._state == "closed":
            return False
        (self._m.waiting if self._state == "waiting" else self._m.running).dec()
        self._state = "closed"
        return True


class RoleSwitchMetrics:
    """Live role switches (``router.role_switch``): how many, between which roles, how long."""

    _BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)

    def __init__(self, registry: CollectorRegistry):
        self.switches = Counter("epd:role_switches", "Live role switches completed, by old and new role.",
                                ["from", "to"], registry=registry)
        self.duration = Histogram("epd:role_switch_duration_seconds",
                                  "From the admin call to the worker's announcement in its new role "
                                  "(drain, hand-over, reload, re-profile).", ["phase"],
                                  buckets=self._BUCKETS, registry=registry)

    def done(self, old: str, new: str, drain_s: float, total_s: float) -> None:
        self.switches.labels(**{"from": old, "to": new}).inc()
        self.duration.labels(phase="drain").observe(drain_s)
        self.duration.labels(phase="total").observe(total_s)
