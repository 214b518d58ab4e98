"""Role-aware weights: a worker holds only its role's parts, with the same values a whole-model
worker holds, and switching roles in place gives what a fresh engine of that role gives.

Token checks compare greedy ids with transformers on the tiny checkpoints; embedding and
weight checks use ``torch.equal`` against an engine built whole.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from stages.engine import SamplingParams
from tests.conftest import VLM_FAMILIES, make_llm
from tests.test_engine_disagg import run_split
from tests.test_engine_equality import chat_cases, chat_prompts, references

GREEDY = SamplingParams(temperature=0, max_tokens=16)
VISION_PREFIX = {"llava": ("vision_tower.", "multi_modal_projector."), "qwen2_5_vl": ("visual.",)}


def _state(engine) -> dict[str, torch.Tensor]:
    return dict(engine.runner.model.named_parameters())


def _prefixes(names) -> set[str]:
    return {n.split(".", 1)[0] for n in names}


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_each_role_builds_only_its_parts(tiny_models, family):
    d = tiny_models(family)
    vision = {p.rstrip(".") for p in VISION_PREFIX[family]}
    want = {"encode": vision, "prefill": {"language_model"}, "decode": {"language_model"},
            "mixed": vision | {"language_model"}}
    whole = _state(make_llm(d, num_kv_blocks=32).engine)
    for role, tops in want.items():
        eng = make_llm(d, role=role, num_kv_blocks=32).engine
        state = _state(eng)
        assert _prefixes(state) == tops, role
        # What it holds is exactly the whole model's tensors of those parts, same values.
        assert set(state) == {n for n in whole if n.split(".", 1)[0] in tops}
        assert all(torch.equal(t, whole[n]) for n, t in state.items())
        mem = eng.runner.memory()
        assert mem["weights_bytes"] == sum(t.numel() * t.element_size() for t in state.values()) + \
            sum(b.numel() * b.element_size() for b in eng.runner.model.buffers())
        if role == "encode":
            assert eng.runner.kv_caches == [] and eng.runner.num_blocks == 0 and mem["kv_bytes"] == 0
            assert eng.blocks.num_blocks == 0 and eng.blocks.num_free_blocks == 0
        else:
            assert eng.runner.num_blocks == 32 == eng.blocks.num_blocks and mem["kv_bytes"] > 0
        assert eng.runner.model.is_multimodal  # the family's, whatever the role holds


def test_text_family_has_no_encode_role(tiny_models):
    with pytest.raises(ValueError, match="no vision part"):
        make_llm(tiny_models("qwen2"), role="encode", num_kv_blocks=8)


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_encode_only_embeddings_equal_the_whole_model(tiny_models, test_images, family):
    d = tiny_models(family)
    whole = make_llm(d, num_kv_blocks=8).engine.encode_images(test_images[:3])
    enc = make_llm(d, role="encode").engine
    got = enc.encode_images(test_images[:3])
    assert [g.content_hash for g in got] == [w.content_hash for w in whole]
    assert all(torch.equal(g.embedding, w.embedding) for g, w in zip(got, whole))


def test_other_parts_are_never_read(tiny_models, tmp_path):
    """Language tensors of the wrong shape: the whole model refuses them, an encode worker never
    reads them (filtered before the memory-mapped read)."""
    src = Path(tiny_models("llava"))
    bad = tmp_path / "llava-bad-lm"
    shutil.copytree(src, bad)
    tensors = load_file(bad / "model.safetensors")
    for k in [k for k in tensors if k.startswith("language_model.")]:
        tensors[k] = torch.zeros(1)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="has shape"):
        make_llm(str(bad), num_kv_blocks=8)
    assert make_llm(str(bad), role="encode").engine.runner.model.parts == {"vision"}


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_role_aware_split_matches_transformers(tiny_models, test_images, family):
    d = tiny_models(family)
    enc = make_llm(d, role="encode")
    pre = make_llm(d, role="prefill", block_size=8, num_kv_blocks=512, max_num_batched_tokens=64)
    dec = make_llm(d, role="decode", block_size=4, num_kv_blocks=1024)
    outs = run_split(enc, pre, dec, chat_prompts(pre, family, test_images), GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == references(d, chat_cases(family, test_images))
    # The prefill used the encoder's embeddings and so never built a vision tower.
    assert pre.engine.runner.num_images_encoded == 0 and pre.engine.runner.model.parts == {"language"}


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_prefill_builds_its_vision_tower_on_first_image(tiny_models, test_images, family):
    """No encoder (1p1d) or a failed embedding pull: the prefill encodes raw images itself."""
    d = tiny_models(family)
    pre = make_llm(d, role="prefill", num_kv_blocks=512)
    dec = make_llm(d, role="decode", num_kv_blocks=512)
    prompts = chat_prompts(pre, family, test_images)
    assert pre.engine.runner.model.parts == {"language"}
    outs = _split_raw_images(pre, dec, prompts)
    assert outs == references(d, chat_cases(family, test_images))
    assert pre.engine.runner.model.parts == {"language", "vision"}
    assert pre.engine.runner.num_images_encoded > 0
    assert dec.engine.runner.model.parts == {"language"}  # the embeddings came in the handoff


def _split_raw_images(pre, dec, prompts) -> list[list[int]]:
    """Prefill (given the raw images, as when no encoder holds them) then decode; token ids."""
    ep, ed = pre.engine, dec.engine
    tokens: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        ep.add_request(f"r{i}", p, GREEDY, prefill_only=True)
    while ep.has_unfinished_requests():
        for out in ep.step():
            if out.prefill_done:
                ed.add_prefilled(ep.export_handoff(out.request_id))
            elif out.finished:
                tokens[out.request_id] = out.outputs[0].token_ids
    while ed.has_unfinished_requests():
        for out in ed.step():
            if out.finished:
                tokens[out.request_id] = out.outputs[0].token_ids
    return [tokens[f"r{i}"] for i in range(len(prompts))]


def test_dummy_weights_agree_across_roles(tiny_models, test_images):
    """Random weights are drawn per tensor: an E/P/D split of role-aware dummy engines gives the
    tokens of one whole dummy engine (one shared generator would give each role other values)."""
    d = tiny_models("llava")
    whole = make_llm(d, load_format="dummy", num_kv_blocks=512)
    for role in ("encode", "prefill", "decode"):
        eng = make_llm(d, role=role, load_format="dummy", num_kv_blocks=64).engine
        ref = _state(whole.engine)
        assert all(torch.equal(t, ref[n]) for n, t in _state(eng).items()), role
    prompts = chat_prompts(whole, "llava", test_images)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in whole.generate(prompts, params)]
    split = run_split(make_llm(d, role="encode", load_format="dummy"),
                      make_llm(d, role="prefill", load_format="dummy", num_kv_blocks=512),
                      make_llm(d, role="decode", load_format="dummy", num_kv_blocks=512), prompts, params)
    assert [o.outputs[0].token_ids for o in split] == want


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_switch_role_round_trip_equals_fresh_engines(tiny_models, test_images, family):
    """encode -> decode -> prefill -> encode in place; at each stop the engine holds the fresh
    engine's parts and weights, and serves its stage token-exact."""
    d = tiny_models(family)
    kw = dict(block_size=8, num_kv_blocks=512)
    moving = make_llm(d, role="encode", **kw)
    eng = moving.engine
    fresh = {r: make_llm(d, role=r, **kw) for r in ("encode", "prefill", "decode")}
    prompts = chat_prompts(moving, family, test_images)
    refs = references(d, chat_cases(family, test_images))
    first = eng.encode_images(test_images[:2])

    def same_as_fresh(role):
        want = _state(fresh[role].engine)
        got = _state(eng)
        assert set(got) == set(want) and all(torch.equal(t, want[n]) for n, t in got.items())
        assert eng.runner.num_blocks == fresh[role].engine.runner.num_blocks
        assert eng.max_model_len == fresh[role].engine.max_model_len

    mem = eng.switch_role("decode")
    assert mem["role"] == "decode" and mem["parts"] == ["language"] and mem["kv_bytes"] > 0
    same_as_fresh("decode")
    outs = run_split(fresh["encode"], fresh["prefill"], moving, prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == refs

    assert eng.switch_role("prefill")["parts"] == ["language"]
    same_as_fresh("prefill")
    outs = run_split(fresh["encode"], moving, fresh["decode"], prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == refs

    mem = eng.switch_role("encode")
    assert mem["kv_bytes"] == 0 and mem["num_blocks"] == 0 and eng.blocks.num_blocks == 0
    same_as_fresh("encode")
    again = eng.encode_images(test_images[:2])
    assert all(torch.equal(a.embedding, b.embedding) for a, b in zip(again, first))


def test_switch_refuses_while_work_remains(tiny_models, test_images):
    d = tiny_models("llava")
    llm = make_llm(d, role="prefill", num_kv_blocks=64)
    eng = llm.engine
    prompt = chat_prompts(llm, "llava", test_images)[0]
    eng.add_request("r", {"prompt_token_ids": prompt["prompt_token_ids"]}, GREEDY, prefill_only=True)
    with pytest.raises(RuntimeError, match="still run"):
        eng.switch_role("decode")
    while eng.has_unfinished_requests():
        eng.step()
    # Prefilled, its KV parked for a decode worker: the pool cannot be freed under it.
    with pytest.raises(RuntimeError, match="wait"):
        eng.switch_role("encode")
    assert eng.runner.num_blocks == 64 and eng.config.role == "prefill"
    eng.blocks.record_events()
    eng.export_handoff("r")
    cached = set(eng.blocks.cached)  # freed, still hashed for the prefix cache
    assert cached
    eng.switch_role("encode")
    # The cluster index hears that every cached block is gone with the pool.
    assert {h for stored, h in eng.blocks.events if not stored} == cached


def test_profiler_per_role(tiny_models, tmp_path, monkeypatch):
    from stages.profiler import profile

    monkeypatch.setenv("EPD_CACHE", str(tmp_path))
    d = tiny_models("llava")
    enc = profile(make_llm(d, role="encode").engine, "encode")
    assert "encode" in enc and "step" not in enc and enc["kv_capacity_tokens"] == 0
    pre = profile(make_llm(d, role="prefill", num_kv_blocks=128).engine, "prefill")
    # No vision tower built at start-up only to be timed: the router prices its encodes.
    assert "step" in pre and "encode" not in pre and pre["kv_capacity_tokens"] == 128 * 16
    assert json.loads(json.dumps(pre))  # what WorkerInfo carries
