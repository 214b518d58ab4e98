"""Host image preprocessing: transformers' PIL processor vs ours, side by side in one run.

Qwen2.5-VL (the 7B preprocessor config: patch 14, merge 2, temporal 2, 4..16384 merged tokens):
transformers' processor (``load_image_processor``, the PIL flavour the engine used) against
``stages.models.image_preprocess.QwenPixels``, on 4 noise images of each size; 448/896/1344 px
are multiples of 28, so neither resizes. Ours twice: what the host does now (the uint8 patches
alone: the encoder's device does the table lookup) and float32 pixels on the host (the same plus
``qwen_pixel_values`` on the CPU, what a CPU encoder does). The three alternate over --rounds;
each round times all 4 images, and the table gives the median round with its spread (min-max),
the speed-ups of the medians over transformers and the largest difference of the float outputs
(0: the same bits).

LLaVA (CLIP, the small config: shortest edge and crop 224): transformers' processor against
PIL's bicubic resize alone, the step any exact path must keep: if the resize is most of the
time, a path of our own would gain little.

    python -m perf.bench_preprocess [--sizes 448,896,1344] [--images 4] [--rounds 5] [--model DIR]

``--model`` takes the Qwen processor from a model directory instead of the 7B config.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from stages.models.base import load_image_processor
from stages.models.image_preprocess import QwenPixels, qwen_pixel_values
from stages.models.model_configs import preprocessor_config


def config_processor(family: str, size: str):
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(family, size)))
        return load_image_processor(d)


def noise_images(count: int, px: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (px, px, 3), dtype=np.uint8)) for _ in range(count)]


def timed(fn, images) -> tuple[float, list]:
    t = time.perf_counter()
    out = [fn(img) for img in images]
    return time.perf_counter() - t, out


def summary(times: list[float]) -> str:
    return f"{statistics.median(times) * 1e3:.1f} ({min(times) * 1e3:.1f}-{max(times) * 1e3:.1f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="448,896,1344")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--model", help="a Qwen2.5-VL model directory (default: the 7B preprocessor config)")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    qwen = load_image_processor(args.model) if args.model else config_processor("qwen2_5_vl", "7b")
    ours = QwenPixels(qwen)
    clip = config_processor("llava", "small")
    side = clip.size["shortest_edge"]

    def hf_qwen(img):
        return qwen(images=[img], return_tensors="pt")["pixel_values"]

    def our_bytes(img):
        return ours(img)

    def our_floats(img):
        return qwen_pixel_values([ours(img)], "cpu", torch.float32)

    def hf_clip(img):
        return clip(images=[img], return_tensors="pt")["pixel_values"]

    def resize_only(img):
        return img.resize((side, side), resample=clip.resample)

    rows = []
    for px in sizes:
        images = noise_images(args.images, px, seed=px)
        t = {"hf_qwen": [], "ours_float": [], "ours_uint8": [], "hf_clip": [], "resize": []}
        diff = 0.0
        for _ in range(args.rounds):
            s, ref = timed(hf_qwen, images)
            t["hf_qwen"].append(s)
            s, out = timed(our_floats, images)
            t["ours_float"].append(s)
            diff = max(diff, max(float((a - b).abs().max()) for a, b in zip(out, ref)))
            del ref, out
            t["ours_uint8"].append(timed(our_bytes, images)[0])
            t["hf_clip"].append(timed(hf_clip, images)[0])
            t["resize"].append(timed(resize_only, images)[0])
        med = {k: statistics.median(v) for k, v in t.items()}
        rows.append({"px": px, "images": args.images, "rounds": args.rounds, "seconds": t,
                     "speedup_float": med["hf_qwen"] / med["ours_float"],
                     "speedup_uint8": med["hf_qwen"] / med["ours_uint8"], "max_abs_diff": diff,
                     "clip_resize_share": med["resize"] / med["hf_clip"]})
        print(f"{px}px done", flush=True)

    n = args.images
    print(f"\nQwen2.5-VL, {n} images per round, ms: median (min-max) over {args.rounds} alternating rounds")
    print("| size | transformers | ours, float32 on the host | ours, uint8 (the engine's host part) | "
          "speed-up float / uint8 | max abs diff |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        s = r["seconds"]
        print(f"| {n} x {r['px']}^2 | {summary(s['hf_qwen'])} | {summary(s['ours_float'])} | "
              f"{summary(s['ours_uint8'])} | {r['speedup_float']:.1f}x / {r['speedup_uint8']:.1f}x | "
              f"{r['max_abs_diff']:g} |")
    print(f"\nLLaVA CLIP ({side}px crop), {n} images per round, ms")
    print("| size | transformers | PIL resize alone | resize share |")
    print("|---|---|---|---|")
    for r in rows:
        s = r["seconds"]
        print(f"| {n} x {r['px']}^2 | {summary(s['hf_clip'])} | {summary(s['resize'])} | "
              f"{r['clip_resize_share']:.0%} |")
    out = Path(__file__).parent / "out" / "bench_preprocess.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"torch_threads": torch.get_num_threads(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
