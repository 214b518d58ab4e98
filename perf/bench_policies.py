"""Dispatch policies side by side: one trace replayed against slo_aware, least_loaded and round_robin.

    python -m perf.bench_policies --config 2e1p1d --rates 1,2,4 --num-prompts 40 --rounds 3 \
        --slo-ttft-ms 1500 --slo-tpot-ms 150 --out perf/results/policies/2e1p1d.json

Each round gives each policy a fresh deployment of the same config (``--workers`` replaces its
workers, e.g. to make one prefill worker slower) and the same requests at every rate (a mix of
text-only, 1-image and 4-8-image chats with bursty gamma arrivals; each rate and round has its
own images, so none is answered from an earlier one's caches). Rounds alternate the policies, so
that a shared host's load falls on all of them; the summary gives per policy the median and
spread over rounds of: the SLO attainment at each rate, the goodput (highest rate with >= 90% in
SLO, as ``epd-bench``), the median TTFT, and the router's TTFT prediction error (median
|actual / predicted - 1| from ``epd:ttft_prediction_error``, and the share within 15%).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import urllib.request
from pathlib import Path

import numpy as np

from perf.epd_bench import datasets
from perf.epd_bench.load import run_load
from perf.epd_bench.metrics import goodput, summarize
from router.serve import ROOT, Deployment, default_model, free_port, load_config

NAME = "bench"


def trace(tokenizer, n: int, seed: int) -> list[datasets.Request]:
    """``n`` chats: 40% text only, 30% one image, 30% four to eight images, shuffled."""
    sizes = [(112, 112), (224, 160), (96, 128)]
    k_text, k_one = int(n * 0.4), int(n * 0.3)
    reqs = (datasets.random_requests(tokenizer, k_text, (32, 256), (16, 32), seed)
            + datasets.random_requests(tokenizer, k_one, (16, 64), (16, 32), seed + 1000, (1, 1), sizes)
            + datasets.random_requests(tokenizer, n - k_text - k_one, (16, 64), (16, 32), seed + 2000, (4, 8), sizes))
    order = np.random.default_rng(seed).permutation(len(reqs))
    return [reqs[i] for i in order]


def histogram(text: str, name: str) -> dict[float, float]:
    """Cumulative bucket counts of one Prometheus histogram (all label sets summed)."""
    out: dict[float, float] = {}
    for le, v in re.findall(rf'^{re.escape(name)}_bucket\{{[^}}]*le="([^"]+)"[^}}]*\}} (\S+)$', text, re.M):
        out[float(le)] = out.get(float(le), 0.0) + float(v)
    return dict(sorted(out.items()))


def ratio_stats(buckets: dict[float, float]) -> dict:
    total = buckets.get(float("inf"), 0.0)
    if not total:
        return {"n": 0}

    def share(lo, hi):
        return (buckets.get(hi, 0.0) - buckets.get(lo, 0.0)) / total

    median, prev_le, prev_c = None, 0.0, 0.0
    for le, c in buckets.items():
        if c >= total / 2:
            median = le if le == float("inf") else prev_le + (le - prev_le) * (total / 2 - prev_c) / max(c - prev_c, 1e-9)
            break
        prev_le, prev_c = le, c
    return {"n": int(total), "within_10pct": round(share(0.9, 1.1), 3), "within_25pct": round(share(0.8, 1.25), 3),
            "median_ratio": None if median is None else round(median, 3)}


def quantile(buckets: dict[float, float], q: float = 0.5) -> float | None:
    """A quantile of a cumulative histogram, linear inside the bucket that holds it."""
    total = buckets.get(float("inf"), 0.0)
    if not total:
        return None
    prev_le, prev_c = 0.0, 0.0
    for le, c in buckets.items():
        if c >= total * q:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * (total * q - prev_c) / max(c - prev_c, 1e-9)
        prev_le, prev_c = le, c
    return None


def parse_workers(spec: str) -> list[dict]:
    """``encode:2,prefill:1,prefill:1:max_num_batched_tokens=32,decode:1`` -> the config's workers."""
    out = []
    for part in spec.split(","):
        role, count, *opts = part.split(":")
        w = {"role": role, "count": int(count)}
        for o in opts:
            k, v = o.split("=")
            w[k] = int(v) if v.isdigit() else v
        out.append(w)
    return out


