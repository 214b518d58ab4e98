"""Tests for epd-make-model: determinism, loading in transformers, tokenizer, templates,
and that the random weights give prompt- and image-dependent greedy continuations."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from stages.models.make_model import make_model
from stages.models.model_configs import TEXT
from stages.models.random_weights import hub_key

FAMILIES = ("llama", "qwen2", "qwen3", "llava", "qwen2_5_vl")
VLMS = ("llava", "qwen2_5_vl")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Every family's tiny model, seed 0, float32, unsharded; built once per module."""
    root = tmp_path_factory.mktemp("tiny")
    return {f: make_model(f, "tiny", root / f, seed=0) for f in FAMILIES}


_LOADED: dict[str, tuple] = {}


def load(family: str, model_dir: Path):
    """(model, loading_info, tokenizer) from transformers, cached per directory."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    key = str(model_dir)
    if key not in _LOADED:
        auto = AutoModelForImageTextToText if family in VLMS else AutoModelForCausalLM
        model, info = auto.from_pretrained(model_dir, output_loading_info=True)
        _LOADED[key] = (model.eval(), info, AutoTokenizer.from_pretrained(model_dir))
    return _LOADED[key]


def file_hashes(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def saved_tensors(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for p in sorted(d.glob("model*.safetensors")):
        out.update(load_file(p))
    return out


# ---------------------------------------------------------------- determinism


@pytest.mark.parametrize("family", FAMILIES)
def test_same_arguments_give_identical_bytes(tiny, tmp_path, family):
    again = make_model(family, "tiny", tmp_path / "again", seed=0)
    assert file_hashes(again) == file_hashes(tiny[family])


def test_cli_in_a_fresh_process_gives_identical_bytes(tmp_path):
    """Another process (other hash seed) through the module entry point; sharded bf16."""
    args = ["--family", "qwen2_5_vl", "--size", "tiny", "--seed", "7", "--shard-size-mb", "0.1",
            "--dtype", "bfloat16"]
    env = {**os.environ, "PYTHONHASHSEED": "123", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "stages.models.make_model", *args, "--out", str(tmp_path / "cli")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, check=True)
    assert res.stdout.strip() == str(tmp_path / "cli")
    local = make_model("qwen2_5_vl", "tiny", tmp_path / "local", seed=7, shard_size_mb=0.1, dtype="bfloat16")
    assert file_hashes(tmp_path / "cli") == file_hashes(local)


def test_other_seed_changes_every_weight_but_nothing_else(tiny, tmp_path):
    other = make_model("llava", "tiny", tmp_path / "seed1", seed=1)
    a, b = saved_tensors(tiny["llava"]), saved_tensors(other)
    assert a.keys() == b.keys()
    assert all(not torch.equal(a[k], b[k]) for k in a)
    ha, hb = file_hashes(tiny["llava"]), file_hashes(other)
    assert {k for k in ha if ha[k] != hb[k]} == {"model.safetensors", "epd_make_model.json"}  # stamp names the seed


def test_families_do_not_share_weights(tiny):
    a, b = saved_tensors(tiny["qwen2"]), saved_tensors(tiny["qwen3"])
    assert not torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])


# ---------------------------------------------------------------- loading and layout


@pytest.mark.parametrize("family", FAMILIES)
def test_every_saved_tensor_loads_unchanged(tiny, family):
    model, info, _ = load(family, tiny[family])
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"] and not info["error_msgs"]
    saved = saved_tensors(tiny[family])
    state = model.state_dict()
    tied = model.config.tie_word_embeddings
    expected = {hub_key(family, k) for k in state if not (tied and k == "lm_head.weight")}
    assert set(saved) == expected
    for k, v in state.items():  # equal values: nothing was re-initialised on load
        if not (tied and k == "lm_head.weight"):
            assert torch.equal(v, saved[hub_key(family, k)]), k
    if tied:
        assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert model.config.architectures == [type(model).__name__]


def test_checkpoint_key_layout(tiny):
    keys = {f: set(saved_tensors(tiny[f])) for f in FAMILIES}
    prefixes = {k.split(".")[0] + "." + k.split(".")[1] for k in keys["llava"]}
    assert prefixes == {"language_model.model", "language_model.lm_head", "multi_modal_projector.linear_1",
                        "multi_modal_projector.linear_2", "vision_tower.vision_model"}
    assert "vision_tower.vision_model.encoder.layers.1.self_attn.q_proj.weight" in keys["llava"]
    assert {k.split(".")[0] for k in keys["qwen2_5_vl"]} == {"model", "visual"}  # tied: no lm_head
    assert "visual.blocks.1.attn.qkv.weight" in keys["qwen2_5_vl"]
    assert "visual.merger.mlp.2.weight" in keys["qwen2_5_vl"]
    assert "lm_head.weight" in keys["llama"] and "lm_head.weight" not in keys["qwen2"]
    assert "model.layers.0.self_attn.q_proj.bias" in keys["qwen2"]
    assert "model.layers.0.self_attn.q_proj.bias" not in keys["qwen3"]
    assert "model.layers.0.self_attn.q_norm.weight" in keys["qwen3"]


def test_padded_vocab_rows_are_zero(tiny):
    tensors = saved_tensors(tiny["llama"])
    n = len(load("llama", tiny["llama"])[2])
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        assert tensors[key].shape[0] == TEXT["tiny"].vocab_size > n
        assert not tensors[key][n:].any() and tensors[key][:n].abs().sum(1).min() > 0


def test_sharded_checkpoint_loads_and_equals_unsharded(tiny, tmp_path):
    d = make_model("llava", "tiny", tmp_path / "sharded", seed=0, shard_size_mb=0.1)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in d.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (d / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == set(shards)
    tensors = saved_tensors(d)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for name in shards:
        assert set(load_file(d / name)) == {k for k, v in index["weight_map"].items() if v == name}
    assert tensors.keys() == saved_tensors(tiny["llava"]).keys()
    model, info, _ = load("llava", d)
    assert not any(info.values())
    reference = load("llava", tiny["llava"])[0].state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())


def test_bfloat16_is_the_rounded_float32_checkpoint(tiny, tmp_path):
    d = make_model("qwen3", "tiny", tmp_path / "bf16", seed=0, dtype="bfloat16")
    f32, bf16 = saved_tensors(tiny["qwen3"]), saved_tensors(d)
    assert all(bf16[k].dtype == torch.bfloat16 and torch.equal(bf16[k], f32[k].bfloat16()) for k in f32)
    assert json.loads((d / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load("qwen3", d)[0].dtype == torch.bfloat16


# ---------------------------------------------------------------- configs


def test_config_fields(tiny):
    from transformers import AutoConfig

    llava = AutoConfig.from_pretrained(tiny["llava"])
    assert llava.image_seq_length == (112 // 14) ** 2 == 64
    assert (llava.vision_feature_layer, llava.vision_feature_select_strategy) == (-2, "default")
    assert not llava.tie_word_embeddings
    vl = AutoConfig.from_pretrained(tiny["qwen2_5_vl"])
    head_dim = vl.text_config.hidden_size // vl.text_config.num_attention_heads
    assert sum(vl.text_config.rope_parameters["mrope_section"]) == head_dim // 2
    assert vl.vision_config.fullatt_block_indexes == [1] and vl.tie_word_embeddings
    assert AutoConfig.from_pretrained(tiny["qwen3"]).head_dim == 32  # vLLM-CPU needs >= 32
    assert AutoConfig.from_pretrained(tiny["qwen2"]).tie_word_embeddings


@pytest.mark.parametrize("family", FAMILIES)
def test_special_token_ids_agree_across_files(tiny, family):
    tok = load(family, tiny[family])[2]
    gen = json.loads((tiny[family] / "generation_config.json").read_text())
    eos_names = {"llama": ["<|end_of_text|>", "<|eot_id|>"], "llava": ["</s>"],
                 "qwen2": ["<|im_end|>", "<|endoftext|>"]}
    names = eos_names.get(family, eos_names["qwen2"])
    assert gen["eos_token_id"] == tok.convert_tokens_to_ids(names)
    assert tok.eos_token_id in gen["eos_token_id"]
    with_special = tok("hello").input_ids
    plain = tok("hello", add_special_tokens=False).input_ids
    if family in ("llama", "llava"):
        assert with_special == [tok.bos_token_id] + plain == [gen["bos_token_id"]] + plain
    else:
        assert with_special == plain and tok.bos_token is None


# ---------------------------------------------------------------- tokenizer and templates


def _random_unicode(rng: random.Random) -> str:
    ranges = [(0x20, 0x7E), (0xA0, 0x2FF), (0x370, 0x3FF), (0x400, 0x4FF), (0x4E00, 0x4FFF),
              (0x1F300, 0x1F64F), (0x0300, 0x036F)]
    chars = []
    for _ in range(rng.randint(1, 40)):
        lo, hi = rng.choice(ranges)
        chars.append(chr(rng.randint(lo, hi)) if rng.random() < 0.9 else rng.choice(" \t\n\r  "))
    return "".join(chars)


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_round_trips_unicode(tiny, family):
    tok = load(family, tiny[family])[2]
    rng = random.Random(5)
    texts = ["", "  leading and trailing  ", "tabs\tand\nnew\r\nlines", "naïve café façade 1234567",
             "東京タワー 🙂👍🏽 Ελληνικά עברית", "e\u0301 combining", "\x00\x01 control"]
    texts += [_random_unicode(rng) for _ in range(30)]
    for text in texts:
        ids = tok(text, add_special_tokens=False).input_ids
        assert all(0 <= i < len(tok) for i in ids)
        # Qwen tokenizers normalise to NFC, as the real ones do
        assert tok.decode(ids) == (unicodedata.normalize("NFC", text) if family.startswith("qwen") else text)
    assert len(tok) == TEXT["tiny"].tokenizer_tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_json_alone_encodes_like_transformers(tiny, family):
    """transformers 5 swaps in Qwen2Tokenizer for model_type qwen2 (rebuilding the
    normalizer and pre-tokenizer): tokenizer.json read by itself must agree with it."""
    from tokenizers import Tokenizer

    tok = load(family, tiny[family])[2]
    raw = Tokenizer.from_file(str(tiny[family] / "tokenizer.json"))
    rng = random.Random(11)
    texts = ["Prices rose 12345 times", "e\u0301 and \u212b", "<|im_start|>user\nhi<|im_end|>", "<s>[x]</s>"]
    for text in texts + [_random_unicode(rng) for _ in range(20)]:
        assert raw.encode(text).ids == tok(text).input_ids, text


HI = "Hi there"
CONTENTS = {
    "str": HI,
    "text_part": [{"type": "text", "text": HI}],
    "image": [{"type": "image"}, {"type": "text", "text": HI}],
    "image_url": [{"type": "image_url", "image_url": {"url": "http://example.invalid/a.png"}},
                  {"type": "text", "text": HI}],
}
EXPECTED = {
    "qwen2": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
             "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "qwen3": "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "qwen2_5_vl": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                  "<|im_start|>user\n{image}Hi there<|im_end|>\n<|im_start|>assistant\n",
    "llama": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
             "Hi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "llava": "USER: {image}Hi there ASSISTANT:",
}
IMAGE_TEXT = {"qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>", "llava": "<image>\n"}


@pytest.mark.parametrize("content", CONTENTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_chat_template(tiny, family, content):
    tok = load(family, tiny[family])[2]
    messages = [{"role": "user", "content": CONTENTS[content]}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    has_image = content.startswith("image") and family in VLMS
    assert text == EXPECTED[family].format(image=IMAGE_TEXT[family] if has_image else "")


def test_chat_template_multi_turn_with_system(tiny):
    tok = load("qwen2", tiny["qwen2"])[2]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]}]
    assert tok.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n")
    # chat_template.jinja and tokenizer_config.json carry the same template
    cfg = json.loads((tiny["qwen2"] / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == (tiny["qwen2"] / "chat_template.jinja").read_text() == tok.chat_template


# ---------------------------------------------------------------- image processors


def noise_image(seed: int, width: int, height: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_image_processors_load_separately(tiny):
    from transformers import AutoImageProcessor

    clip = AutoImageProcessor.from_pretrained(tiny["llava"], use_fast=False)
    assert type(clip).__name__ == "CLIPImageProcessorPil"
    pixels = clip(images=[noise_image(0, 150, 90)], return_tensors="pt")["pixel_values"]
    assert tuple(pixels.shape) == (1, 3, 112, 112)
    qwen = AutoImageProcessor.from_pretrained(tiny["qwen2_5_vl"], use_fast=False)
    assert type(qwen).__name__ == "Qwen2VLImageProcessorPil"
    merged = [int(qwen(images=[noise_image(0, w, h)], return_tensors="pt")["image_grid_thw"].prod()) // 4
              for w, h in [(20, 20), (150, 100), (1000, 800)]]
    assert merged[0] == 4 and 4 < merged[1] < 64 and 32 <= merged[2] <= 64


# ---------------------------------------------------------------- greedy continuations


PROMPTS = ["The quick brown fox", "In 1969, two astronauts walked", "To bake bread, mix flour",
           "Prices rose by 3.5% in March"]


def greedy(model, input_ids: torch.Tensor, **kwargs) -> list[int]:
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=16,
                             min_new_tokens=16, do_sample=False, **kwargs)
    return out[0, input_ids.shape[1]:].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_continuations_depend_on_the_prompt(tiny, family):
    model, _, tok = load(family, tiny[family])
    outs = [greedy(model, tok(p, return_tensors="pt").input_ids) for p in PROMPTS]
    assert all(len(o) == 16 and len(set(o)) >= 4 for o in outs), outs
    assert len({tuple(o) for o in outs}) == len(PROMPTS), outs


def vlm_inputs(family: str, model, tok, image: Image.Image, image_processor) -> tuple[torch.Tensor, dict]:
    """Expand the template's single image placeholder to the model's image-token count,
    as the (here unbuildable, torchvision-less) processors would."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    pixels = image_processor(images=[image], return_tensors="pt")
    if family == "llava":
        text = text.replace("<image>", "<image>" * model.config.image_seq_length)
        return tok(text, return_tensors="pt").input_ids, {"pixel_values": pixels["pixel_values"]}
    thw = pixels["image_grid_thw"]
    n = int(thw.prod()) // model.config.vision_config.spatial_merge_size ** 2
    ids = tok(text.replace("<|image_pad|>", "<|image_pad|>" * n), return_tensors="pt").input_ids
    mm_types = (ids == model.config.image_token_id).int()  # 1 marks image tokens for M-RoPE
    return ids, {"pixel_values": pixels["pixel_values"], "image_grid_thw": thw, "mm_token_type_ids": mm_types}


@pytest.mark.parametrize("family", VLMS)
def test_greedy_continuation_depends_on_the_image(tiny, family):
    from transformers import AutoImageProcessor

    model, _, tok = load(family, tiny[family])
    processor = AutoImageProcessor.from_pretrained(tiny[family], use_fast=False)
    outs = []
    for seed in (1, 2):
        ids, kwargs = vlm_inputs(family, model, tok, noise_image(seed, 150, 100), processor)
        image_tokens = int((ids == model.config.image_token_id).sum())
        assert image_tokens == (64 if family == "llava" else 20)
        outs.append(greedy(model, ids, **kwargs))
    assert outs[0] != outs[1] and all(len(set(o)) >= 4 for o in outs), outs
