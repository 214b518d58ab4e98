"""Size tables and hub-style ``config.json`` dicts for the synthetic models.

The dicts mimic the files of the real hub repositories (Llama-3, Qwen2.5, Qwen3,
llava-1.5-hf, Qwen2.5-VL), in their *original* flat layout: ``rope_theta`` at the
top level and, for Qwen2.5-VL, the text fields at the root beside a nested
``vision_config`` with ``rope_scaling = {"type": "mrope", ...}``. Transformers 5
reads this legacy layout (it nests the text fields into ``text_config`` and turns
``rope_scaling`` into ``text_config.rope_parameters`` on load), and so do older
transformers releases and vLLM, which is why it was preferred over the nested
layout transformers 5 would write itself.

Token ids are not known here: the caller passes the ids of its tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass

FAMILIES = ("llava", "qwen2_5_vl", "qwen2", "qwen3", "llama")
SIZES = ("tiny", "small", "7b")
# A size only some families have: 7b is Qwen2.5-VL-7B-Instruct's shape, served with dummy weights.
SIZE_FAMILIES = {"7b": ("qwen2_5_vl",)}


@dataclass(frozen=True)
class TextSize:
    """Decoder shape; ``vocab_size`` is the padded embedding size (>= tokenizer size)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab_size: int
    tokenizer_tokens: int  # target length of the trained tokenizer, specials included
    max_positions: int


@dataclass(frozen=True)
class ClipSize:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    image_size: int
    patch: int = 14


@dataclass(frozen=True)
class QwenVisionSize:
    hidden: int
    depth: int
    heads: int
    intermediate: int
    window_size: int
    fullatt_blocks: tuple[int, ...]
    min_pixels: int
    max_pixels: int
    patch: int = 14
    merge: int = 2
    temporal_patch: int = 2


TEXT = {
    "tiny": TextSize(64, 2, 2, 1, 32, 128, 1024, 1000, 2048),  # head_dim 32: vLLM-CPU has no kernel for 16
    "small": TextSize(768, 12, 12, 4, 64, 2048, 16384, 16000, 8192),
    # Qwen2.5-VL-7B's decoder and tokenizer size: with random weights most sampled ids must decode
    # to text, or a streaming client would see empty deltas and misread TTFT.
    "7b": TextSize(3584, 28, 28, 4, 128, 18944, 152064, 151665, 128000),
}
TOKENIZER_CORPUS = {"tiny": "tiny", "small": "small", "7b": "large"}  # tokenizer_builder's corpus sizes
CLIP = {
    "tiny": ClipSize(32, 2, 2, 64, 112),  # 8x8 patches -> 64 image tokens
    "small": ClipSize(384, 6, 6, 1536, 224),  # 16x16 patches -> 256 image tokens
}
# A merged token covers (patch*merge)^2 = 28x28 pixels: tiny allows 4..64 tokens, small 4..256.
QWEN_VISION = {
    "tiny": QwenVisionSize(32, 2, 2, 64, 56, (1,), 4 * 28 * 28, 64 * 28 * 28),
    "small": QwenVisionSize(384, 6, 6, 1024, 112, (2, 5), 4 * 28 * 28, 256 * 28 * 28),
    # The real 7B tower: 32 blocks, window attention except blocks 7/15/23/31, up to 16384 tokens.
    "7b": QwenVisionSize(1280, 32, 16, 3420, 112, (7, 15, 23, 31), 4 * 28 * 28, 16384 * 28 * 28),
}
# mrope splits head_dim/2 rotary frequencies into (temporal, height, width) sections.
MROPE_SECTION = {16: [2, 3, 3], 32: [4, 6, 6], 64: [8, 12, 12], 128: [16, 24, 24]}

# Tiny models share one theta so tests see one rope; small ones copy their real family.
ROPE_THETA_SMALL = {"llama": 500000.0, "llava": 10000.0, "qwen2": 1000000.0, "qwen3": 1000000.0,
                    "qwen2_5_vl": 1000000.0}
TIE_EMBEDDINGS = {"qwen2": True, "qwen3": True, "qwen2_5_vl": True, "llama": False, "llava": False}
UNTIED_SIZES = ("7b",)  # Qwen2.5-VL-7B has its own lm_head (the 3B and smaller tie it)
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "llava": "LlavaForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def config_bos(ids: dict) -> int | None:
    """bos id for config files: Qwen tokenizers add no bos, but Qwen configs name <|endoftext|>."""
    return ids["bos"] if ids["bos"] is not None else ids.get("endoftext")


def tie_embeddings(family: str, size: str) -> bool:
    return TIE_EMBEDDINGS[family] and size not in UNTIED_SIZES


def check_size(family: str, size: str) -> None:
    if size not in SIZES or family not in SIZE_FAMILIES.get(size, FAMILIES):
        raise ValueError(f"family {family!r} has no size {size!r}")


def rope_theta(family: str, size: str) -> float:
    return 10000.0 if size == "tiny" else ROPE_THETA_SMALL[family]


def _text_fields(family: str, size: str, dtype: str) -> dict:
    """Decoder fields shared by every family, in the flat hub layout."""
    t = TEXT[size]
    fields = {
        "hidden_act": "silu",
        "hidden_size": t.hidden,
        "initializer_range": 0.02,
        "intermediate_size": t.intermediate,
        "max_position_embeddings": t.max_positions,
        "num_attention_heads": t.heads,
        "num_hidden_layers": t.layers,
        "num_key_value_heads": t.kv_heads,
        "rms_norm_eps": 1e-5 if family in ("llama", "llava") else 1e-6,
        "rope_theta": rope_theta(family, size),
        "tie_word_embeddings": tie_embeddings(family, size),
        "torch_dtype": dtype,
        "use_cache": True,
        "vocab_size": t.vocab_size,
    }
    if family in ("llama", "llava", "qwen3"):
        fields["head_dim"] = t.head_dim
    if family in ("llama", "llava", "qwen3"):
        fields["attention_bias"] = False
    if family == "llama":
        fields["mlp_bias"] = False
    if family in ("qwen2", "qwen3", "qwen2_5_vl"):
        fields.update(use_sliding_window=False, sliding_window=None, max_window_layers=t.layers,
                      attention_dropout=0.0)
    return fields


