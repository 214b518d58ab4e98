"""The engine's GPU fast path against its floor and transformers, one run, one GPU.

Every figure sits beside its reference, measured in the same process:

- the decode floor: bytes of the weights a decode step reads (every language-model weight
  but the embedding table, which is only looked up) over the measured device copy rate;
- decode step time at batch 1/8/32/128/256 with 512- and 4,096-token contexts (tokens/s),
  for each attention backend asked (``triton``: our kernels + CUDA graphs; ``torch``: the
  old path, plain-torch attention, eager);
- prefill tokens/s at 1 x 4,096 and 8 x 2,048 tokens vs transformers' plain forward on the
  same shapes and dtype; peak GPU memory per backend.

Decode contexts are not prefilled: each sequence gets its blocks and counts its prompt as
computed (the KV holds whatever the pool held), so a 256 x 4,096 point costs no prefill.
The step is ``LLMEngine.step`` (scheduler, runner, sampler, detokenizer) with the runner's
share timed apart.

    epd-make-model --family qwen2_5_vl --size 7b --config-only --out /tmp/q7b
    python perf/bench_gpu.py --model /tmp/q7b --out perf/results/bench_gpu.json
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch

from stages.engine.config import EngineConfig
from stages.engine.llm_engine import LLMEngine
from stages.engine.sampling_params import SamplingParams
from stages.engine.sequence import SeqStatus


def copy_rate_gbs(device, nbytes: int = 2 << 30, iters: int = 10) -> float:
    """Device-to-device copy rate, bytes read + written per second (GB/s)."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    rate = 2 * nbytes * iters / (start.elapsed_time(end) / 1e3) / 1e9
    del a, b
    return rate


def decode_weight_bytes(model) -> int:
    """Bytes of the language model's weights that one decode step reads (embedding table excluded)."""
    lm = getattr(model, "language_model", model)
    embed = lm.model.embed_tokens.weight
    seen, total = set(), 0
    for p in lm.parameters():
        if p is embed and not lm.spec.tie:
            continue
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


def make_engine(args, backend: str) -> LLMEngine:
    """``backend``: an attention backend, ``+cublas`` after it to keep cuBLAS for every decode
    linear (no Triton GEMV)."""
    backend, _, variant = backend.partition("+")
    cfg = EngineConfig(model=args.model, device="cuda", dtype=args.dtype, load_format="dummy",
                       decode_gemv=False if variant == "cublas" else None,
                       kv_cache_memory_gb=args.kv_gb, max_num_seqs=max(args.batches),
                       max_num_batched_tokens=args.max_batched_tokens, enable_prefix_caching=False,
                       attention_backend=backend, cuda_graphs=backend != "torch" and not args.no_graphs)
    return LLMEngine(cfg)


def _host_timers(engine: LLMEngine) -> dict[str, list[float]]:
    """Host time of the scheduler and of the graph path's input preparation + launch (no sync)."""
    times: dict[str, list[float]] = {"schedule": [], "graph_run": [], "tables": []}

    def wrap(obj, attr, key):
        fn = getattr(obj, attr)

        def timed(*a, **kw):
            t = time.perf_counter()
            out = fn(*a, **kw)
            times[key].append(time.perf_counter() - t)
            return out

        setattr(obj, attr, timed)

    wrap(engine.scheduler, "schedule", "schedule")
    if hasattr(engine.runner, "block_tables"):
        wrap(engine.runner.block_tables, "gather", "tables")
    if engine.runner.graphs is not None:
        wrap(engine.runner.graphs, "run", "graph_run")
    return times


class _RunnerTimes(list):
    """Per-call times of ``runner.execute`` (synchronized, so only while ``on``: a sync would
    defeat the decode lookahead, whose overlap is what the async figure measures)."""
    on = True


def _runner_timer(engine: LLMEngine) -> list[float]:
    """Wrap ``runner.execute`` to record its time (synchronized) per call."""
    times = _RunnerTimes()
    execute = engine.runner.execute

    def timed(*a, **kw):
        if not times.on:
            return execute(*a, **kw)
        t = time.perf_counter()
        out = execute(*a, **kw)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        return out

    engine.runner.execute = timed
    return times


def _plain_vocab(engine: LLMEngine) -> int:
    """An id bound below the special tokens (image placeholders among them): random prompts stay text."""
    return min(engine.vocab_size, len(engine.tokenizer)) - 100