def bench_once(policy: str, args, tokenizer, log_dir: Path) -> dict:
    """One fresh deployment under ``policy``: the rates in order, then its /metrics."""
    cfg = load_config(ROOT / "configs" / f"{args.config}.yaml")
    cfg["served_model_name"] = NAME
    cfg.setdefault("router", {})["policy"] = policy
    if args.workers:
        cfg["workers"] = parse_workers(args.workers)
    if args.threads:
        cfg.setdefault("engine", {})["threads"] = args.threads
    if args.max_queue_s is not None:
        cfg["router"]["admission"] = {"max_queue_s": args.max_queue_s}
    dep = Deployment(cfg, str(args.model), port=free_port(), log_dir=log_dir / f"{policy}-{args.round}")
    if args.log_plans:  # each request's predicted TTFT terms and actual TTFT in router.log
        dep.extra_router_args = [*dep.extra_router_args, "--log-level", "DEBUG"]
    runs = []
    try:
        dep.start(args.start_timeout)
        for i, rate in enumerate(float(r) for r in args.rates.split(",")):
            reqs = trace(tokenizer, args.num_prompts, args.seed + 10 * i + 1000 * args.round)
            load = asyncio.run(run_load(dep.url, NAME, reqs, rate, args.burstiness, None, 0, args.seed + args.round))
            s = summarize(load.results, load.wall_s, args.slo_ttft_ms, args.slo_tpot_ms)
            rejected = sum(1 for r in load.results if "429" in r.error)
            runs.append({"rate": rate, "attainment": s.get("slo_attainment"), "completed": s["completed"],
                         "rejected_share": rejected / len(load.results),
                         "median_ttft_ms": s["median_ttft_ms"], "p90_ttft_ms": s["p90_ttft_ms"],
                         "median_tpot_ms": s["median_tpot_ms"], "p90_tpot_ms": s["p90_tpot_ms"]})
            print(f"round {args.round}", policy, json.dumps(runs[-1]), flush=True)
        metrics = urllib.request.urlopen(f"{dep.url}/metrics", timeout=10).read().decode()
    finally:
        dep.stop()
    error = histogram(metrics, "epd:ttft_prediction_error")
    mismatch = re.search(r"^epd:prompt_token_count_mismatch_total (\S+)$", metrics, re.M)
    return {"policy": policy, "round": args.round, "runs": runs,
            "prompt_count_mismatches": float(mismatch.group(1)) if mismatch else None,
            "goodput_rate": goodput([(r["rate"], r["attainment"]) for r in runs]),
            "ttft_error_median": quantile(error), "ttft_error_p90": quantile(error, 0.9),
            "ttft_within_15pct": round(error.get(0.15, 0.0) / max(error.get(float("inf"), 0.0), 1), 3),
            "ttft_prediction": ratio_stats(histogram(metrics, "epd:ttft_prediction_ratio")),
            "tpot_prediction": ratio_stats(histogram(metrics, "epd:tpot_prediction_ratio"))}


def _spread(xs: list) -> dict:
    xs = [x for x in xs if x is not None]
    if not xs:
        return {"median": None}
    return {"median": round(float(np.median(xs)), 3), "min": round(min(xs), 3), "max": round(max(xs), 3)}