def text_config(family: str, size: str, dtype: str, ids: dict) -> dict:
    """config.json for llama / qwen2 / qwen3. ``ids`` holds bos/eos/pad token ids."""
    cfg = {"architectures": [ARCHITECTURES[family]], "model_type": family}
    cfg.update(_text_fields(family, size, dtype))
    cfg.update(bos_token_id=config_bos(ids), eos_token_id=ids["eos"])
    if ids.get("pad") is not None:
        cfg["pad_token_id"] = ids["pad"]
    return dict(sorted(cfg.items()))


def llava_config(size: str, dtype: str, ids: dict) -> dict:
    """config.json in the llava-1.5-hf layout: nested CLIP vision and Llama text configs."""
    c = CLIP[size]
    text = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    text.update(_text_fields("llava", size, dtype))
    text.update(bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    vision = {
        "model_type": "clip_vision_model",
        "hidden_act": "quick_gelu",
        "hidden_size": c.hidden,
        "image_size": c.image_size,
        "intermediate_size": c.intermediate,
        "layer_norm_eps": 1e-5,
        "num_attention_heads": c.heads,
        "num_channels": 3,
        "num_hidden_layers": c.layers,
        "patch_size": c.patch,
        "projection_dim": TEXT[size].hidden,
        "torch_dtype": dtype,
    }
    return {
        "architectures": [ARCHITECTURES["llava"]],
        "ignore_index": -100,
        "image_seq_length": (c.image_size // c.patch) ** 2,
        "image_token_index": ids["image"],
        "model_type": "llava",
        "multimodal_projector_bias": True,
        "pad_token_id": ids["pad"],
        "projector_hidden_act": "gelu",
        "text_config": dict(sorted(text.items())),
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "vision_config": dict(sorted(vision.items())),
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
    }


def qwen2_5_vl_config(size: str, dtype: str, ids: dict) -> dict:
    """config.json in the original Qwen2.5-VL layout (flat text fields + rope_scaling mrope)."""
    t, v = TEXT[size], QWEN_VISION[size]
    cfg = {"architectures": [ARCHITECTURES["qwen2_5_vl"]], "model_type": "qwen2_5_vl"}
    cfg.update(_text_fields("qwen2_5_vl", size, dtype))
    cfg.update(
        bos_token_id=config_bos(ids),
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
        image_token_id=ids["image"],
        video_token_id=ids["video"],
        vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"],
        rope_scaling={"type": "mrope", "mrope_section": MROPE_SECTION[t.head_dim]},
        vision_config={
            "depth": v.depth,
            "fullatt_block_indexes": list(v.fullatt_blocks),
            "hidden_act": "silu",
            "hidden_size": v.hidden,
            "in_channels": 3,
            "intermediate_size": v.intermediate,
            "model_type": "qwen2_5_vl_vision",
            "num_heads": v.heads,
            "out_hidden_size": t.hidden,
            "patch_size": v.patch,
            "spatial_merge_size": v.merge,
            "temporal_patch_size": v.temporal_patch,
            "tokens_per_second": 2,
            "torch_dtype": dtype,
            "window_size": v.window_size,
        },
    )
    return dict(sorted(cfg.items()))


def model_config(family: str, size: str, dtype: str, ids: dict) -> dict:
    """The config.json dict for one family and size."""
    if family == "llava":
        return llava_config(size, dtype, ids)
    if family == "qwen2_5_vl":
        return qwen2_5_vl_config(size, dtype, ids)
    return text_config(family, size, dtype, ids)


def preprocessor_config(family: str, size: str) -> dict | None:
    """preprocessor_config.json for the vision families (None for text-only ones)."""
    if family == "llava":
        s = CLIP[size].image_size
        return {
            "crop_size": {"height": s, "width": s},
            "do_center_crop": True,
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": CLIP_MEAN,
            "image_processor_type": "CLIPImageProcessor",
            "image_std": CLIP_STD,
            "processor_class": "LlavaProcessor",
            "resample": 3,
            "rescale_factor": 1 / 255,
            "size": {"shortest_edge": s},
        }
    if family == "qwen2_5_vl":
        v = QWEN_VISION[size]
        return {
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": CLIP_MEAN,
            "image_processor_type": "Qwen2VLImageProcessor",
            "image_std": CLIP_STD,
            "max_pixels": v.max_pixels,
            "merge_size": v.merge,
            "min_pixels": v.min_pixels,
            "patch_size": v.patch,
            "processor_class": "Qwen2_5_VLProcessor",
            "resample": 3,
            "rescale_factor": 1 / 255,
            "size": {"longest_edge": v.max_pixels, "shortest_edge": v.min_pixels},
            "temporal_patch_size": v.temporal_patch,
        }
    return None


def processor_config(family: str, size: str) -> dict | None:
    """processor_config.json as the llava-hf repos ship it (Qwen2.5-VL repos have none)."""
    if family != "llava":
        return None
    return {
        "image_token": "<image>",
        "num_additional_image_tokens": 1,  # the CLS token the "default" strategy drops
        "patch_size": CLIP[size].patch,
        "processor_class": "LlavaProcessor",
        "vision_feature_select_strategy": "default",
    }
