"""``epd-generate``: run the offline engine on a prompt (and images) and print the answer.

With no ``--model`` it builds the tiny LLaVA (random weights, local
tokenizer) under ``~/.cache/epd/models`` and shows a picture to it, so the
whole path - image preprocessing, vision encoder, paged decoder - runs on a
fresh machine with nothing downloaded.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

DEFAULT_FAMILY = "llava"


def default_model_dir(family: str = DEFAULT_FAMILY, size: str = "tiny") -> Path:
    from stages.models.make_model import make_model

    root = Path(os.environ.get("EPD_CACHE", Path.home() / ".cache" / "epd")) / "models"
    return make_model(family, size, root / f"{family}-{size}", seed=0, reuse=True)


def demo_image():
    """A gradient picture, so the demo needs no file."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:96, 0:128]
    rgb = np.stack([x * 2, y * 2, (x + y)], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="epd-generate", description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="local HF-format model directory (default: build the tiny LLaVA)")
    ap.add_argument("--prompt", default="Describe this picture.")
    ap.add_argument("--image", action="append", default=None, help="image path or data URL (repeatable)")
    ap.add_argument("--no-image", action="store_true", help="text only")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"])
    args = ap.parse_args(argv)

    from stages.engine import LLM, SamplingParams

    model = args.model or str(default_model_dir())
    t0 = time.perf_counter()
    llm = LLM(model, device=args.device, dtype=args.dtype, load_format=args.load_format)
    load_s = time.perf_counter() - t0
    content: list[dict] = []
    if llm.engine.runner.model.is_multimodal and not args.no_image:
        images = args.image or [demo_image()]
        content += [{"type": "image", "image": im} if not isinstance(im, str) else
                    {"type": "image_url", "image_url": {"url": im}} for im in images]
    content.append({"type": "text", "text": args.prompt})
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)
    t1 = time.perf_counter()
    out = llm.chat([{"role": "user", "content": content}], params)[0]
    gen_s = time.perf_counter() - t1
    comp = out.outputs[0]
    print(f"model: {model}  (loaded in {load_s:.1f} s)")
    print(f"prompt tokens: {len(out.prompt_token_ids)}  output tokens: {len(comp.token_ids)}  "
          f"finish: {comp.finish_reason}  time: {gen_s:.2f} s")
    print(f"token ids: {comp.token_ids}")
    print(f"text: {comp.text!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
