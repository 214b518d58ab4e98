"""Vision tower on one GPU: our varlen attention and fast blocks vs transformers' tower, and encode + prefill.

Qwen2.5-VL's tower at the shapes of ``--model``'s config (e.g. ``make_model --size 7b
--config-only``), random weights: seconds per batch of images for transformers' own tower
(sdpa: one call per window) and for the same module with our attention (``sdpa``: grouped
by length, ``triton``: our varlen kernel), then with our blocks' fast forward too
(``+fastblocks``: ``stages/models/qwen_vision_fast.py``), the bf16 difference to transformers'
output, and then our offline ``LLM`` (dummy weights) on one request of those images with
max_tokens 1, per variant.

    python3 -m perf.bench_vision --model .q7b --out perf/results/vision/bench_vision.json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import numpy as np
import torch

from stages.attention import vision

# attention impl, "+fastblocks" for the blocks' fast forward; the variants that keep transformers'
# MLP run first, on the weights as built (the fast blocks make them views into padded storage)
VARIANTS = ("reference", "sdpa", "triton", "sdpa+fastblocks", "triton+fastblocks")


def install(module: torch.nn.Module, variant: str) -> None:
    attn, _, blocks = variant.partition("+")
    vision.use_varlen_attention(module, attn, blocks="fast" if blocks == "fastblocks" else "reference")


def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return out


def build_tower(model_dir: str, dtype: torch.dtype):
    from transformers import AutoConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    vc = AutoConfig.from_pretrained(model_dir).vision_config
    vc._attn_implementation = "sdpa"
    with torch.device("cuda"):
        tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(vc, torch_dtype=dtype)
    return tower.eval()


def bench_tower(model_dir: str, dtype: torch.dtype, sizes: list[int], count: int, reps: int,
                profile: str = "") -> list[dict]:
    tower = build_tower(model_dir, dtype)
    patch, merge, tp = tower.config.patch_size, tower.spatial_merge_size, tower.config.temporal_patch_size
    batches = []
    for px in sizes:
        side = px // patch // merge * merge
        grid = torch.tensor([[1, side, side]] * count, device="cuda")
        pixels = torch.randn(int(grid.prod(-1).sum()), 3 * tp * patch * patch, device="cuda", dtype=dtype)
        batches.append((px, pixels, grid))
    rows, refs = [], {}
    for impl in VARIANTS:  # variant by variant: the fast blocks' padding comes after the others
        install(tower, impl)
        for px, pixels, grid in batches:
            with torch.no_grad():
                out = tower(pixels, grid_thw=grid).pooler_output.float()
                times = timed(lambda: tower(pixels, grid_thw=grid), reps)
            ref = refs.setdefault(px, out)
            s = statistics.median(times)
            row = {"px": px, "images": count, "impl": impl, "s": s, "images_s": count / s,
                   "spread_s": [min(times), max(times)],
                   "rel_err_vs_reference": ((out - ref).norm() / ref.norm()).item()}
            rows.append(row)
            print(f"tower {count} x {px}px [{impl:17s}]: {s:.4f} s ({count / s:6.1f} images/s; "
                  f"min {min(times):.4f} max {max(times):.4f}), rel. diff vs transformers "
                  f"{row['rel_err_vs_reference']:.2e}", flush=True)
    for impl in filter(None, profile.split(",")):
        try:
            profile_tower(tower, pixels, grid, impl)
        except Exception as e:  # the timings above are kept
            print(f"profile [{impl}] failed: {e!r}", flush=True)
    del tower
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def profile_tower(tower, pixels, grid, impl: str, top: int = 12) -> None:
    """Per-kernel GPU time of one forward of the last (largest) batch with ``impl``."""
    from torch.profiler import ProfilerActivity, profile

    install(tower, impl)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        tower(pixels, grid_thw=grid)
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in events)
    print(f"profile [{impl}]: {total / 1e3:.1f} ms of kernels in one forward", flush=True)
    for e in events[:top]:
        print(f"    {e.device_time_total / 1e3:8.2f} ms  x{e.count:6d}  {e.key[:100]}", flush=True)


def noise_images(n: int, px: int, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (px, px, 3), dtype=np.uint8)) for _ in range(n)]


def bench_end_to_end(model_dir: str, dtype: str, px: int, count: int, reps: int, impls: list[str], record) -> None:
    """One request of ``count`` fresh images (no encoder-cache hit), max_tokens 1, via one ``LLM``
    whose tower is switched variant by variant (those with fast blocks last: they pad the MLP
    weights); ``record(row)`` per variant."""
    from stages.engine import LLM, SamplingParams

    # decode_gemv off: max_tokens 1 runs no decode step, and its start-up pick compiles ~130 kernels.
    llm = LLM(model_dir, device="cuda", dtype=dtype, load_format="dummy", kv_cache_memory_gb=16,
              enable_prefix_caching=False, max_num_batched_tokens=16384, decode_gemv=False)
    model = llm.engine.runner.model
    assert any(getattr(m, "_epd_impl", None) for m in model.modules()), "the engine's tower has no varlen attention"
    content = [{"type": "image"}] * count + [{"type": "text", "text": "Describe the images."}]
    params = SamplingParams(temperature=0.0, max_tokens=1)
    pre = []
    for img in noise_images(count, px, seed=99):  # host preprocessing alone (resize, uint8 patches)
        t = time.perf_counter()
        llm.engine.inputs.images.preprocess(img)
        pre.append(time.perf_counter() - t)
    for i, impl in enumerate(sorted(impls, key=lambda v: v.endswith("+fastblocks"))):
        try:
            install(model, impl)
            times = []
            for rep in range(reps + 1):  # the first is warm-up
                images = noise_images(count, px, seed=100 * i + rep)  # never seen by this engine's encoder cache
                prompt = llm.engine.inputs.render_chat([{"role": "user", "content": content}])
                prompt["multi_modal_data"]["image"] = images
                t = time.perf_counter()
                llm.generate(prompt, params)
                torch.cuda.synchronize()
                if rep:
                    times.append(time.perf_counter() - t)
        except Exception as e:  # the other variants' figures are kept
            print(f"end to end [{impl}] failed: {e!r}", flush=True)
            continue
        s = statistics.median(times)
        r = {"px": px, "images": count, "impl": impl, "s": s, "spread_s": [min(times), max(times)],
             "preprocess_s": sum(pre)}
        print(f"encode + prefill, {count} x {px}px, max_tokens 1 [{impl}]: {s:.3f} s (min {min(times):.3f} "
              f"max {max(times):.3f}); host preprocessing of those images alone {r['preprocess_s']:.3f} s",
              flush=True)
        record(r)
    del llm, model
    gc.collect()
    torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--sizes", default="448,896,1344")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--e2e-impls", default="reference,sdpa,sdpa+fastblocks", help="end-to-end runs ('' to skip)")
    p.add_argument("--profile", default="sdpa,sdpa+fastblocks",
                   help="variants to profile per kernel on the largest size ('' to skip)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    result = {"model": args.model, "dtype": args.dtype, "device": torch.cuda.get_device_name(),
              "torch": torch.__version__}
    result["tower"] = bench_tower(args.model, dtype, [int(x) for x in args.sizes.split(",")], args.images,
                                  args.reps, args.profile)
    write(result, args.out)
    result["end_to_end"] = []

    def record(row: dict) -> None:
        result["end_to_end"].append(row)
        write(result, args.out)

    impls = [v for v in args.e2e_impls.split(",") if v]
    if impls:
        try:
            bench_end_to_end(args.model, args.dtype, 1344, args.images, 3, impls, record)
        except Exception as e:  # the tower's figures are kept
            print(f"end to end failed: {e!r}", flush=True)


def write(result: dict, path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
