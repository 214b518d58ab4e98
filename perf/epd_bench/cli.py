"""``epd-bench``: drive an OpenAI-compatible chat server with a synthetic or recorded load.

    epd-bench --base-url http://127.0.0.1:8000 \
        --dataset random-mm --input-len 64 --output-len 32 --images-per-request 1 \
        --image-sizes 112x112 --num-prompts 64 --request-rate 1,2,4,inf --max-concurrency 16 \
        --slo-ttft-ms 500 --slo-tpot-ms 100 --out results.json

``--model`` and ``--tokenizer`` default to what the server reports in ``/v1/models`` (its only
model and that model's directory, when it is on this host).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import resource
import time
import urllib.request
from pathlib import Path

from . import datasets
from .client import RequestResult
from .load import run_load
from .metrics import goodput, summarize


def add_load_args(ap: argparse.ArgumentParser) -> None:
    """The dataset and load flags, shared with ``side_by_side``."""
    ap.add_argument("--tokenizer", help="model/tokenizer directory (random datasets; default: the model "
                                        "directory the server reports in /v1/models, when it is on this host)")
    ap.add_argument("--dataset", choices=("random", "random-mm", "jsonl"), default="random")
    ap.add_argument("--input-len", default="64", help="prompt tokens: N or LO-HI (uniform)")
    ap.add_argument("--output-len", default="32", help="output tokens: N or LO-HI (uniform)")
    ap.add_argument("--images-per-request", default="1", help="random-mm: N or LO-HI (uniform)")
    ap.add_argument("--image-sizes", default="112x112", help="random-mm: WxH list, one drawn per image")
    ap.add_argument("--image-format", choices=("png", "jpeg"), default="png",
                    help="random-mm: noise image encoding (vllm bench serve's random-mm sends jpeg)")
    ap.add_argument("--jsonl", help="jsonl: one OpenAI chat body per line")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--request-rate", default="inf", help="req/s; a comma list sweeps; inf = all at once")
    ap.add_argument("--burstiness", type=float, default=1.0, help="gamma shape: 1 = Poisson, < 1 burstier")
    ap.add_argument("--max-concurrency", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=0, help="requests sent first and left out of the figures")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                    help="let requests stop at EOS (default: fixed output lengths via ignore_eos)")
    ap.add_argument("--trust-env", action="store_true",
                    help="honour proxy variables and ~/.netrc like vllm bench serve (adds its per-request lookup)")
    ap.add_argument("--slo-ttft-ms", type=float, default=None)
    ap.add_argument("--slo-tpot-ms", type=float, default=None)
    ap.add_argument("--no-progress", dest="progress", action="store_false")


def parse_rates(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def build_requests(args, seed: int | None = None) -> list[datasets.Request]:
    out_len = datasets.parse_range(args.output_len)
    if args.dataset == "jsonl":
        if not args.jsonl:
            raise SystemExit("--dataset jsonl needs --jsonl PATH")
        return datasets.jsonl_requests(args.jsonl, args.num_prompts, out_len)
    if not args.tokenizer:
        raise SystemExit(f"--dataset {args.dataset} needs --tokenizer DIR (the server reports no model "
                         f"directory on this host)")
    images = datasets.parse_range(args.images_per_request) if args.dataset == "random-mm" else (0, 0)
    return datasets.random_requests(datasets.load_tokenizer(args.tokenizer), args.num_prompts,
                                    datasets.parse_range(args.input_len), out_len,
                                    args.seed if seed is None else seed, images,
                                    datasets.parse_sizes(args.image_sizes), args.image_format)


def _record(r: RequestResult) -> dict:
    return {"ok": r.ok, "error": r.error, "ttft_ms": r.ttft * 1e3, "tpot_ms": r.tpot * 1e3,
            "e2e_ms": r.e2e * 1e3, "output_tokens": r.output_tokens, "prompt_tokens": r.prompt_tokens,
            "images": r.n_images, "itl_ms": [round(g * 1e3, 3) for g in r.itl]}


def run_one_rate(args, base_url: str, model: str, requests, rate: float) -> dict:
    bar = None
    if args.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(requests), desc=f"rate {rate:g}", leave=False)
    try:
        load = asyncio.run(run_load(base_url, model, requests, rate, args.burstiness, args.max_concurrency,
                                    args.warmup, args.seed, args.ignore_eos,
                                    progress=bar.update if bar else None, trust_env=args.trust_env))
    finally:
        if bar:
            bar.close()
    summary = summarize(load.results, load.wall_s, args.slo_ttft_ms, args.slo_tpot_ms)
    summary |= {"client_cpu_s": load.cpu_s, "client_cpu_share": load.cpu_share}
    return {"rate": str(rate) if rate == float("inf") else rate, "summary": summary,
            "records": [_record(r) for r in load.results]}


def run_sweep(args, base_url: str, model: str, system: str | None = None) -> dict:
    """Every rate of ``--request-rate`` against one server; the results JSON as a dict.

    Each rate gets its own prompts and images (seed + rate index): reusing them would let the
    server's prefix and image caches answer later rates from earlier ones.
    """
    runs = []
    for i, rate in enumerate(parse_rates(args.request_rate)):
        requests = build_requests(args, args.seed + i)
        run = run_one_rate(args, base_url, model, requests, rate)
        print(format_run(run), flush=True)
        runs.append(run)
    sweep = [(float(r["rate"]), r["summary"].get("slo_attainment")) for r in runs]
    good = goodput(sweep)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"system": system or model, "base_url": base_url, "model": model,
            "args": {k: v for k, v in vars(args).items() if k != "func"},
            "host": platform.node(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "goodput_rate": str(good) if good == float("inf") else good,
            "client_total_cpu_s": usage.ru_utime + usage.ru_stime, "runs": runs}


def format_run(run: dict) -> str:
    s = run["summary"]
    lines = [f"== rate {run['rate']} req/s: {s['completed']} ok, {s['failed']} failed, {s['duration']:.2f} s",
             f"  req/s {s['request_throughput']:.3f}   output tok/s {s['output_throughput']:.2f}"]
    for name, label in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E")):
        lines.append(f"  {label:4} ms  mean {s[f'mean_{name}_ms']:8.2f}  median {s[f'median_{name}_ms']:8.2f}"
                     f"  p90 {s[f'p90_{name}_ms']:8.2f}  p99 {s[f'p99_{name}_ms']:8.2f}")
    if "slo_attainment" in s:
        lines.append(f"  SLO attainment {s['slo_attainment']:.1%}")
    lines.append(f"  load generator CPU {s['client_cpu_s']:.2f} s = {s['client_cpu_share']:.0%} of one core")
    for err, n in s["errors"].items():
        lines.append(f"  error x{n}: {err}")
    return "\n".join(lines)


def served_model(base_url: str, name: str | None) -> tuple[str, str | None]:
    """(model name, its model directory when the server reports one that exists here) from /v1/models;
    without ``name`` the server must serve exactly one model."""
    try:
        with urllib.request.urlopen(f"{base_url}/v1/models", timeout=10) as r:
            models = json.loads(r.read())["data"]
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"cannot list the models of {base_url}: {e}") from None
    if name is None:
        if len(models) != 1:
            raise SystemExit(f"{base_url} serves {len(models)} models; pick one with --model")
        name = models[0]["id"]
    root = next((m.get("root") for m in models if m.get("id") == name), None)
    return name, root if root and Path(root, "config.json").is_file() else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="epd-bench", description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", help="served model name (default: the server's only model)")
    ap.add_argument("--out", help="results JSON")
    add_load_args(ap)
    args = ap.parse_args(argv)
    if args.model is None or (args.tokenizer is None and args.dataset != "jsonl"):
        args.model, root = served_model(args.base_url, args.model)
        args.tokenizer = args.tokenizer or root
    res = run_sweep(args, args.base_url, args.model)
    if res["goodput_rate"] is not None or args.slo_ttft_ms or args.slo_tpot_ms:
        print(f"goodput (highest rate with >= 90% within SLO): {res['goodput_rate']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0 if all(r["summary"]["failed"] == 0 for r in res["runs"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
