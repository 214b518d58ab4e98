"""Request generators: ``random`` text, ``random-mm`` (text + noise images), ``jsonl`` (chat bodies).

Every generator is deterministic for a seed. A :class:`Request` holds the chat body without
``model``/``stream`` (the client adds them) and what the metrics need to know about it.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Request:
    body: dict            # OpenAI chat body: messages, max_tokens, ... (no model, no stream)
    prompt_len: int       # text tokens asked for (the server's usage chunk has the real count)
    output_len: int | None
    n_images: int = 0


def parse_range(text: str | int) -> tuple[int, int]:
    """"64" -> (64, 64); "32-128" -> (32, 128), inclusive."""
    lo, _, hi = str(text).partition("-")
    lo_i, hi_i = int(lo), int(hi or lo)
    if not 0 <= lo_i <= hi_i:
        raise ValueError(f"bad range {text!r}: want N or LO-HI with 0 <= LO <= HI")
    return lo_i, hi_i


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """"112x112,224x160" -> [(112, 112), (224, 160)] as (width, height)."""
    sizes = []
    for part in text.split(","):
        w, _, h = part.strip().lower().partition("x")
        sizes.append((int(w), int(h)))
    return sizes


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _random_prompt(tokenizer, allowed: np.ndarray, length: int, rng: np.random.Generator) -> str:
    # Like vLLM's random dataset: decode random ids, re-encode, truncate to the target length and
    # decode again, because N ids rarely decode to a string that re-encodes to N ids.
    ids = allowed[rng.integers(0, len(allowed), size=length)].tolist()
    text = tokenizer.decode(ids, skip_special_tokens=True)
    ids = tokenizer.encode(text, add_special_tokens=False)[:length]
    return tokenizer.decode(ids, skip_special_tokens=True)


def _allowed_ids(tokenizer) -> np.ndarray:
    special = set(tokenizer.all_special_ids)
    return np.array([i for i in range(tokenizer.vocab_size) if i not in special])


def noise_image_url(width: int, height: int, rng: np.random.Generator, fmt: str = "png") -> str:
    """A random-noise image as a data URL; ``fmt`` png (lossless) or jpeg (what vLLM's random-mm sends)."""
    from PIL import Image

    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt.upper())
    return f"data:image/{fmt};base64," + base64.b64encode(buf.getvalue()).decode()


def random_requests(tokenizer, num: int, input_len: tuple[int, int], output_len: tuple[int, int],
                    seed: int = 0, images: tuple[int, int] = (0, 0),
                    sizes: list[tuple[int, int]] | None = None, image_format: str = "png") -> list[Request]:
    """Random-token prompts; with ``images`` (LO, HI) each request also gets a uniform draw of
    LO..HI noise images (``image_format``), each of a size drawn uniformly from ``sizes``."""
    rng = np.random.default_rng(seed)
    allowed = _allowed_ids(tokenizer)
    sizes = sizes or [(112, 112)]
    out = []
    for _ in range(num):
        n_in = int(rng.integers(input_len[0], input_len[1] + 1))
        n_out = int(rng.integers(output_len[0], output_len[1] + 1))
        prompt = _random_prompt(tokenizer, allowed, n_in, rng)
        n_img = int(rng.integers(images[0], images[1] + 1))
        if n_img == 0:
            content: str | list = prompt
        else:
            content = [{"type": "text", "text": prompt}]  # text first, images after: vLLM's order
            for _ in range(n_img):
                w, h = sizes[int(rng.integers(0, len(sizes)))]
                content.append({"type": "image_url", "image_url": {"url": noise_image_url(w, h, rng, image_format)}})
        body = {"messages": [{"role": "user", "content": content}], "max_tokens": n_out}
        out.append(Request(body, n_in, n_out, n_img))
    return out


def jsonl_requests(path: str | Path, num: int, output_len: tuple[int, int] | None = None) -> list[Request]:
    """One OpenAI chat body per line, in file order, cycled up to ``num``; ``output_len`` overrides
    each body's ``max_tokens`` (so that ``ignore_eos`` can fix the output length)."""
    bodies = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not bodies:
        raise ValueError(f"{path}: no requests")
    out = []
    for i in range(num):
        body = {k: v for k, v in bodies[i % len(bodies)].items() if k not in ("model", "stream", "stream_options")}
        if "messages" not in body:
            raise ValueError(f"{path}:{i % len(bodies) + 1}: not a chat body (no messages)")
        if output_len is not None:
            body.pop("max_completion_tokens", None)
            body["max_tokens"] = output_len[1]
        n_out = body.get("max_tokens", body.get("max_completion_tokens"))
        n_img = sum(1 for m in body["messages"] if isinstance(m.get("content"), list)
                    for p in m["content"] if p.get("type") == "image_url")
        out.append(Request(body, 0, n_out, n_img))
    return out
