"""How good the plans' predictions were, and how many requests met their SLO (``/metrics``).

- ``epd:ttft_prediction_ratio`` / ``epd:tpot_prediction_ratio``: actual / predicted per request
  (1 is a perfect prediction), labelled by policy;
- ``epd:ttft_prediction_error``: |actual / predicted - 1| per request, by policy, in buckets fine
  enough to read its median near the issue's 15% aim;
- ``epd:slo_attained_total{metric}`` / ``epd:slo_missed_total{metric}`` for requests with an SLO
  (metric ttft, tpot, or both: the request met every target it had);
- ``epd:requests_rejected_total{reason}``: admission refusals (429);
- ``epd:prompt_token_count_mismatch_total``: requests whose prompt the router counted differently
  from the worker that ran it (the worker's count is used; 0 when the router's tokenizer is right).
"""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Histogram

log = logging.getLogger("epd.router")
_RATIO_BUCKETS = (0.25, 0.5, 0.67, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0, 10.0)
_ERROR_BUCKETS = (0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)


class PlanMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = registry if registry is not None else CollectorRegistry()
        self.ttft_ratio = Histogram("epd:ttft_prediction_ratio", "Actual / predicted time to first token, per "
                                    "request.", ["policy"], buckets=_RATIO_BUCKETS, registry=r)
        self.tpot_ratio = Histogram("epd:tpot_prediction_ratio", "Actual / predicted time per output token, per "
                                    "request.", ["policy"], buckets=_RATIO_BUCKETS, registry=r)
        self.ttft_error = Histogram("epd:ttft_prediction_error", "|Actual / predicted time to first token - 1|, "
                                    "per request.", ["policy"], buckets=_ERROR_BUCKETS, registry=r)
        self.attained = Counter("epd:slo_attained", "Requests with an SLO that met it, by metric (ttft, tpot, "
                                "both: every target the request had).", ["metric"], registry=r)
        self.missed = Counter("epd:slo_missed", "Requests with an SLO that missed it, by metric.", ["metric"],
                              registry=r)
        self.rejected = Counter("epd:requests_rejected", "Requests refused at admission (429), by reason.",
                                ["reason"], registry=r)
        self.mismatch = Counter("epd:prompt_token_count_mismatch", "Requests whose prompt tokens the router "
                                "counted differently from the worker.", registry=r)
        self.mismatch.inc(0)
        self.rejected.labels(reason="queue").inc(0)
        self.mismatches = 0

    def on_delta(self, plan, req, delta, first: bool) -> tuple[float | None, float | None]:
        """Every delta of a planned request: time its first token and its end; (the TTFT at the
        first token, the TPOT at the last), None otherwise."""
        now, ttft = time.monotonic(), None
        if first and plan.first_token_at is None:
            ttft = now - plan.admitted_at
            plan.first_token_at = now
            if delta.prompt_tokens and plan.size.exact and delta.prompt_tokens != plan.size.prompt_tokens:
                self.mismatches += 1
                self.mismatch.inc()
                plan.size.prompt_tokens = delta.prompt_tokens  # the worker ran it: its count wins
            if plan.ttft_s > 0:
                ratio = (now - plan.admitted_at) / plan.ttft_s
                self.ttft_ratio.labels(policy=plan.policy).observe(ratio)
                self.ttft_error.labels(policy=plan.policy).observe(abs(ratio - 1))
                log.debug("ttft %s on %s: %.4f s, predicted %.4f s (%s; %d of %d tokens cached)", req.request_id,
                          plan.prefill, now - plan.admitted_at, plan.ttft_s,
                          " ".join(f"{k} {v:.4f}" for k, v in plan.parts.items()), plan.cached_tokens,
                          plan.size.prompt_tokens)
        plan.tokens += len(delta.token_ids)
        if delta.finish_reason is None or plan.first_token_at is None:
            return ttft, None
        return ttft, self._finished(plan, now)

    def _finished(self, plan, now: float) -> float | None:
        ttft = plan.first_token_at - plan.admitted_at
        tpot = (now - plan.first_token_at) / (plan.tokens - 1) if plan.tokens > 1 else None
        if tpot is not None and plan.tpot_s > 0:
            self.tpot_ratio.labels(policy=plan.policy).observe(tpot / plan.tpot_s)
        slo = plan.slo
        if slo is None or (slo.ttft_s is None and slo.tpot_s is None):
            return tpot
        met = []
        if slo.ttft_s is not None:
            met.append(self._count("ttft", ttft <= slo.ttft_s))
        if slo.tpot_s is not None and tpot is not None:
            met.append(self._count("tpot", tpot <= slo.tpot_s))
        self._count("both", all(met))
        return tpot

    def _count(self, metric: str, ok: bool) -> bool:
        (self.attained if ok else self.missed).labels(metric=metric).inc()
        return ok
