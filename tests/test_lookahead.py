"""Decoding one step ahead (``async_decode``) changes when the host reads tokens, never which.

On CUDA it is on by default; here it is forced on so the bookkeeping (rows dropped when they
stop, arrivals and aborts between steps, rows ending by length, a pool too small for the extra
token) runs on the CPU, against transformers and against the serial engine.
"""

from __future__ import annotations

import pytest

from stages.engine import SamplingParams
from tests.conftest import make_llm
from tests.test_engine_equality import GREEDY, chat_cases, our_prompt, references


@pytest.mark.parametrize("family", ["llama", "qwen2_5_vl"])
def test_lookahead_greedy_matches_transformers(tiny_models, test_images, family):
    d = tiny_models(family)
    llm = make_llm(d, block_size=4, num_kv_blocks=512, async_decode=True)
    cases = chat_cases(family, test_images)
    outs = llm.generate([our_prompt(llm, *c) for c in cases], GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == references(d, cases)
    assert llm.engine.lookahead.num_steps > 0  # the steps did run ahead
    assert llm.engine.lookahead.pending is None  # nothing left queued once all finished
    assert llm.engine.blocks.num_used_blocks == 0  # the extra blocks went back with their rows


def _run(engine, script: dict[int, list], max_steps: int = 400) -> dict[str, tuple]:
    """Step ``engine``; ``script[k]`` = actions before step k: ("add", id, prompt, params) or
    ("abort", id). Returns id -> (token ids, text, finish reason) of every finished request."""
    done: dict[str, tuple] = {}
    for k in range(max_steps):
        for action in script.get(k, []):
            if action[0] == "add":
                engine.add_request(action[1], action[2], action[3])
            else:
                engine.abort_request(action[1])
        for out in engine.step():
            if out.finished:
                c = out.outputs[0]
                done[out.request_id] = (list(c.token_ids), c.text, c.finish_reason)
        if not engine.has_unfinished_requests() and k > max(script):
            break
    return done


PROMPTS = ["Hello there", "1 2 3 4 5 6 7 8 9 10", "Why?", "A B C", "Summer rain on the roof",
           "The quick brown fox jumps over the lazy dog", "Once upon a time", "Tell me about rivers"]


def _script():
    g = lambda n, **kw: SamplingParams(temperature=0.0, max_tokens=n, **kw)  # noqa: E731
    return {
        0: [("add", f"r{i}", PROMPTS[i], g(12 + 5 * i)) for i in range(4)]
           + [("add", "stop", PROMPTS[4], g(40, stop=["e", "a"])),  # ends on a stop string early
              ("add", "one", PROMPTS[5], g(1)), ("add", "two", PROMPTS[6], g(2))],
        6: [("add", "late", PROMPTS[7], g(20))],  # arrives while the others decode
        9: [("abort", "r3")],
        14: [("add", "seeded", PROMPTS[0], SamplingParams(temperature=0.8, seed=5, max_tokens=10)),
             ("add", "top-p", PROMPTS[3], SamplingParams(temperature=1.2, top_p=0.9, top_k=20, seed=9,
                                                         max_tokens=14))],
        17: [("add", "logprobs", PROMPTS[2], g(6, logprobs=2))],  # read on the host: no lookahead while it runs
        20: [("add", "min", PROMPTS[1], g(12, min_tokens=6))],
    }


@pytest.mark.parametrize("blocks", [512, 16], ids=["roomy", "tight-pool"])
def test_lookahead_equals_serial_engine(tiny_models, blocks):
    d = tiny_models("qwen2")
    serial = make_llm(d, block_size=4, num_kv_blocks=blocks, async_decode=False).engine
    ahead = make_llm(d, block_size=4, num_kv_blocks=blocks, async_decode=True).engine
    want, got = _run(serial, _script()), _run(ahead, _script())
    assert got == want
    assert "r3" not in got and len(got) == 11  # the aborted one reports nothing
    assert got["stop"][2] == "stop" and len(got["stop"][0]) < 40  # the stop string did fire
    assert ahead.lookahead.num_steps > (10 if blocks == 512 else 3)
    assert serial.lookahead is None
    assert ahead.blocks.num_used_blocks == 0
    if blocks == 16:
        assert ahead.num_preemptions == serial.num_preemptions > 0
