"""Engine step cost on the CPU: what one mixed worker spends per step, outside any server.

Two workloads on one model directory (default: the tiny LLaVA the serving benchmark uses):

- ``decode``: B requests decoding together; per-step CPU time of the engine thread
  (``time.thread_time``: a step descheduled by another process does not count) and wall time.
- ``serve``: a closed loop like ``perf/bench_serve_vllm.py``'s (C requests in flight, each a
  chat with one image and ~64 prompt tokens, 32 output tokens, eos ignored): requests/s and
  CPU per output token, images preprocessed on admission as a worker does.

To compare two source trees (before/after a change) on this noisy 2-core machine, run them
alternately, several rounds, and compare medians:

    for r in 1 2 3; do for t in /tmp/base /work/main; do
      PYTHONPATH=$t python perf/bench_step.py --label $t; done; done

Prints one JSON line per workload (medians and spread over ``--repeats`` in-process repeats).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


def build(model_dir: str, args):
    from stages.engine import LLM

    return LLM(model_dir, dtype="float32", device="cpu", max_num_seqs=64, kv_cache_memory_gb=0.5)


def bench_decode(llm, args) -> dict:
    from stages.engine import SamplingParams

    eng = llm.engine
    g = torch.Generator().manual_seed(0)
    for i in range(args.batch):
        ids = torch.randint(10, 700, (args.prompt_len,), generator=g).tolist()
        eng.add_request(f"d{i}", {"prompt_token_ids": ids},
                        SamplingParams(temperature=0.0, max_tokens=args.steps * args.repeats + 8, ignore_eos=True))
    for _ in range(5):  # prefill + warm-up
        eng.step()
    cpu, wall = [], []
    for _ in range(args.repeats):
        c, w = time.thread_time(), time.perf_counter()
        for _ in range(args.steps):
            eng.step()
        cpu.append((time.thread_time() - c) / args.steps * 1e3)
        wall.append((time.perf_counter() - w) / args.steps * 1e3)
    for i in range(args.batch):
        eng.abort_request(f"d{i}")
    return {"workload": f"decode b{args.batch}", "cpu_ms_per_step": summary(cpu), "wall_ms_per_step": summary(wall)}


def serve_prompts(llm, n: int, seed: int) -> list[dict]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    words = ["router", "fast", "cat", "how", "river", "blue", "token", "image", "the", "a"]
    prompts = []
    for _ in range(n):
        text = " ".join(rng.choice(words, 60))
        img = Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8))
        msg = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        p = llm.engine.inputs.render_chat(msg)
        p["multi_modal_data"]["image"] = [img]
        prompts.append(p)
    return prompts


def bench_serve(llm, args) -> dict:
    from stages.engine import SamplingParams

    eng = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    rates, cpu_tok = [], []
    for rep in range(args.repeats):
        prompts = serve_prompts(llm, args.num_prompts, rep)
        todo, live, done, n_tok = list(enumerate(prompts)), 0, 0, 0
        c, w = time.thread_time(), time.perf_counter()
        while done < len(prompts):
            while todo and live < args.concurrency:
                i, p = todo.pop(0)
                eng.add_request(f"s{rep}-{i}", p, params)
                live += 1
            for out in eng.step():
                if out.finished:
                    live, done = live - 1, done + 1
                    n_tok += len(out.outputs[0].token_ids)
        rates.append(len(prompts) / (time.perf_counter() - w))
        cpu_tok.append((time.thread_time() - c) / n_tok * 1e3)
    return {"workload": f"serve c{args.concurrency}", "req_s": summary(rates), "cpu_ms_per_token": summary(cpu_tok)}


def summary(xs: list[float]) -> dict:
    return {"median": round(statistics.median(xs), 4), "min": round(min(xs), 4), "max": round(max(xs), 4)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model directory (default: the tiny LLaVA, built once)")
    ap.add_argument("--workloads", default="decode,serve")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=100)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--label", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = args.model
    if model_dir is None:
        from stages.models.make_model import make_model

        model_dir = str(ROOT / "perf" / "out" / "models" / "llava-tiny")
        make_model("llava", "tiny", model_dir, seed=0, reuse=True)
    llm = build(model_dir, args)
    for w in args.workloads.split(","):
        res = bench_decode(llm, args) if w == "decode" else bench_serve(llm, args)
        res.update(label=args.label, threads=args.threads)
        print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
