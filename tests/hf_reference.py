"""Greedy reference outputs from Hugging Face transformers on the same model directory.

Each prompt runs alone (batch of one, no padding) so the reference is
transformers at its most literal. Image placeholders are expanded here the way
the real processors do it (the combined Processor classes need torchvision,
which this machine lacks).
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
