"""A request's size in tokens, counted in the router without torch or transformers.

The router needs it to predict (prefill cost grows with the prompt, encode cost with the
images) and to find the prompt's blocks in the prefix caches (``router.prefix_price``) before
any worker sees the request. The special-token rule is the workers' own
(``stages/engine/prompt_ids.py``, torch-free: the router imports that one module of ``stages``),
called on the ``tokenizers`` library through ``_Tokenizer``; the chat template is rendered with
``jinja2`` as transformers renders it (trim_blocks, lstrip_blocks, the special tokens as variables):

- chat: the rendered text, with the special tokens unless it begins with the bos token;
- completion text: with the special tokens; completion ids: counted as given;
- each image placeholder becomes the image's tokens, from the family's arithmetic on the
  image's size (read from its header; never decoded): LLaVA a fixed
  ``(image_size / patch_size) ** 2`` (+1 with the CLS feature), Qwen2.5-VL the resized grid
  ``(h / patch) * (w / patch) / merge ** 2`` with h, w rounded to ``patch * merge`` inside
  ``[min_pixels, max_pixels]``.

The worker's count stays the truth (it runs the request); the router counts every
disagreement (``epd:prompt_token_count_mismatch_total``).
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from stages.engine.image_geometry import qwen_resize
from stages.engine.prompt_ids import chat_text_ids, completion_ids

log = logging.getLogger("epd.router")


@dataclass
class RequestSize:
    prompt_tokens: int  # the whole prompt, images expanded
    image_tokens: list[int] = field(default_factory=list)  # per image, in order
    exact: bool = True  # False: an estimate (no tokenizer could be loaded)
    # The prompt's ids with each image's placeholder run expanded, and where each run starts: what
    # the workers hash into prefix-cache blocks. None for an estimate.
    token_ids: list[int] | None = None
    image_offsets: list[int] = field(default_factory=list)


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the image header (PIL reads no pixel data for this)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return img.size


class ImageTokens:
    """Tokens an image expands to, per family, from its width and height."""

    def __init__(self, model_dir: Path, config: dict):
        self.kind = config.get("model_type", "")
        vc = config.get("vision_config") or {}
        pre = _json(model_dir / "preprocessor_config.json")
        if self.kind == "llava":
            n = (vc.get("image_size", 336) // vc.get("patch_size", 14)) ** 2
            self.fixed = n if config.get("vision_feature_select_strategy", "default") == "default" else n + 1
        elif self.kind in ("qwen2_5_vl", "qwen2_vl"):
            self.fixed = None
            self.patch = pre.get("patch_size", vc.get("patch_size", 14))
            self.merge = pre.get("merge_size", vc.get("spatial_merge_size", 2))
            size = pre.get("size") or {}
            self.min_pixels = pre.get("min_pixels") or size.get("shortest_edge") or 56 * 56
            self.max_pixels = pre.get("max_pixels") or size.get("longest_edge") or 28 * 28 * 1280
        else:
            raise ValueError(f"no image-token arithmetic for model type {self.kind!r}")

    def count(self, data: bytes) -> int:
        if self.fixed is not None:
            return self.fixed
        width, height = image_size(data)
        h, w = qwen_resize(height, width, self.patch * self.merge, self.min_pixels, self.max_pixels)
        return (h // self.patch) * (w // self.patch) // self.merge ** 2


class _Tokenizer:
    """The two things ``prompt_ids``' rule asks of a transformers tokenizer, over ``tokenizers``."""

    def __init__(self, tokenizer, bos_token: str | None):
        self._tokenizer, self.bos_token = tokenizer, bos_token

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids


class PromptSizer:
    """Counts a request's prompt tokens the way the workers will (see the module docstring)."""

    def __init__(self, model_dir: str | Path):
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from tokenizers import Tokenizer

        d = Path(model_dir)
        self.tokenizer = Tokenizer.from_file(str(d / "tokenizer.json"))
        tcfg = _json(d / "tokenizer_config.json")
        template = tcfg.get("chat_template")
        if (d / "chat_template.jinja").exists():
            template = (d / "chat_template.jinja").read_text()
        elif (d / "chat_template.json").exists():
            template = _json(d / "chat_template.json").get("chat_template", template)
        if isinstance(template, list):  # named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)

        def special(v):
            return v.get("content") if isinstance(v, dict) else v

        self.specials = {k: special(v) for k, v in tcfg.items() if k.endswith("_token") and special(v)}
        self.rule_tokenizer = _Tokenizer(self.tokenizer, self.specials.get("bos_token"))
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])

        def raise_exception(message):
            raise ValueError(message)

        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        self.template = env.from_string(template) if template else None
        config = _json(d / "config.json")
        self.placeholder = config.get("image_token_id", config.get("image_token_index"))
        try:
            self.images = ImageTokens(d, config) if config.get("vision_config") else None
        except ValueError as e:
            log.warning("%s: image tokens will be estimated", e)
            self.images = None

    def text_ids(self, req) -> list[int]:
        if req.prompt_token_ids is not None:
            return list(req.prompt_token_ids)
        if req.messages is not None:
            if self.template is None:
                raise ValueError("the model has no chat template")
            text = self.template.render(messages=req.messages, add_generation_prompt=req.add_generation_prompt,
                                        **self.specials)
            return chat_text_ids(self.rule_tokenizer, text)
        return completion_ids(self.rule_tokenizer, req.prompt or "")

    def count(self, req) -> RequestSize:
        ids = self.text_ids(req)
        if not req.images:
            return RequestSize(len(ids), token_ids=ids)
        exact = self.images is not None
        per_image = [self.images.count(b) if exact else 576 for b in req.images]
        if not exact or self.placeholder is None or ids.count(self.placeholder) != len(per_image):
            # The worker will refuse or estimate this prompt: count it, hash nothing.
            placeholders = ids.count(self.placeholder) if self.placeholder is not None else len(req.images)
            return RequestSize(len(ids) - placeholders + sum(per_image), per_image, exact)
        expanded, offsets, it = [], [], iter(per_image)
        for t in ids:  # as the engine's InputProcessor.process expands them
            if t == self.placeholder:
                offsets.append(len(expanded))
                expanded.extend([t] * next(it))
            else:
                expanded.append(t)
        return RequestSize(len(expanded), per_image, exact, expanded, offsets)


def estimate(req) -> RequestSize:
    """Without a tokenizer: about four characters a token, 576 tokens an image."""
    if req.prompt_token_ids is not None:
        n = len(req.prompt_token_ids)
    elif req.messages is not None:
        n = sum(len(p.get("text", "")) if isinstance(p, dict) else 0
                for msg in req.messages
                for p in (msg.get("content") if isinstance(msg.get("content"), list) else [{"text": msg.get("content") or ""}])) // 4 + 8
    else:
        n = len(req.prompt or "") // 4 + 1
    return RequestSize(n + 576 * len(req.images), [576] * len(req.images), exact=False)
