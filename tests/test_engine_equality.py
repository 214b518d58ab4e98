"""Greedy token ids from our engine == transformers ``generate`` on the same weights."""

from __future__ import annotations

import pytest

from stages.engine import SamplingParams
from tests.conftest import FAMILIES, VLM_FAMILIES, make_llm
from tests.hf_reference import hf_greedy

MAX_TOKENS = 16
TEXTS = [
    "Hello there",
    "The quick brown fox jumps over the lazy dog while the cat watches from the window sill",
    "1 2 3 4 5 6 7 8 9 10",
    "Once upon a time in a land far away, there lived a king who loved numbers and rivers and old songs",
    "Why?",
    "Tell me about the history of the river valley and its people, their farms, their markets and feasts",
    "A B C",
    "Summer rain on the roof, quiet streets, a lamp in the window",
]
IMAGE_COUNTS = [0, 1, 3, 1, 0, 3, 1, 0]  # per prompt, for VLMs


def chat_prompts(llm, family: str, images) -> list[dict]:
    prompts = []
    for i, text in enumerate(TEXTS):
        n = IMAGE_COUNTS[i] if family in VLM_FAMILIES else 0
        imgs = [images[(i + k) % len(images)] for k in range(n)]
        parts = [{"type": "image", "image": im} for im in imgs] + [{"type": "text", "text": text}]
        content = parts if family in VLM_FAMILIES else text
        prompts.append(llm.engine.inputs.render_chat([{"role": "user", "content": content}]))
        prompts[-1]["multi_modal_data"]["image"] = imgs
    return prompts


def references(model_dir: str, prompts: list[dict], max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    return [hf_greedy(model_dir, p["prompt_token_ids"], max_tokens, p["multi_modal_data"]["image"])
            for p in prompts]


GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "whole"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers(tiny_models, test_images, family, chunked):
    d = tiny_models(family)
    # A small token budget forces prompts (and image runs) to split across steps.
    llm = make_llm(d, block_size=8, num_kv_blocks=512, enable_chunked_prefill=chunked,
              max_num_batched_tokens=48 if chunked else 2048, enable_prefix_caching=False)
    prompts = chat_prompts(llm, family, test_images)
    refs = references(d, prompts)
    outs = llm.generate(prompts, GREEDY)
    got = [o.outputs[0].token_ids for o in outs]
    assert got == refs
    # Guard against a vacuous comparison: different prompts must continue differently.
    assert len({tuple(r) for r in refs}) >= 6
    for o in outs:
        assert o.outputs[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_cache_hits_keep_tokens(tiny_models, test_images, family):
    d = tiny_models(family)
    llm = make_llm(d, block_size=4, num_kv_blocks=512, enable_prefix_caching=True)
    prompts = chat_prompts(llm, family, test_images)
    first = llm.generate(prompts[:4], GREEDY)
    # Same prompts again (same images): whole-block prefixes come from the cache.
    again = llm.generate(prompts[:4], GREEDY)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in first]
    assert all(o.num_cached_tokens > 0 for o in again)
    assert llm.engine.blocks.prefix_hits > 0
    assert [o.outputs[0].token_ids for o in again] == references(d, prompts[:4])


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_same_image_in_later_request_hits_cache(tiny_models, test_images, family):
    d = tiny_models(family)
    llm = make_llm(d, block_size=4, num_kv_blocks=512)
    img = test_images[2]

    def prompt(text):
        conv = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": text}]}]
        return llm.engine.inputs.render_chat(conv)

    a, b = prompt("What is in the picture?"), prompt("Name the colours you see here")
    out_a = llm.generate(a, GREEDY)[0]
    encoded = llm.engine.runner.num_images_encoded
    out_b = llm.generate(b, GREEDY)[0]
    assert out_b.num_cached_tokens >= 8  # the shared prefix (template + image) came from the cache
    assert llm.engine.runner.num_images_encoded == encoded  # and the image was not encoded again
    assert [out_a.outputs[0].token_ids, out_b.outputs[0].token_ids] == references(d, [a, b])
    # A different image with identical text must not hit the first image's blocks.
    conv = [{"role": "user", "content": [{"type": "image", "image": test_images[3]},
                                         {"type": "text", "text": "What is in the picture?"}]}]
    c = llm.engine.inputs.render_chat(conv)
    out_c = llm.generate(c, GREEDY)[0]
    assert out_c.outputs[0].token_ids == references(d, [c])[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_preemption_by_recompute_keeps_tokens(tiny_models, test_images, family):
    d = tiny_models(family)
    # Room for about two sequences at a time: the scheduler must preempt and recompute.
    llm = make_llm(d, block_size=4, num_kv_blocks=90 if family in VLM_FAMILIES else 40,
              max_num_batched_tokens=64, enable_prefix_caching=False)
    prompts = chat_prompts(llm, family, test_images)
    params = SamplingParams(temperature=0.0, max_tokens=24)
    outs = llm.generate(prompts, params)
    assert llm.engine.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == references(d, prompts, 24)
    assert llm.engine.blocks.num_used_blocks == 0
