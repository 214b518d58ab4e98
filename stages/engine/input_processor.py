"""Prompt + images -> the token ids and image items the engine runs.

Each image placeholder in the prompt expands to as many tokens as the image
yields; the images are matched to placeholders in order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stages.engine.images import image_content_hash, load_image
from stages.engine.prompt_ids import TokenizedPrompt, tokenize_chat, tokenize_prompt
from stages.engine.sequence import ImageItem
from stages.models.base import ImageSupport


@dataclass
class PreparedImage:
    """An image already encoded elsewhere (an encode worker): its hash, size in tokens and
    embedding, plus the grid M-RoPE needs. Stands in for the raw image in a prompt."""

    content_hash: str
    num_tokens: int
    grid_thw: tuple[int, int, int] | None = None
    embedding: torch.Tensor | None = None


@dataclass
class ProcessedPrompt:
    token_ids: list[int]
    images: list[ImageItem]
    mrope_positions: torch.Tensor | None = None
    mrope_delta: int = 0


class InputProcessor:
    def __init__(self, tokenizer, image_support: ImageSupport | None, max_images: int):
        self.tokenizer = tokenizer
        self.images = image_support
        self.max_images = max_images

    def split(self, prompt, images: list | None = None) -> TokenizedPrompt:
        """A completion prompt (str, ids or prompt dict) -> text, ids (placeholders not yet
        expanded) and image sources; the rules are in ``prompt_ids``."""
        return tokenize_prompt(self.tokenizer, prompt, images)

    def process(self, token_ids: list[int], images: list | None) -> ProcessedPrompt:
        images = list(images or [])
        if images and self.images is None:
            raise ValueError("this model does not take images")
        if len(images) > self.max_images:
            raise ValueError(f"{len(images)} images given; at most {self.max_images} per prompt")
        if self.images is None:
            return ProcessedPrompt(list(token_ids), [])
        ph = self.images.placeholder_id
        n_ph = sum(1 for t in token_ids if t == ph)
        if n_ph != len(images):
            raise ValueError(f"the prompt has {n_ph} image placeholder(s) but {len(images)} image(s) "
                             f"were given")
        out: list[int] = []
        items: list[ImageItem] = []
        it = iter(images)
        for t in token_ids:
            if t != ph:
                out.append(t)
                continue
            src = next(it)
            if isinstance(src, PreparedImage):
                inputs = {"grid_thw": tuple(src.grid_thw)} if src.grid_thw else {}
                item = ImageItem(src.content_hash, len(out), src.num_tokens, inputs, src.embedding)
            else:
                item = self.prepare_image(src)
                item.offset = len(out)
            items.append(item)
            out.extend([ph] * item.length)
        mrope = self.images.mrope_positions(out, items)
        if mrope is None:
            return ProcessedPrompt(out, items)
        return ProcessedPrompt(out, items, mrope[0], mrope[1])

    def prepare_image(self, source) -> ImageItem:
        """Decode, hash and preprocess one image (offset still unknown: 0)."""
        if self.images is None:
            raise ValueError("this model does not take images")
        pil = load_image(source)
        inputs, n = self.images.preprocess(pil)
        return ImageItem(image_content_hash(pil), 0, n, inputs)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    chat_template: str | None = None) -> dict:
        """OpenAI-style messages -> a prompt dict (token ids + images, in order of appearance)."""
        p = tokenize_chat(self.tokenizer, messages, add_generation_prompt, chat_template)
        return {"prompt": p.text, "prompt_token_ids": p.token_ids, "multi_modal_data": {"image": p.images}}
