"""Serving side by side under ``vllm bench serve``: our deployments vs vLLM-CPU, alternating over rounds.

Each round brings every system up in turn on the same model directory, runs the
peer's own benchmark client with the same random-mm load against it (the round's
seed: new prompts and images each round, the same for every system within one),
and tears it down; the order rotates from round to round. This machine's speed
drifts by a third within minutes, so one run per system lets a drift decide a
ratio: the table gives, per system, the median and the spread (min-max) over
the rounds, and its req/s against vLLM-CPU's both as a ratio of the medians and
as the median of the per-round ratios (each against vLLM in the same round).
Results JSON (every round's figures) to ``perf/out/serve_vllm.json``.

A system is a config name from ``configs/`` (optionally ``:ucx|shm|zmq|auto`` to force
the transfer backend) or ``vllm``.

    python perf/bench_serve_vllm.py --vllm ~/vllm-cpu-venv \
        --systems aggregated,1p1d,1e1p1d,vllm --rounds 3 --num-prompts 64 --max-concurrency 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from router.serve import Deployment, free_port, load_config  # noqa: E402

KEYS = [("completed", "ok"), ("failed", "failed"), ("request_throughput", "req/s"),
        ("output_throughput", "out tok/s"), ("mean_ttft_ms", "TTFT mean ms"), ("p99_ttft_ms", "TTFT p99 ms"),
        ("mean_tpot_ms", "TPOT mean ms"), ("p99_tpot_ms", "TPOT p99 ms")]
SERVED_NAME = "bench-model"


def wait_health(url: str, timeout: float, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not healthy after {timeout} s")


def start_vllm(venv: str, model: str, name: str, port: int, log: Path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="2",
               VLLM_CACHE_ROOT=str(Path.home() / ".cache" / "vllm-peer"))
    env.pop("OMP_NUM_THREADS", None)
    argv = [f"{venv}/bin/vllm", "serve", model, "--host", "127.0.0.1", "--port", str(port),
            "--served-model-name", name, "--dtype", "float32", "--max-model-len", "2048",
            "--limit-mm-per-prompt", json.dumps({"image": 4})]
    return subprocess.Popen(argv, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def run_client(venv: str, url: str, name: str, model: str, args, out: Path, seed: int) -> dict:
    argv = [f"{venv}/bin/vllm", "bench", "serve", "--backend", "openai-chat", "--endpoint", "/v1/chat/completions",
            "--base-url", url, "--model", name, "--tokenizer", model, "--dataset-name", "random-mm",
            "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
            "--random-mm-base-items-per-request", str(args.images),
            "--random-mm-limit-mm-per-prompt", json.dumps({"image": args.images, "video": 0}),
            "--random-mm-bucket-config", "{(112,112,1):1.0}", "--num-prompts", str(args.num_prompts),
            "--max-concurrency", str(args.max_concurrency), "--ignore-eos", "--seed", str(seed),
            "--num-warmups", str(args.warmups),
            "--save-result", "--result-dir", str(out.parent), "--result-filename", out.name]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"vllm bench serve failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads(out.read_text())


def bench_system(system: str, args, tmp: Path, seed: int) -> dict:
    """One system up, one client run against it, down again; the client's result."""
    port = free_port()
    out = tmp / f"{system.replace(':', '-')}-{seed}.json"
    if system == "vllm":
        proc = start_vllm(args.vllm, args.model, SERVED_NAME, port, tmp / f"vllm-{seed}.log")
        try:
            wait_health(f"http://127.0.0.1:{port}", args.start_timeout, proc)
            return run_client(args.vllm, f"http://127.0.0.1:{port}", SERVED_NAME, args.model, args, out, seed)
        finally:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
    config, _, transfer = system.partition(":")
    cfg = load_config(ROOT / "configs" / f"{config}.yaml")
    cfg["served_model_name"] = SERVED_NAME
    dep = Deployment(cfg, args.model, port=port, log_dir=tmp / f"{system.replace(':', '-')}-{seed}",
                     transfer=transfer or None)
    try:
        dep.start(args.start_timeout)
        return run_client(args.vllm, dep.url, SERVED_NAME, args.model, args, out, seed)
    finally:
        dep.stop()


