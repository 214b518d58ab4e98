"""Figures from timing records: percentiles, throughput, SLO attainment, goodput.

Same definitions as ``vllm bench serve``: percentiles by linear interpolation (numpy), TPOT only
over requests with more than one output token, throughput over the benchmark's duration.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from .client import RequestResult

PERCENTILES = (50, 90, 99)


def stats_ms(values_s: list[float], name: str) -> dict:
    """mean/median/p90/p99 (and std) of ``values_s`` in ms, keyed like vLLM's results JSON."""
    arr = np.asarray(values_s, dtype=float) * 1000.0
    if arr.size == 0:
        arr = np.zeros(1)
    out = {f"mean_{name}_ms": float(arr.mean()), f"median_{name}_ms": float(np.median(arr)),
           f"std_{name}_ms": float(arr.std())}
    for p in PERCENTILES:
        out[f"p{p}_{name}_ms"] = float(np.percentile(arr, p))
    return out


def meets_slo(r: RequestResult, slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> bool:
    if not r.ok:
        return False
    if slo_ttft_ms is not None and r.ttft * 1000.0 > slo_ttft_ms:
        return False
    return slo_tpot_ms is None or r.tpot * 1000.0 <= slo_tpot_ms


def summarize(results: list[RequestResult], duration_s: float, slo_ttft_ms: float | None = None,
              slo_tpot_ms: float | None = None) -> dict:
    """The figures of one run; ``duration_s`` is first send -> last finish."""
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    dur = duration_s if duration_s > 0 else float("nan")
    summary = {
        "completed": len(ok), "failed": len(results) - len(ok), "duration": duration_s,
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / dur, "output_throughput": out_tokens / dur,
        "total_token_throughput": (in_tokens + out_tokens) / dur,
    }
    summary |= stats_ms([r.ttft for r in ok], "ttft")
    summary |= stats_ms([r.tpot for r in ok if r.output_tokens > 1], "tpot")
    summary |= stats_ms([g for r in ok for g in r.itl], "itl")
    summary |= stats_ms([r.e2e for r in ok], "e2el")
    if slo_ttft_ms is not None or slo_tpot_ms is not None:
        good = sum(meets_slo(r, slo_ttft_ms, slo_tpot_ms) for r in results)
        summary["slo_attainment"] = good / len(results) if results else 0.0
        summary["request_goodput"] = good / dur
    summary["errors"] = dict(Counter(r.error for r in results if not r.ok).most_common(10))
    return summary


def goodput(sweep: list[tuple[float, float]], threshold: float = 0.9) -> float | None:
    """The highest rate of (rate, SLO attainment) pairs whose attainment is >= ``threshold``."""
    good = [rate for rate, att in sweep if att is not None and att >= threshold]
    return max(good) if good else None
