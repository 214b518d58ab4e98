"""Encode -> prefill -> decode split across engines gives the aggregated engine's tokens.

Three engines on the same weights play the three stages in one process; the
KV, the image embeddings, M-RoPE's delta and a seeded RNG's state cross the
split exactly as they will cross the wire.
"""

from __future__ import annotations

import pytest

from stages.engine import SamplingParams
from tests.conftest import FAMILIES, VLM_FAMILIES, make_llm
from tests.test_engine_equality import chat_cases, chat_prompts, references


def run_split(encoder, prefill, decode, prompts, params):
    """Drive prompts through E (if images), P (prefill only) and D; returns outputs by prompt."""
    ep, ed = prefill.engine, decode.engine
    finals: dict[str, object] = {}
    for i, p in enumerate(prompts):
        imgs = p["multi_modal_data"]["image"]
        prepared = encoder.engine.encode_images(imgs) if imgs else []
        ep.add_request(f"r{i}", {"prompt_token_ids": p["prompt_token_ids"]}, params, images=prepared,
                       prefill_only=True)
    while ep.has_unfinished_requests():
        for out in ep.step():
            if out.prefill_done:
                ed.add_prefilled(ep.export_handoff(out.request_id))
            elif out.finished:  # answered by the prefill alone (eos or max_tokens=1)
                finals[out.request_id] = out
    while ed.has_unfinished_requests():
        for out in ed.step():
            if out.finished:
                finals[out.request_id] = out
    assert ep.blocks.num_used_blocks == 0 and ed.blocks.num_used_blocks == 0
    return [finals[f"r{i}"] for i in range(len(prompts))]


@pytest.mark.parametrize("family", FAMILIES)
def test_epd_split_matches_transformers(tiny_models, test_images, family):
    d = tiny_models(family)
    enc = make_llm(d, num_kv_blocks=16) if family in VLM_FAMILIES else None
    pre = make_llm(d, block_size=8, num_kv_blocks=512, max_num_batched_tokens=64)
    dec = make_llm(d, block_size=4, num_kv_blocks=1024)  # another block size: KV moves per token
    prompts = chat_prompts(pre, family, test_images)
    outs = run_split(enc, pre, dec, prompts, SamplingParams(temperature=0, max_tokens=16))
    assert [o.outputs[0].token_ids for o in outs] == references(d, chat_cases(family, test_images))
    if family in VLM_FAMILIES:
        assert pre.engine.runner.num_images_encoded == 0  # the prefill used the encoder's embeddings


def test_split_keeps_seeded_sampling_and_text(tiny_models):
    d = tiny_models("llama")
    agg = make_llm(d, num_kv_blocks=256)
    pre, dec = make_llm(d, num_kv_blocks=256), make_llm(d, num_kv_blocks=256)
    prompts = chat_prompts(agg, "llama", [])[:4]
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=11, max_tokens=20, logprobs=2)
    want = agg.generate(prompts, params)
    got = run_split(None, pre, dec, prompts, params)
    for w, g in zip(want, got):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        assert g.outputs[0].text == w.outputs[0].text
        assert g.outputs[0].finish_reason == w.outputs[0].finish_reason


def test_prefill_alone_finishes_short_requests(tiny_models):
    d = tiny_models("qwen3")
    pre, dec = make_llm(d, num_kv_blocks=128), make_llm(d, num_kv_blocks=128)
    prompts = chat_prompts(pre, "qwen3", [])[:2]
    outs = run_split(None, pre, dec, prompts, SamplingParams(temperature=0, max_tokens=1))
    assert all(o.outputs[0].finish_reason == "length" and len(o.outputs[0].token_ids) == 1 for o in outs)
    assert dec.engine.num_generated_tokens == 0