def summarize(runs: dict[str, list[dict]], baseline: str = "vllm") -> dict[str, dict]:
    """Per system: median, min and max of each figure over the rounds, and req/s against ``baseline``."""
    out: dict[str, dict] = {}
    base = runs.get(baseline)
    for system, rounds in runs.items():
        row: dict = {"runs": f"{sum('error' not in r for r in rounds)}/{len(rounds)}"}
        for key, _ in KEYS:
            vals = [r[key] for r in rounds if r.get(key) is not None]
            if vals:
                row[key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
        if base and system != baseline and "request_throughput" in row:
            row["vs_baseline_of_medians"] = (row["request_throughput"]["median"]
                                             / statistics.median(b["request_throughput"] for b in base))
            base_by_round = {b["round"]: b.get("request_throughput") for b in base}
            per_round = [r["request_throughput"] / base_by_round[r["round"]] for r in rounds
                         if r.get("request_throughput") and base_by_round.get(r["round"])]
            if per_round:
                row["vs_baseline_per_round"] = {"median": statistics.median(per_round),
                                                "min": min(per_round), "max": max(per_round)}
        out[system] = row
    return out


def table(summary: dict[str, dict], rounds: int) -> str:
    def cell(stat: dict | None, fmt: str = ".2f") -> str:
        if not stat:
            return "-"
        if rounds == 1:
            return f"{stat['median']:{fmt}}"
        return f"{stat['median']:{fmt}} ({stat['min']:{fmt}}-{stat['max']:{fmt}})"

    cols = [k for k in KEYS if k[0] not in ("completed", "failed")]
    lines = ["| system | runs | " + " | ".join(label for _, label in cols) + " | ok / failed | req/s vs vLLM: "
             "ratio of medians | median of per-round ratios (min-max) |",
             "|---" * (len(cols) + 5) + "|"]
    for system, row in summary.items():
        ok = f"{cell(row.get('completed'), '.0f')} / {cell(row.get('failed'), '.0f')}"
        ratio = f"{row['vs_baseline_of_medians']:.2f}x" if "vs_baseline_of_medians" in row else "-"
        per = row.get("vs_baseline_per_round")
        per_s = "-" if per is None else (f"{per['median']:.2f}x ({per['min']:.2f}-{per['max']:.2f})" if rounds > 1
                                         else f"{per['median']:.2f}x")
        figures = " | ".join(cell(row.get(k)) for k, _ in cols)
        lines.append(f"| {system} | {row['runs']} | {figures} | {ok} | {ratio} | {per_s} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vllm", required=True, help="vLLM-CPU venv (its bench client is used for every system)")
    ap.add_argument("--model", help="model directory (default: the tiny LLaVA)")
    ap.add_argument("--systems", default="aggregated,1p1d,1e1p1d,vllm",
                    help="comma list: config names (CONFIG:TRANSFER forces a transfer backend) and vllm")
    ap.add_argument("--rounds", type=int, default=3, help="every system runs once per round; the order rotates")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--max-concurrency", type=int, default=8)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--images", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0, help="round r uses seed + r")
    ap.add_argument("--warmups", type=int, default=8,
                    help="requests sent to each system before its measured ones (first-request costs: "
                         "vLLM's compiled graphs, our lazy start-up)")
    ap.add_argument("--start-timeout", type=float, default=300.0)
    ap.add_argument("--out", default=str(ROOT / "perf" / "out" / "serve_vllm.json"))
    args = ap.parse_args()
    if args.model is None:
        from router.serve import default_model

        args.model = str(default_model())
    systems = args.systems.split(",")
    runs: dict[str, list[dict]] = {s: [] for s in systems}
    order_log = []
    tmp = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    print(f"logs and client results in {tmp}", flush=True)
    for r in range(args.rounds):
        order = systems[r % len(systems):] + systems[:r % len(systems)]
        order_log.append(order)
        for system in order:
            t0 = time.monotonic()
            try:
                res = bench_system(system, args, tmp, args.seed + r)
            except Exception as e:  # noqa: BLE001 - one broken run must not lose the others
                print(f"round {r + 1}/{args.rounds} {system}: FAILED: {type(e).__name__}: {e}", flush=True)
                runs[system].append({"round": r, "seed": args.seed + r, "error": f"{type(e).__name__}: {e}"})
                continue
            runs[system].append({k: res.get(k) for k, _ in KEYS} | {"round": r, "seed": args.seed + r,
                                                                    "wall_s": round(time.monotonic() - t0, 1)})
            print(f"round {r + 1}/{args.rounds} {system}: {res.get('completed')} ok, {res.get('failed', 0)} failed, "
                  f"{res.get('request_throughput', 0):.2f} req/s, TPOT {res.get('mean_tpot_ms', 0):.2f} ms",
                  flush=True)
    summary = summarize(runs)
    print(f"\n{args.rounds} round(s), {args.num_prompts} prompts at concurrency {args.max_concurrency}; "
          "median (min-max) over the rounds:")
    print(table(summary, args.rounds))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": " ".join([Path(sys.executable).name, *sys.argv]),
                                          "args": vars(args), "orders": order_log, "runs": runs,
                                          "summary": summary}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
