"""The cluster cache on and off, same deployment, same load: what reusing images and prefixes buys.

A chat workload where images and long prompt prefixes repeat (``--image-pool`` images and
``--prefix-pool`` prefixes shared by ``--num-prompts`` requests, 1-``--max-images`` images each,
a unique question each) runs against 2 encode, 2 prefill and 1 decode workers dispatched round
robin, first with ``router.cluster_cache: true`` then ``false``. Reported per mode: epd-bench's
figures, images run through a vision encoder, prompt KV blocks pulled from another worker.

    python perf/bench_cluster_cache.py --model /tmp/llava-tiny --num-prompts 64 --request-rate 8 \
        --out perf/out/bench_cluster_cache.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from perf.epd_bench.cli import add_load_args, run_sweep  # noqa: E402
from perf.epd_bench.datasets import noise_image_url  # noqa: E402
from router.serve import Deployment, free_port, load_config  # noqa: E402

SERVED = "bench-model"
WORDS = ("river", "stone", "cloud", "lamp", "orbit", "maple", "signal", "harbor", "copper", "meadow")


def write_workload(path: Path, n: int, image_pool: int, prefix_pool: int, max_images: int,
                   prefix_words: int, size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    images = [noise_image_url(size, size, rng) for _ in range(image_pool)]
    prefixes = [" ".join(rng.choice(WORDS, prefix_words)) for _ in range(prefix_pool)]
    with path.open("w") as f:
        for i in range(n):
            k = int(rng.integers(1, max_images + 1))
            content = [{"type": "image_url", "image_url": {"url": images[int(j)]}}
                       for j in rng.choice(image_pool, k, replace=False)]
            content.append({"type": "text", "text": f"{prefixes[int(rng.integers(prefix_pool))]} Question {i}?"})
            f.write(json.dumps({"messages": [{"role": "user", "content": content}]}) + "\n")


def cluster_counters(url: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
        text = r.read().decode()

    def total(name: str) -> float:
        return sum(float(v) for v in re.findall(rf"^{name}\{{[^}}]*\}} ([0-9.e+-]+)$", text, re.M))

    return {"images_encoded": total("epd:images_encoded_total"),
            "kv_prefix_blocks_fetched": total("epd:kv_prefix_blocks_fetched_total"),
            "prefix_hit_tokens": total("epd:prefix_cache_hit_tokens_total")}


def run_mode(args, on: bool, log_dir: Path) -> dict:
    import time

    cfg = load_config(ROOT / "configs" / "2e1p1d.yaml")
    cfg["served_model_name"] = SERVED
    cfg["workers"] = [{"role": "encode", "count": 2}, {"role": "prefill", "count": 2},
                      {"role": "decode", "count": 1}]
    cfg["router"] = {**cfg.get("router", {}), "policy": "round_robin", "cluster_cache": on}
    dep = Deployment(cfg, args.model, port=free_port(), log_dir=log_dir / ("on" if on else "off"))
    try:
        dep.start(300)
        result = run_sweep(args, dep.url, SERVED, system=f"cluster_cache={'on' if on else 'off'}")
        time.sleep(1.5)  # the last heartbeats carry the counters
        result["counters"] = cluster_counters(dep.url)
        return result
    finally:
        dep.stop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_load_args(ap)
    ap.add_argument("--model", required=True, help="a LLaVA-family model directory")
    ap.add_argument("--image-pool", type=int, default=8)
    ap.add_argument("--prefix-pool", type=int, default=4)
    ap.add_argument("--prefix-words", type=int, default=120)
    ap.add_argument("--max-images", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--out", default=str(ROOT / "perf" / "out" / "bench_cluster_cache.json"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    workload = out.with_suffix(".jsonl")
    write_workload(workload, args.num_prompts, args.image_pool, args.prefix_pool, args.max_images,
                   args.prefix_words, args.image_size, args.seed)
    args.dataset, args.jsonl = "jsonl", str(workload)
    results = [run_mode(args, on, out.parent / "logs-cluster-cache") for on in (True, False)]
    print(f"\n{'mode':18} {'req/s':>7} {'TTFT med':>9} {'TTFT p90':>9} {'E2E med':>9} "
          f"{'encoded':>8} {'KV blocks pulled':>17}")
    for r in results:
        for run in r["runs"]:
            s, c = run["summary"], r["counters"]
            print(f"{r['system']:18} {s['request_throughput']:7.2f} {s['median_ttft_ms']:9.1f} "
                  f"{s['p90_ttft_ms']:9.1f} {s['median_e2el_ms']:9.1f} {c['images_encoded']:8.0f} "
                  f"{c['kv_prefix_blocks_fetched']:17.0f}")
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
