"""Serving side by side under ``vllm bench serve``: our deployments vs vLLM-CPU, one run.

Brings each system up on the same model directory, runs the peer's own benchmark
client with the same random-mm load against it, tears it down, and prints one
table (TTFT, TPOT, req/s, failures). Results JSON to ``perf/out/serve_vllm.json``.

    python perf/bench_serve_vllm.py --vllm ~/.cache/epd-peers/vllm-cpu \
        --systems aggregated,1e1p1d,vllm --num-prompts 32 --max-concurrency 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from router.serve import Deployment, free_port, load_config  # noqa: E402


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


def run_client(venv: str, url: str, name: str, model: str, args, out: Path) -> dict:
    argv = [f"{venv}/bin/vllm", "bench", "serve", "--backend", "openai-chat", "--endpoint", "/v1/chat/completions",
            "--base-url", url, "--model", name, "--tokenizer", model, "--dataset-name", "random-mm",
            "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
            "--random-mm-base-items-per-request", str(args.images),
            "--random-mm-limit-mm-per-prompt", json.dumps({"image": args.images, "video": 0}),
            "--random-mm-bucket-config", "{(112,112,1):1.0}", "--num-prompts", str(args.num_prompts),
            "--max-concurrency", str(args.max_concurrency), "--ignore-eos", "--seed", "0",
            "--save-result", "--result-dir", str(out.parent), "--result-filename", out.name]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"vllm bench serve failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads(out.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vllm", required=True, help="vLLM-CPU venv (its bench client is used for every system)")
    ap.add_argument("--model", help="model directory (default: the tiny LLaVA)")
    ap.add_argument("--systems", default="aggregated,1e1p1d,vllm")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--max-concurrency", type=int, default=8)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--images", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "perf" / "out" / "serve_vllm.json"))
    args = ap.parse_args()
    if args.model is None:
        from router.serve import default_model

        args.model = str(default_model())
    name = "bench-model"
    results = {}
    tmp = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    for system in args.systems.split(","):
        port = free_port()
        if system == "vllm":
            proc = start_vllm(args.vllm, args.model, name, port, tmp / "vllm.log")
            try:
                wait_health(f"http://127.0.0.1:{port}", 300, proc)
                res = run_client(args.vllm, f"http://127.0.0.1:{port}", name, args.model, args, tmp / "vllm.json")
            finally:
                os.killpg(proc.pid, 15)
                proc.wait(30)
        else:
            cfg = load_config(ROOT / "configs" / f"{system}.yaml")
            cfg["served_model_name"] = name
            dep = Deployment(cfg, args.model, port=port, log_dir=tmp / system)
            try:
                dep.start(240)
                res = run_client(args.vllm, dep.url, name, args.model, args, tmp / f"{system}.json")
            finally:
                dep.stop()
        results[system] = res
        print(f"{system}: done ({res.get('completed')} ok, {res.get('failed', 0)} failed)", flush=True)
    keys = [("completed", "ok"), ("failed", "failed"), ("request_throughput", "req/s"),
            ("output_throughput", "out tok/s"), ("mean_ttft_ms", "TTFT mean ms"), ("p99_ttft_ms", "TTFT p99 ms"),
            ("mean_tpot_ms", "TPOT mean ms"), ("p99_tpot_ms", "TPOT p99 ms")]
    print("| system | " + " | ".join(k[1] for k in keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for system, res in results.items():
        vals = [res.get(k, 0) for k, _ in keys]
        print(f"| {system} | " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in vals) + " |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": {
        s: {k: r.get(k) for k, _ in keys} for s, r in results.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
