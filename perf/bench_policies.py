"""Dispatch policies side by side: one trace replayed against slo_aware, least_loaded and round_robin.

    python -m perf.bench_policies --config 2e1p1d --rates 1,2,4 --num-prompts 40 \
        --slo-ttft-ms 1500 --slo-tpot-ms 150 --out perf/results/policies/2e1p1d.json

Each policy gets a fresh deployment of the same config and the same requests at every rate
(a mix of text-only, 1-image and 4-8-image chats with bursty gamma arrivals; each rate has its
own images, so no rate is answered from an earlier one's caches). Per policy it reports the
SLO attainment at each rate, the goodput (highest rate with >= 90% in SLO, as ``epd-bench``),
the router's prediction error (``epd:ttft_prediction_ratio`` / ``epd:tpot_prediction_ratio``:
the share of requests within 10% and 25% of their prediction, and the median ratio read from the
histogram) and the share of 429s.
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


def bench_policy(policy: str, args, tokenizer, log_dir: Path) -> dict:
    cfg = load_config(ROOT / "configs" / f"{args.config}.yaml")
    cfg["served_model_name"] = NAME
    cfg.setdefault("router", {})["policy"] = policy
    if args.max_queue_s is not None:
        cfg["router"]["admission"] = {"max_queue_s": args.max_queue_s}
    dep = Deployment(cfg, str(args.model), port=free_port(), log_dir=log_dir / policy)
    runs = []
    try:
        dep.start(args.start_timeout)
        for i, rate in enumerate(float(r) for r in args.rates.split(",")):
            reqs = trace(tokenizer, args.num_prompts, args.seed + 10 * i)
            load = asyncio.run(run_load(dep.url, NAME, reqs, rate, args.burstiness, None, 0, args.seed))
            s = summarize(load.results, load.wall_s, args.slo_ttft_ms, args.slo_tpot_ms)
            rejected = sum(1 for r in load.results if "429" in r.error)
            runs.append({"rate": rate, "attainment": s.get("slo_attainment"), "completed": s["completed"],
                         "rejected_share": rejected / len(load.results),
                         "median_ttft_ms": s["median_ttft_ms"], "p90_ttft_ms": s["p90_ttft_ms"],
                         "median_tpot_ms": s["median_tpot_ms"], "p90_tpot_ms": s["p90_tpot_ms"]})
            print(policy, json.dumps(runs[-1]), flush=True)
        metrics = urllib.request.urlopen(f"{dep.url}/metrics", timeout=10).read().decode()
    finally:
        dep.stop()
    return {"policy": policy, "runs": runs,
            "goodput_rate": goodput([(r["rate"], r["attainment"]) for r in runs]),
            "ttft_prediction": ratio_stats(histogram(metrics, "epd:ttft_prediction_ratio")),
            "tpot_prediction": ratio_stats(histogram(metrics, "epd:tpot_prediction_ratio"))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model directory (default: the tiny LLaVA)")
    ap.add_argument("--config", default="2e1p1d")
    ap.add_argument("--policies", default="slo_aware,least_loaded,round_robin")
    ap.add_argument("--rates", default="1,2,4")
    ap.add_argument("--num-prompts", type=int, default=40)
    ap.add_argument("--burstiness", type=float, default=0.5, help="gamma shape (< 1: burstier than Poisson)")
    ap.add_argument("--slo-ttft-ms", type=float, default=1500)
    ap.add_argument("--slo-tpot-ms", type=float, default=150)
    ap.add_argument("--max-queue-s", type=float, default=None, help="admission bound (default: off)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start-timeout", type=float, default=300)
    ap.add_argument("--out", default="perf/results/policies/result.json")
    args = ap.parse_args(argv)
    args.model = Path(args.model) if args.model else default_model()
    tokenizer = datasets.load_tokenizer(str(args.model))
    log_dir = ROOT / "perf" / "out" / "policies" / Path(args.out).stem  # worker logs, not kept in git
    results = [bench_policy(p, args, tokenizer, log_dir) for p in args.policies.split(",")]
    out = {"config": args.config, "model": str(args.model), "args": {k: str(v) for k, v in vars(args).items()},
           "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    for r in results:
        print(f"{r['policy']:13} goodput {r['goodput_rate']} req/s  attainment "
              + " ".join(f"{x['rate']:g}:{x['attainment']:.0%}" for x in r["runs"] if x["attainment"] is not None)
              + f"  TTFT pred {r['ttft_prediction']}  TPOT pred {r['tpot_prediction']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
