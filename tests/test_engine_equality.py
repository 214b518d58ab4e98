"""Greedy token ids from our engine == transformers ``generate`` on the same weights.

The references start from transformers' own processor (chat template, special tokens,
image placeholders), never from ids we made, so a prompt defect shows here too.
"""

from __future__ import annotations

import pytest

from stages.engine import SamplingParams
from tests.conftest import FAMILIES, VLM_FAMILIES, make_llm
from tests.hf_reference import hf_chat, hf_completion

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


def chat_cases(family: str, images, n: int = len(TEXTS)) -> list[tuple[list[dict], list]]:
    """(messages, images): one user turn per text; image parts are ``{"type": "image"}``."""
    cases = []
    for i, text in enumerate(TEXTS[:n]):
        k = IMAGE_COUNTS[i] if family in VLM_FAMILIES else 0
        imgs = [images[(i + j) % len(images)] for j in range(k)]
        content = [{"type": "image"} for _ in imgs] + [{"type": "text", "text": text}]
        cases.append(([{"role": "user", "content": content if family in VLM_FAMILIES else text}], imgs))
    return cases


def our_prompt(llm, messages: list[dict], imgs: list) -> dict:
    """The engine's prompt dict for a chat case (its chat path: template, special tokens)."""
    prompt = llm.engine.inputs.render_chat(messages)
    prompt["multi_modal_data"]["image"] = list(imgs)
    return prompt


def chat_prompts(llm, family: str, images) -> list[dict]:
    return [our_prompt(llm, m, imgs) for m, imgs in chat_cases(family, images)]


def references(model_dir: str, cases: list[tuple[list[dict], list]], max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    return [hf_chat(model_dir, m, imgs, max_tokens)[1] for m, imgs in cases]


GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "whole"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers(tiny_models, test_images, family, chunked):
    d = tiny_models(family)
    # A small token budget forces prompts (and image runs) to split across steps.
    llm = make_llm(d, block_size=8, num_kv_blocks=512, enable_chunked_prefill=chunked,
              max_num_batched_tokens=48 if chunked else 2048, enable_prefix_caching=False)
    cases = chat_cases(family, test_images)
    refs = references(d, cases)
    outs = llm.generate([our_prompt(llm, *c) for c in cases], GREEDY)
    got = [o.outputs[0].token_ids for o in outs]
    assert got == refs
    # Guard against a vacuous comparison: different prompts must continue differently.
    assert len({tuple(r) for r in refs}) >= 6
    for o in outs:
        assert o.outputs[0].finish_reason in ("stop", "length")


# Seed 0 is test_greedy_matches_transformers; 31 is the LLaVA whose missing chat bos changed the
# greedy tokens (issue 10). Several seeds per family, so one lucky set of weights hides nothing.
SEEDS = (31, 7, 2024)
ISSUE_10_CHAT = [{"role": "user", "content": "router fast router cat how router router cat"}]


@pytest.fixture(scope="module")
def seeded_models(tmp_path_factory):
    from stages.models.make_model import make_model

    root = tmp_path_factory.mktemp("seeded")
    return lambda family, seed: str(make_model(family, "tiny", root / f"{family}-{seed}", seed=seed))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers_across_seeds(seeded_models, test_images, family, seed):
    d = seeded_models(family, seed)
    llm = make_llm(d, block_size=8, num_kv_blocks=256, enable_prefix_caching=False)
    params = SamplingParams(temperature=0.0, max_tokens=8)
    cases = [(ISSUE_10_CHAT, [])] + chat_cases(family, test_images, n=3)  # 0, 1, 3 images on VLMs
    outs = llm.generate([our_prompt(llm, *c) for c in cases], params)
    assert [o.outputs[0].token_ids for o in outs] == references(d, cases, 8)
    # A completion prompt goes through the tokenizer's own special tokens.
    assert llm.generate(TEXTS[1], params)[0].outputs[0].token_ids == hf_completion(d, TEXTS[1], max_new_tokens=8)[1]


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_cache_hits_keep_tokens(tiny_models, test_images, family):
    d = tiny_models(family)
    llm = make_llm(d, block_size=4, num_kv_blocks=512, enable_prefix_caching=True)
    cases = chat_cases(family, test_images, n=4)
    prompts = [our_prompt(llm, *c) for c in cases]
    first = llm.generate(prompts, GREEDY)
    # Same prompts again (same images): whole-block prefixes come from the cache.
    again = llm.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in first]
    assert all(o.num_cached_tokens > 0 for o in again)
    assert llm.engine.blocks.prefix_hits > 0
    assert [o.outputs[0].token_ids for o in again] == references(d, cases)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_same_image_in_later_request_hits_cache(tiny_models, test_images, family):
    d = tiny_models(family)
    llm = make_llm(d, block_size=4, num_kv_blocks=512)

    def case(text, img):
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}], [img]

    a, b = case("What is in the picture?", test_images[2]), case("Name the colours you see here", test_images[2])
    out_a = llm.generate(our_prompt(llm, *a), GREEDY)[0]
    encoded = llm.engine.runner.num_images_encoded
    out_b = llm.generate(our_prompt(llm, *b), GREEDY)[0]
    assert out_b.num_cached_tokens >= 8  # the shared prefix (template + image) came from the cache
    assert llm.engine.runner.num_images_encoded == encoded  # and the image was not encoded again
    assert [out_a.outputs[0].token_ids, out_b.outputs[0].token_ids] == references(d, [a, b])
    # A different image with identical text must not hit the first image's blocks.
    c = case("What is in the picture?", test_images[3])
    out_c = llm.generate(our_prompt(llm, *c), GREEDY)[0]
    assert out_c.outputs[0].token_ids == references(d, [c])[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_preemption_by_recompute_keeps_tokens(tiny_models, test_images, family):
    d = tiny_models(family)
    # Room for about two sequences at a time: the scheduler must preempt and recompute.
    llm = make_llm(d, block_size=4, num_kv_blocks=90 if family in VLM_FAMILIES else 40,
              max_num_batched_tokens=64, enable_prefix_caching=False)
    cases = chat_cases(family, test_images)
    params = SamplingParams(temperature=0.0, max_tokens=24)
    outs = llm.generate([our_prompt(llm, *c) for c in cases], params)
    assert llm.engine.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == references(d, cases, 24)
    assert llm.engine.blocks.num_used_blocks == 0
