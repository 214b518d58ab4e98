"""A request rebuilt on another engine from its prompt and the tokens already streamed
continues exactly as the undisturbed run: greedy, seeded sampling with penalties, and a
stop string that straddles the point where the first engine died."""

from __future__ import annotations

import pytest

from stages.engine.sampling_params import SamplingParams
from tests.conftest import make_llm


def _run(engine, rid, prompt, params, resume=None):
    """Every delta of one request until it finishes: (token ids, text, last output)."""
    engine.submit(engine.prepare_request(rid, prompt, params, resume=resume))
    ids, text, last = [], "", None
    while engine.has_unfinished_requests():
        for out in engine.step():
            ids += out.delta_token_ids
            text += out.delta_text
            last = out
    return ids, text, last


@pytest.fixture(scope="module")
def engines(tiny_models):
    model = tiny_models("llama")
    return make_llm(model).engine, make_llm(model).engine


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
    SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=40, ignore_eos=True, repetition_penalty=1.3,
                   frequency_penalty=0.4),
    SamplingParams(temperature=0.8, seed=11, max_tokens=40, ignore_eos=True, logprobs=2),
], ids=["greedy", "seeded-penalties", "seeded-logprobs"])
@pytest.mark.parametrize("cut", [1, 13])
def test_resumed_request_continues_the_same_stream(engines, params, cut):
    first, second = engines
    prompt = "The history of the river begins"
    ids, text, last = _run(first, f"a{cut}{params.seed}", prompt, params)
    assert len(ids) == 40
    # What a client was sent when the first worker died after `cut` tokens.
    sent_text = first.tokenizer.decode(ids[:cut])  # the engine streams exactly this much, give or take
    partial = make_resume_point(second, prompt, params, ids, cut)
    got_ids, got_text, got_last = _run(second, f"b{cut}{params.seed}", prompt, params,
                                       resume=(ids[:cut], len(partial), None))
    assert ids[:cut] + got_ids == ids
    assert partial + got_text == text
    assert got_last.outputs[0].token_ids == ids  # the whole output, once: usage counts each token once
    assert sent_text  # the test really cut mid-text


def make_resume_point(engine, prompt, params, ids, cut) -> str:
    """The text a client has received after `cut` tokens, as the engine itself streamed it."""
    engine.submit(engine.prepare_request("probe", prompt, params))
    text = ""
    while engine.has_unfinished_requests():
        for out in engine.step():
            text += out.delta_text
            if len(out.outputs[0].token_ids) >= cut:
                engine.abort_request("probe")
                assert out.outputs[0].token_ids[:cut] == ids[:cut]
                return text
    raise AssertionError("the probe finished early")


def test_stop_string_across_the_resume_point(engines):
    """A stop string whose start was streamed before the death is still found."""
    first, second = engines
    prompt = "Once upon a time"
    base = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    ids, text, _ = _run(first, "s0", prompt, base)
    # A stop string spanning tokens 5-7 of the undisturbed answer.
    tok = first.tokenizer
    pieces = [tok.decode(ids[:i]) for i in range(len(ids) + 1)]
    stop = pieces[8][len(pieces[5]) - 2:]
    stop = stop.strip() or pieces[8][-3:]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop])
    want_ids, want_text, want_last = _run(first, "s1", prompt, params)
    for cut in range(1, len(want_ids)):
        partial = make_resume_point(second, prompt, params, want_ids, cut)
        got_ids, got_text, got_last = _run(second, f"s2-{cut}", prompt, params,
                                           resume=(want_ids[:cut], len(partial), None))
        assert want_ids[:cut] + got_ids == want_ids, cut
        assert partial + got_text == want_text, cut
        assert got_last.outputs[0].finish_reason == want_last.outputs[0].finish_reason
