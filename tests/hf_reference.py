"""Greedy reference outputs from Hugging Face transformers on the same model directory.

Each prompt runs alone (batch of one, no padding) so the reference is
transformers at its most literal. ``hf_chat`` / ``hf_completion`` take the prompt
ids from transformers' own processor (chat template, special tokens, image
placeholders expanded); ``hf_greedy`` takes ids we made and expands them here.
"""

from __future__ import annotations

import functools

import torch

from tests.conftest import TEST_DEVICE


@functools.lru_cache(maxsize=8)
def load_hf(model_dir: str):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from stages.models.base import load_image_processor
    from transformers import AutoTokenizer

    cfg = AutoConfig.from_pretrained(model_dir)
    vlm = cfg.model_type in ("llava", "qwen2_5_vl")
    cls = AutoModelForImageTextToText if vlm else AutoModelForCausalLM
    model = cls.from_pretrained(model_dir, dtype=torch.float32).to(TEST_DEVICE).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ip = load_image_processor(model_dir) if vlm else None
    return model, tok, ip


def expand_inputs(model_dir: str, token_ids: list[int], images: list) -> tuple[list[int], dict]:
    """Expand image placeholders and build the vision kwargs ``generate`` needs."""
    model, _, ip = load_hf(model_dir)
    cfg = model.config
    if not images:
        if cfg.model_type == "qwen2_5_vl":
            return token_ids, {"mm_token_type_ids": torch.zeros(1, len(token_ids), dtype=torch.int)}
        return token_ids, {}
    out: list[int] = []
    if cfg.model_type == "llava":
        pixel = ip(images=images, return_tensors="pt")["pixel_values"]
        counts = iter([cfg.image_seq_length] * len(images))
        kwargs = {"pixel_values": pixel}
    else:
        proc = ip(images=images, return_tensors="pt")
        grid = proc["image_grid_thw"]
        counts = iter((grid.prod(-1) // cfg.vision_config.spatial_merge_size ** 2).tolist())
        kwargs = {"pixel_values": proc["pixel_values"], "image_grid_thw": grid}
    for t in token_ids:
        out.extend([t] * next(counts) if t == cfg.image_token_id else [t])
    if cfg.model_type == "qwen2_5_vl":
        # Without mm_token_type_ids transformers silently falls back to 1-D positions.
        kwargs["mm_token_type_ids"] = (torch.tensor([out]) == cfg.image_token_id).int()
    return out, kwargs


@functools.lru_cache(maxsize=8)
def load_processor(model_dir: str):
    """transformers' processor for the directory (the tokenizer itself for text families).

    Qwen2.5-VL's AutoProcessor insists on a video processor, which needs torchvision: there
    the same processor class is built from the image processor and tokenizer alone.
    """
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    if AutoConfig.from_pretrained(model_dir).model_type != "qwen2_5_vl":
        return AutoProcessor.from_pretrained(model_dir)
    from transformers.models.qwen2_5_vl import Qwen2_5_VLProcessor

    from stages.models.base import load_image_processor

    class ImageOnlyProcessor(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            return  # video_processor=None is fine for image-only prompts

    tok = AutoTokenizer.from_pretrained(model_dir)
    return ImageOnlyProcessor(image_processor=load_image_processor(model_dir), tokenizer=tok,
                              video_processor=None, chat_template=tok.chat_template)


def _with_images(messages: list[dict], images: list) -> list[dict]:
    """Messages whose ``{"type": "image"}`` parts carry the images, in order (for the processor)."""
    it = iter(images)
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [{"type": "image", "image": next(it)} if p["type"] in ("image", "image_url") else p
                       for p in content]
        out.append({**m, "content": content})
    return out


def hf_chat_inputs(model_dir: str, messages: list[dict], images: list = (),
                   add_generation_prompt: bool = True) -> dict:
    """transformers' model inputs for a chat: ``processor.apply_chat_template(tokenize=True)``.

    Image parts of ``messages`` take ``images`` in order.
    """
    proc = load_processor(model_dir)
    out = proc.apply_chat_template(_with_images(messages, list(images)), tokenize=True, return_dict=True,
                                   add_generation_prompt=add_generation_prompt, return_tensors="pt")
    return dict(out)


def hf_completion_inputs(model_dir: str, prompt: str, images: list = ()) -> dict:
    """transformers' model inputs for a completion prompt: ``processor(text=prompt, images=...)``."""
    proc = load_processor(model_dir)
    kwargs = {"images": list(images)} if images else {}
    return dict(proc(text=prompt, return_tensors="pt", **kwargs))


@torch.inference_mode()
def hf_generate(model_dir: str, inputs: dict, max_new_tokens: int) -> list[int]:
    """Greedy new tokens from ``generate`` on inputs built by ``hf_chat_inputs`` / ``hf_completion_inputs``."""
    model, tok, _ = load_hf(model_dir)
    inputs = {k: v.to(TEST_DEVICE) for k, v in inputs.items()}
    if model.config.model_type == "qwen2_5_vl" and "mm_token_type_ids" not in inputs:
        # Without mm_token_type_ids transformers silently falls back to 1-D positions.
        inputs["mm_token_type_ids"] = (inputs["input_ids"] == model.config.image_token_id).int()
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id or 0)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def hf_chat(model_dir: str, messages: list[dict], images: list = (), max_new_tokens: int = 16
            ) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy new tokens) of transformers for a chat, rendered by its processor."""
    inputs = hf_chat_inputs(model_dir, messages, images)
    return inputs["input_ids"][0].tolist(), hf_generate(model_dir, inputs, max_new_tokens)


def hf_completion(model_dir: str, prompt: str, images: list = (), max_new_tokens: int = 16
                  ) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy new tokens) of transformers for a completion prompt."""
    inputs = hf_completion_inputs(model_dir, prompt, images)
    return inputs["input_ids"][0].tolist(), hf_generate(model_dir, inputs, max_new_tokens)


@torch.inference_mode()
def hf_greedy(model_dir: str, token_ids: list[int], max_new_tokens: int, images: list | None = None) -> list[int]:
    model, tok, _ = load_hf(model_dir)
    ids, kwargs = expand_inputs(model_dir, token_ids, list(images or []))
    inp = torch.tensor([ids], device=TEST_DEVICE)
    kwargs = {k: v.to(TEST_DEVICE) for k, v in kwargs.items()}
    out = model.generate(inp, attention_mask=torch.ones_like(inp), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tok.pad_token_id or 0, **kwargs)
    return out[0, inp.shape[1]:].tolist()


@torch.inference_mode()
def hf_logprobs(model_dir: str, prompt_ids: list[int], output_ids: list[int]) -> torch.Tensor:
    """log_softmax over the vocabulary at every output position: [len(output_ids), vocab]."""
    model, _, _ = load_hf(model_dir)
    ids = torch.tensor([prompt_ids + output_ids], device=TEST_DEVICE)
    logits = model(ids).logits[0, len(prompt_ids) - 1: -1].float()
    return torch.log_softmax(logits, dim=-1).cpu()
