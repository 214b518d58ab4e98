"""Several systems under the same ``epd-bench`` load, one after another, one results JSON each.

Each system is brought up on the same model directory, swept, and torn down: a config name from
``configs/`` (our deployment) or ``vllm`` (vLLM-CPU from ``--vllm``, served with the flags of
``perf/bench_serve_vllm.py``, whose start and health helpers this reuses).

    python -m perf.epd_bench.side_by_side --systems aggregated,1e1p1d,vllm --model /tmp/llava-tiny \
        --dataset random-mm --num-prompts 64 --request-rate 2,4,8,inf --max-concurrency 16 \
        --slo-ttft-ms 500 --slo-tpot-ms 50 --out-dir perf/out/side_by_side
    python -m perf.epd_bench.plot perf/out/side_by_side/*.json --out perf/out/side_by_side
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from perf.bench_serve_vllm import start_vllm, wait_health
from router.serve import Deployment, free_port, load_config

from .cli import add_load_args, run_sweep

ROOT = Path(__file__).resolve().parents[2]
SERVED_NAME = "bench-model"


def bench_ours(config: str, args, log_dir: Path) -> dict:
    cfg = load_config(ROOT / "configs" / f"{config}.yaml")
    cfg["served_model_name"] = SERVED_NAME
    dep = Deployment(cfg, args.model, port=free_port(), log_dir=log_dir / config)
    try:
        dep.start(args.start_timeout)
        return run_sweep(args, dep.url, SERVED_NAME, system=config)
    finally:
        dep.stop()


def bench_vllm(args, log_dir: Path) -> dict:
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    proc = start_vllm(args.vllm, args.model, SERVED_NAME, port, log_dir / "vllm.log")
    try:
        url = f"http://127.0.0.1:{port}"
        wait_health(url, args.start_timeout, proc)
        return run_sweep(args, url, SERVED_NAME, system="vllm")
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--systems", default="aggregated,vllm", help="config names from configs/, or vllm")
    ap.add_argument("--model", required=True, help="model directory every system serves")
    ap.add_argument("--vllm", default=str(Path.home() / ".cache" / "epd-peers" / "vllm-cpu"), help="vLLM venv")
    ap.add_argument("--out-dir", default=str(ROOT / "perf" / "out" / "side_by_side"))
    ap.add_argument("--start-timeout", type=float, default=300.0)
    add_load_args(ap)
    args = ap.parse_args(argv)
    args.tokenizer = args.tokenizer or args.model
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="epd-bench-sbs-"))
    print(f"server logs: {logs}")
    for system in args.systems.split(","):
        print(f"### {system}", flush=True)
        res = bench_vllm(args, logs) if system == "vllm" else bench_ours(system, args, logs)
        path = out_dir / f"{system}.json"
        path.write_text(json.dumps(res, indent=1))
        print(f"{system}: {path} (goodput rate {res['goodput_rate']})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
