"""Offline throughput: our engine vs transformers ``generate`` (and vLLM-CPU), one run, same prompts.

Every system gets the same model directory, the same random prompts (token
ids, mixed lengths) and a fixed number of output tokens per prompt (eos
ignored), and reports output tokens per second of generation (loading
excluded). vLLM-CPU, when its venv is given, runs in its own process.

    python perf/bench_engine.py --family llama --size small --num-prompts 32 \
        --vllm ~/.cache/epd-peers/vllm-cpu
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def make_prompts(vocab: int, n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    # Stay clear of the special tokens at the top/bottom of the vocabulary.
    return [torch.randint(10, vocab - 300, (m,), generator=g).tolist() for m in lens]


def output_lens(spec: str, n: int, seed: int) -> list[int]:
    """``64`` -> every request 64 tokens; ``16,128`` -> uniform per request (like real answers)."""
    if "," not in spec:
        return [int(spec)] * n
    lo, hi = (int(x) for x in spec.split(","))
    return torch.randint(lo, hi + 1, (n,), generator=torch.Generator().manual_seed(seed + 1)).tolist()


def bench_ours(model_dir: str, prompts, out_lens: list[int], args) -> dict:
    from stages.engine import LLM, SamplingParams

    llm = LLM(model_dir, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_batched_tokens,
              kv_cache_memory_gb=args.kv_gb, device=args.device, dtype=args.dtype)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in out_lens]
    llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    dt = time.perf_counter() - t
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"system": "epd", "seconds": dt, "output_tokens": n_out, "output_tok_s": n_out / dt,
            "token_ids": [o.outputs[0].token_ids for o in outs]}


def bench_hf(model_dir: str, prompts, out_lens: list[int], batch: int, device: str, dtype: str) -> dict:
    """Static batches: each runs to its longest request; only each request's own tokens count."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    pad = 0
    n_out, t = 0, time.perf_counter()
    token_ids = []
    with torch.inference_mode():
        for i in range(0, len(prompts), batch):
            chunk, lens = prompts[i:i + batch], out_lens[i:i + batch]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)  # left padding
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max(lens), min_new_tokens=max(lens),
                                 do_sample=False, pad_token_id=pad)
            for row, n in zip(out[:, width:].tolist(), lens):
                token_ids.append(row[:n])
                n_out += n
    dt = time.perf_counter() - t
    return {"system": f"transformers (batch {batch})", "seconds": dt, "output_tokens": n_out,
            "output_tok_s": n_out / dt, "token_ids": token_ids}


VLLM_SCRIPT = textwrap.dedent("""
    import json, sys, time


    def main():
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
        args = json.load(open(sys.argv[1]))
        llm = LLM(args["model"], dtype="float32", max_model_len=args["max_model_len"],
                  max_num_seqs=args["max_num_seqs"], seed=0)
        params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in args["out_lens"]]
        llm.generate([TokensPrompt(prompt_token_ids=args["prompts"][0])],
                     SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
        t = time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in args["prompts"]], params, use_tqdm=False)
        dt = time.perf_counter() - t
        ids = [list(o.outputs[0].token_ids) for o in outs]
        print("RESULT " + json.dumps({"seconds": dt, "output_tokens": sum(map(len, ids)), "token_ids": ids}))


    if __name__ == "__main__":  # vLLM spawns its engine core
        main()
""")


def bench_vllm(venv: str, model_dir: str, prompts, out_lens: list[int], args, threads: int | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "args.json"
        spec.write_text(json.dumps({"model": model_dir, "prompts": prompts, "out_lens": out_lens,
                                    "max_model_len": args.max_model_len, "max_num_seqs": args.max_num_seqs}))
        script = Path(tmp) / "run_vllm.py"
        script.write_text(VLLM_SCRIPT)
        env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE=str(max(1, int(args.kv_gb))),
                   VLLM_CACHE_ROOT=str(Path.home() / ".cache" / "vllm-peer"))
        env.pop("OMP_NUM_THREADS", None)
        if threads:  # vLLM otherwise keeps one core for its front end and computes on one thread
            env["OMP_NUM_THREADS"] = str(threads)
        proc = subprocess.run([f"{venv}/bin/python", str(script), str(spec)], capture_output=True, text=True,
                              env=env, cwd=tmp, timeout=1800)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"vLLM run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    res = json.loads(line[len("RESULT "):])
    label = f"vllm-cpu 0.32 ({threads} threads)" if threads else "vllm-cpu 0.32 (default)"
    res.update(system=label, output_tok_s=res["output_tokens"] / res["seconds"])
    return res


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of prompts whose greedy outputs are identical (a correctness cross-check)."""
    return sum(x == y for x, y in zip(a, b)) / max(1, len(a))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="llama")
    ap.add_argument("--size", default="small")
    ap.add_argument("--model", help="an existing model directory (default: build family/size)")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--input-len", default="64,256", help="min,max prompt tokens")
    ap.add_argument("--output-len", default="64", help="N, or min,max drawn per request")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-batched-tokens", type=int, default=2048)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--kv-gb", type=float, default=2.0)
    ap.add_argument("--hf-batch", default="8,32", help="static batch size(s) for transformers, comma-separated")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--vllm", help="a virtual environment holding a vLLM CPU build")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="float32 | bfloat16 (ours and transformers alike)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "perf" / "out" / "bench_engine.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model_dir = args.model
    if model_dir is None:
        from stages.models.make_model import make_model

        model_dir = str(ROOT / "perf" / "out" / "models" / f"{args.family}-{args.size}")
        make_model(args.family, args.size, model_dir, seed=0, reuse=True)
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    vocab = (getattr(cfg, "text_config", None) or cfg).vocab_size
    lo, hi = (int(x) for x in args.input_len.split(","))
    prompts = make_prompts(min(vocab, 8000), args.num_prompts, lo, hi, args.seed)
    out_lens = output_lens(args.output_len, args.num_prompts, args.seed)

    results = [bench_ours(model_dir, prompts, out_lens, args)]
    if not args.skip_hf:
        for b in sorted({int(x) for x in str(args.hf_batch).split(",")}):
            results.append(bench_hf(model_dir, prompts, out_lens, b, args.device, args.dtype))
    if args.vllm:
        results.append(bench_vllm(args.vllm, model_dir, prompts, out_lens, args, None))
        results.append(bench_vllm(args.vllm, model_dir, prompts, out_lens, args, args.threads))
    ours = results[0]
    print(f"model {model_dir}  prompts {args.num_prompts}  input {lo}-{hi}  output {args.output_len}  "
          f"device {args.device} {args.dtype}  threads {args.threads}")
    print(f"{'system':<28}{'seconds':>9}{'out tok/s':>11}{'epd / it':>10}{'same tokens':>13}")
    for r in results:
        print(f"{r['system']:<28}{r['seconds']:>9.2f}{r['output_tok_s']:>11.1f}"
              f"{ours['output_tok_s'] / r['output_tok_s']:>10.2f}{agreement(ours['token_ids'], r['token_ids']):>12.0%}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    summary = {"args": vars(args), "model": model_dir,
               "results": [{k: v for k, v in r.items() if k != "token_ids"} for r in results]}
    Path(args.out).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