def seed_decodes(engine: LLMEngine, batch: int, ctx: int, gen: torch.Generator, tag: str) -> list[str]:
    """``batch`` running sequences whose first ``ctx`` tokens count as computed (no prefill)."""
    vocab = _plain_vocab(engine)
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    ids = []
    for i in range(batch):
        rid = f"{tag}-{i}"
        prompt = torch.randint(10, vocab, (ctx,), generator=gen).tolist()
        req = engine.prepare_request(rid, prompt, params)
        seq = req.seq
        if not engine.blocks.allocate(seq, ctx - 1):
            raise RuntimeError(f"KV pool too small for {batch} x {ctx} tokens")
        seq.num_computed_tokens = ctx - 1  # the last prompt token is the first decode
        seq.status = SeqStatus.RUNNING
        engine.scheduler.running.append(seq)
        engine.requests[rid] = req
        ids.append(rid)
    return ids


def _timed_steps(engine: LLMEngine, steps: int) -> float:
    for _ in range(3):
        engine.step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def bench_decode(engine: LLMEngine, batch: int, ctx: int, steps: int, runner_times: list[float],
                 host: dict[str, list[float]]) -> dict:
    """Serial steps first (the runner's share timed with a sync), then, where the engine has
    one, the same point with the decode lookahead (``async_decode``): ``step_ms`` is the
    engine's default mode, ``serial_step_ms`` the one without the overlap."""
    lookahead, engine.lookahead = engine.lookahead, None
    rids = seed_decodes(engine, batch, ctx, torch.Generator().manual_seed(batch * 7 + ctx), f"d{batch}x{ctx}")
    runner_times.clear()
    for v in host.values():
        v.clear()
    serial = _timed_steps(engine, steps)
    runner = sum(runner_times[-steps:]) / steps
    mean = {k: (sum(v) / len(v) * 1e3 if v else None) for k, v in host.items()}
    for rid in rids:
        engine.abort_request(rid)
    step = serial
    if lookahead is not None:
        engine.lookahead, runner_times.on = lookahead, False
        rids = seed_decodes(engine, batch, ctx, torch.Generator().manual_seed(batch * 7 + ctx + 1),
                            f"a{batch}x{ctx}")
        n0 = lookahead.num_steps
        step = _timed_steps(engine, steps)
        if lookahead.num_steps - n0 < steps:
            print(f"  (lookahead ran {lookahead.num_steps - n0} of {steps + 3} steps)", flush=True)
        for rid in rids:
            engine.abort_request(rid)
        engine.step()  # collect the step queued ahead for the aborted rows
        runner_times.on = True
    return {"batch": batch, "context": ctx, "step_ms": step * 1e3, "serial_step_ms": serial * 1e3,
            "async_decode": lookahead is not None, "runner_ms": runner * 1e3,
            "schedule_ms": mean["schedule"], "graph_run_host_ms": mean["graph_run"], "tables_ms": mean["tables"],
            "tok_s": batch / step}


def profile_decode(engine: LLMEngine, batch: int, ctx: int, steps: int = 5, top: int = 14) -> dict:
    """Per-kernel GPU time of decode steps (torch.profiler; kernels inside CUDA graphs included)."""
    from torch.profiler import ProfilerActivity, profile

    rids = seed_decodes(engine, batch, ctx, torch.Generator().manual_seed(batch + ctx), f"prof{batch}x{ctx}")
    for _ in range(3):
        engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    replay_us = None
    graphs = engine.runner.graphs
    if graphs is not None:  # the captured graph alone, back to back: its GPU time with launch gaps
        graph = graphs.graphs[next(x for x in graphs.buckets if x >= batch)][0]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        replay_us = start.elapsed_time(end) * 1e3 / 20
    for rid in rids:
        engine.abort_request(rid)
    kernels = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    kernels.sort(key=lambda e: -e.self_device_time_total)
    gpu_us = sum(e.self_device_time_total for e in kernels) / steps
    rows = [{"kernel": e.key[:90], "calls_per_step": e.count / steps, "us_per_step": e.self_device_time_total / steps}
            for e in kernels[:top]]
    return {"batch": batch, "context": ctx, "gpu_us_per_step": gpu_us, "graph_replay_us": replay_us, "top": rows}


def bench_prefill(engine: LLMEngine, n: int, length: int, reps: int = 3) -> dict:
    gen = torch.Generator().manual_seed(n * 31 + length)
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    times = []
    for rep in range(reps + 1):
        for i in range(n):
            engine.add_request(f"p{n}x{length}-{rep}-{i}",
                               torch.randint(10, _plain_vocab(engine), (length,), generator=gen).tolist(), params)
        torch.cuda.synchronize()
        t = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        torch.cuda.synchronize()
        if rep:  # the first is a warm-up
            times.append(time.perf_counter() - t)
    best = min(times)
    return {"prompts": n, "length": length, "seconds": best, "tok_s": n * length / best}