def summarize_rounds(results: list[dict], policies: list[str]) -> dict:
    """Per policy: medians and spread over the rounds (goodput, attainment per rate, TTFT, error)."""
    out = {}
    for p in policies:
        mine = [r for r in results if r["policy"] == p]
        rates = [x["rate"] for x in mine[0]["runs"]] if mine else []
        out[p] = {"rounds": len(mine), "goodput_rate": _spread([r["goodput_rate"] or 0.0 for r in mine]),
                  "attainment": {str(rate): _spread([r["runs"][i]["attainment"] for r in mine])
                                 for i, rate in enumerate(rates)},
                  "median_ttft_ms": {str(rate): _spread([r["runs"][i]["median_ttft_ms"] for r in mine])
                                     for i, rate in enumerate(rates)},
                  "ttft_error_median": _spread([r["ttft_error_median"] for r in mine]),
                  "ttft_within_15pct": _spread([r["ttft_within_15pct"] for r in mine]),
                  "prompt_count_mismatches": sum(r.get("prompt_count_mismatches") or 0 for r in mine)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model directory (default: the tiny LLaVA)")
    ap.add_argument("--config", default="2e1p1d")
    ap.add_argument("--workers", help="replace the config's workers: role:count[:engine_key=value...],... "
                                      "(e.g. a slower prefill worker: prefill:1:max_num_batched_tokens=32)")
    ap.add_argument("--threads", type=int, help="torch threads per worker (default: cores / workers)")
    ap.add_argument("--policies", default="slo_aware,least_loaded,round_robin")
    ap.add_argument("--rounds", type=int, default=1, help="rounds; each runs every policy, in a rotated order")
    ap.add_argument("--first-round", type=int, default=0, help="number of the first round (its seeds and order): "
                                                               "rounds can run as separate invocations")
    ap.add_argument("--merge", help="comma-separated result files of earlier invocations: summarize them together "
                                    "into --out, running nothing")
    ap.add_argument("--rates", default="1,2,4")
    ap.add_argument("--num-prompts", type=int, default=40)
    ap.add_argument("--burstiness", type=float, default=0.5, help="gamma shape (< 1: burstier than Poisson)")
    ap.add_argument("--slo-ttft-ms", type=float, default=1500)
    ap.add_argument("--slo-tpot-ms", type=float, default=150)
    ap.add_argument("--max-queue-s", type=float, default=None, help="admission bound (default: off)")
    ap.add_argument("--log-plans", action="store_true", help="router at DEBUG: every TTFT vs its prediction")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start-timeout", type=float, default=300)
    ap.add_argument("--out", default="perf/results/policies/result.json")
    args = ap.parse_args(argv)
    policies = args.policies.split(",")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge.split(",")]
        results = [r for part in parts for r in part["results"]]
        out = {**parts[0], "args": [part["args"] for part in parts], "merged": args.merge.split(","),
               "summary": summarize_rounds(results, policies), "results": results}
        Path(args.out).write_text(json.dumps(out, indent=1))
        summary = out["summary"]
    else:
        args.model = Path(args.model) if args.model else default_model()
        tokenizer = datasets.load_tokenizer(str(args.model))
        log_dir = ROOT / "perf" / "out" / "policies" / Path(args.out).stem  # worker logs, not kept in git
        results = []
        # Rounds alternate the policies (rotated, so none always runs first on a cold host); a
        # round's requests are the same for every policy, each round's differ. The file is written
        # after every run: a run cut short keeps what was measured.
        for rnd in range(args.first_round, args.first_round + args.rounds):
            args.round = rnd
            for p in policies[rnd % len(policies):] + policies[:rnd % len(policies)]:
                results.append(bench_once(p, args, tokenizer, log_dir))
                summary = summarize_rounds(results, policies)
                out = {"config": args.config, "model": str(args.model),
                       "args": {k: str(v) for k, v in vars(args).items()}, "summary": summary, "results": results}
                Path(args.out).write_text(json.dumps(out, indent=1))
    for p, x in summary.items():
        print(f"{p:13} goodput {x['goodput_rate']} req/s  attainment {x['attainment']}  "
              f"TTFT median ms {x['median_ttft_ms']}  TTFT |pred/actual-1| median {x['ttft_error_median']} "
              f"within 15% {x['ttft_within_15pct']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