def bench_transformers_prefill(model_dir: str, dtype: torch.dtype, shapes, reps: int = 3) -> list[dict]:
    """transformers' plain forward (sdpa attention, no cache) on random weights of the same shapes."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    cfg = AutoConfig.from_pretrained(model_dir)
    cls = AutoModelForImageTextToText if cfg.model_type in ("llava", "qwen2_5_vl") else AutoModelForCausalLM
    with torch.device("cuda"):
        model = cls.from_config(cfg, dtype=dtype, attn_implementation="sdpa").eval()
    vocab = getattr(cfg, "text_config", cfg).vocab_size
    out = []
    with torch.inference_mode():
        for n, length in shapes:
            ids = torch.randint(10, vocab - 300, (n, length), device="cuda")
            times = []
            for rep in range(reps + 1):
                torch.cuda.synchronize()
                t = time.perf_counter()
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
                torch.cuda.synchronize()
                if rep:
                    times.append(time.perf_counter() - t)
            best = min(times)
            out.append({"prompts": n, "length": length, "seconds": best, "tok_s": n * length / best})
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out


def _greedy_ours(model_dir: str, prompts, max_tokens: int, backend: str, dtype: str) -> list[list[int]]:
    from stages.engine.llm import LLM

    llm = LLM(model_dir, device="cuda", dtype=dtype, kv_cache_memory_gb=4, attention_backend=backend)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return [o.outputs[0].token_ids for o in outs]


def _greedy_hf(model_dir: str, prompts, max_tokens: int, dtype: torch.dtype) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).cuda().eval()
    out = []
    with torch.inference_mode():
        for p in prompts:
            out.append(hf.generate(torch.tensor([p], device="cuda"), max_new_tokens=max_tokens,
                                   min_new_tokens=max_tokens, do_sample=False)[0, len(p):].tolist())
    del hf
    gc.collect()
    torch.cuda.empty_cache()
    return out


def bf16_agreement(model_dir: str, n_prompts: int = 16, max_tokens: int = 32) -> dict:
    """Greedy tokens in bf16 against transformers' fp32 greedy tokens on the same weights: the share
    of tokens before the first divergence, for transformers bf16 (the baseline: what bf16 rounding
    alone does), our fast path (triton) and our old path (torch)."""
    from transformers import AutoTokenizer

    gen = torch.Generator().manual_seed(5)
    tok = AutoTokenizer.from_pretrained(model_dir)
    hi = len(tok) - 100
    prompts = [torch.randint(10, hi, (int(n),), generator=gen).tolist()
               for n in torch.randint(8, 300, (n_prompts,), generator=gen)]
    ref = _greedy_hf(model_dir, prompts, max_tokens, torch.float32)
    runs = {"transformers bf16": _greedy_hf(model_dir, prompts, max_tokens, torch.bfloat16),
            "epd bf16 triton": _greedy_ours(model_dir, prompts, max_tokens, "triton", "bfloat16"),
            "epd bf16 torch": _greedy_ours(model_dir, prompts, max_tokens, "torch", "bfloat16"),
            "epd fp32 triton": _greedy_ours(model_dir, prompts, max_tokens, "triton", "float32")}
    result = {"prompts": n_prompts, "max_tokens": max_tokens, "reference": "transformers fp32"}
    for name, toks in runs.items():
        before = [next((i for i, (a, b) in enumerate(zip(r, t)) if a != b), len(r)) for r, t in zip(ref, toks)]
        result[name] = {"tokens_before_divergence": sum(before) / (n_prompts * max_tokens),
                        "prompts_identical": sum(b == max_tokens for b in before) / n_prompts}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a model directory (e.g. make_model --size 7b --config-only)")
    p.add_argument("--backends", default="triton,torch", help="attention backends, comma-separated")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batches", default="1,8,32,128,256")
    p.add_argument("--contexts", default="512,4096")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--torch-steps", type=int, default=3, help="decode steps timed on the (slow) torch path")
    p.add_argument("--kv-gb", type=float, default=64.0)
    p.add_argument("--max-batched-tokens", type=int, default=16384)
    p.add_argument("--no-graphs", action="store_true")
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--profile", default="", help="decode points to profile per kernel, e.g. 1x512,128x512")
    p.add_argument("--agreement-model", default=None, help="a text model with weights: bf16 greedy agreement "
                   "of ours with transformers")
    p.add_argument("--out", default=None, help="write the figures here as JSON")
    args = p.parse_args()
    args.batches = [int(x) for x in args.batches.split(",")]
    contexts = [int(x) for x in args.contexts.split(",")]
    dtype = getattr(torch, args.dtype)
    result: dict = {"model": args.model, "dtype": args.dtype, "device": torch.cuda.get_device_name()}
    result["copy_gb_s"] = copy_rate_gbs("cuda")
    print(f"device copy: {result['copy_gb_s']:.0f} GB/s (read + write)", flush=True)
    prefill_shapes = [(1, 4096), (8, 2048)]
    if not args.no_transformers:
        result["transformers_prefill"] = bench_transformers_prefill(args.model, dtype, prefill_shapes)
        for r in result["transformers_prefill"]:
            print(f"transformers forward {r['prompts']} x {r['length']}: {r['tok_s']:,.0f} tok/s", flush=True)
    for backend in args.backends.split(","):
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        engine = make_engine(args, backend)
        entry: dict = {"start_s": time.perf_counter() - t}
        wbytes = decode_weight_bytes(engine.runner.model)
        floor_ms = wbytes / (result["copy_gb_s"] * 1e9) * 1e3  # the copy rate counts all bytes moved
        result["decode_weight_gb"], result["floor_ms"] = wbytes / 1e9, floor_ms
        print(f"[{backend}] engine up in {entry['start_s']:.1f} s; decode reads {wbytes / 1e9:.2f} GB of "
              f"weights: floor {floor_ms:.2f} ms/step", flush=True)
        runner_times = _runner_timer(engine)
        host = _host_timers(engine)
        entry["prefill"] = []
        for n, length in prefill_shapes:
            r = bench_prefill(engine, n, length)
            entry["prefill"].append(r)
            print(f"[{backend}] prefill {n} x {length}: {r['tok_s']:,.0f} tok/s", flush=True)
        entry["decode"] = []
        steps = args.torch_steps if backend == "torch" else args.steps
        for ctx in contexts:
            for b in args.batches:
                r = bench_decode(engine, b, ctx, steps, runner_times, host)
                r["x_floor"] = r["step_ms"] / floor_ms
                entry["decode"].append(r)
                print(f"[{backend}] decode batch {b:3d} ctx {ctx}: step {r['step_ms']:7.2f} ms "
                      f"(serial {r['serial_step_ms']:7.2f}) "
                      f"(runner {r['runner_ms']:7.2f}, schedule {r['schedule_ms']:5.2f}, graph inputs+launch "
                      f"{r['graph_run_host_ms'] or 0:5.2f}, tables {r['tables_ms'] or 0:5.2f}) = {r['x_floor']:5.2f}x floor, {r['tok_s']:9,.0f} tok/s",
                      flush=True)
        entry["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
        entry["profiles"] = []
        for point in filter(None, args.profile.split(",")):
            b, ctx = (int(x) for x in point.split("x"))
            for graphs in ([True, False] if engine.runner.graphs is not None and b == 1 else [True]):
                saved = engine.runner.graphs
                if not graphs:
                    engine.runner.graphs = None
                prof = profile_decode(engine, b, ctx)
                engine.runner.graphs = saved
                prof["cuda_graphs"] = graphs and saved is not None
                entry["profiles"].append(prof)
                print(f"[{backend}] profile batch {b} ctx {ctx} (graphs {prof['cuda_graphs']}): "
                      f"{prof['gpu_us_per_step']:.0f} us of kernels per step; graph replay alone "
                      f"{prof['graph_replay_us'] or 0:.0f} us", flush=True)
                for r in prof["top"]:
                    print(f"    {r['us_per_step']:8.1f} us  x{r['calls_per_step']:5.0f}  {r['kernel']}", flush=True)
        result[backend] = entry
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    if args.agreement_model:
        try:
            result["bf16_agreement"] = r = bf16_agreement(args.agreement_model)
            for name, v in r.items():
                if isinstance(v, dict):
                    print(f"greedy vs transformers fp32, {name}: {v['tokens_before_divergence']:.1%} of tokens "
                          f"before the first divergence, {v['prompts_identical']:.0%} of prompts identical",
                          flush=True)
        except Exception as e:  # the figures above are kept
            print(f"bf16 agreement failed: {e!r}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
