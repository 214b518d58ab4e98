"""The offline API's behaviour: sampling, logprobs, stops, aborts and bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from stages.engine import SamplingParams
from stages.engine.images import ImageError
from tests.conftest import make_llm
from tests.hf_reference import hf_logprobs

PROMPTS = ["Hello there", "The quick brown fox jumps", "1 2 3 4 5", "Once upon a time there was"]


@pytest.fixture(scope="module")
def llama(tiny_models):
    return make_llm(tiny_models("llama"), block_size=8, num_kv_blocks=256)


@pytest.fixture(scope="module")
def llava(tiny_models):
    return make_llm(tiny_models("llava"), block_size=8, num_kv_blocks=256)


def test_seeded_sampling_reproducible_across_batches_and_runs(llama, tiny_models):
    p = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=7, max_tokens=20)
    alone = llama.generate(PROMPTS[1], p)[0].outputs[0].token_ids
    mixed_params = [SamplingParams(temperature=1.0, max_tokens=12), p,
                    SamplingParams(temperature=0.7, seed=3, max_tokens=30), SamplingParams(temperature=0)]
    mixed = llama.generate([PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[3]], mixed_params)
    assert mixed[1].outputs[0].token_ids == alone
    fresh = make_llm(tiny_models("llama"), block_size=16, num_kv_blocks=128)
    assert fresh.generate(PROMPTS[1], p)[0].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=8, max_tokens=20)
    assert llama.generate(PROMPTS[1], other_seed)[0].outputs[0].token_ids != alone


def test_logprobs_match_transformers_log_softmax(llama, tiny_models):
    params = SamplingParams(temperature=0.0, max_tokens=10, logprobs=5)
    outs = llama.generate(PROMPTS, params)
    for out in outs:
        comp = out.outputs[0]
        ref = hf_logprobs(tiny_models("llama"), out.prompt_token_ids, comp.token_ids)
        assert len(comp.logprobs) == len(comp.token_ids)
        for step, (tok, entry) in enumerate(zip(comp.token_ids, comp.logprobs)):
            assert tok in entry and entry[tok].rank == 1  # greedy picks the top token
            assert abs(entry[tok].logprob - ref[step, tok].item()) < 1e-4
            top = torch.topk(ref[step], 5)
            assert sorted(entry) == sorted(top.indices.tolist())
            for tid, val in zip(top.indices.tolist(), top.values.tolist()):
                assert abs(entry[tid].logprob - val) < 1e-4
        assert comp.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in
                                                            zip(comp.token_ids, comp.logprobs)))


def test_text_stops_and_lengths(llama):
    tok = llama.get_tokenizer()
    base = llama.generate(PROMPTS[3], SamplingParams(temperature=0, max_tokens=16))[0].outputs[0]
    assert base.finish_reason == "length" and len(base.token_ids) == 16
    assert base.text == tok.decode(base.token_ids, skip_special_tokens=True)
    # Stop on the 5th generated token id.
    stop_id = base.token_ids[4]
    first = base.token_ids.index(stop_id)
    out = llama.generate(PROMPTS[3], SamplingParams(temperature=0, max_tokens=16,
                                                    stop_token_ids=[stop_id]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    assert out.token_ids == base.token_ids[:first + 1]
    # Stop on a string taken from the middle of the text.
    stop = base.text[len(base.text) // 2: len(base.text) // 2 + 3]
    if stop.strip():
        out = llama.generate(PROMPTS[3], SamplingParams(temperature=0, max_tokens=16, stop=[stop]))[0].outputs[0]
        assert out.finish_reason == "stop" and out.stop_reason == stop
        assert out.text == base.text[:base.text.index(stop)]
        kept = llama.generate(PROMPTS[3], SamplingParams(temperature=0, max_tokens=16, stop=[stop],
                                                         include_stop_str_in_output=True))[0].outputs[0]
        assert kept.text == base.text[:base.text.index(stop) + len(stop)]


def test_eos_and_ignore_eos(tiny_models):
    llm = make_llm(tiny_models("llama"), num_kv_blocks=64)
    base = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=8))[0].outputs[0]
    # Make the third greedy token the model's eos: generation must end there, without its text.
    eos = base.token_ids[2]
    first = base.token_ids.index(eos)
    llm.engine.eos_token_ids = frozenset({eos})
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=8))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason is None
    assert out.token_ids == base.token_ids[:first + 1]
    assert out.text == llm.get_tokenizer().decode(base.token_ids[:first], skip_special_tokens=True)
    ign = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0].outputs[0]
    assert ign.token_ids == base.token_ids and ign.finish_reason == "length"


def test_chat_with_image_url_data(llava, test_images):
    import base64
    import io

    buf = io.BytesIO()
    test_images[0].save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    msg = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                        {"type": "text", "text": "What is this?"}]}]
    via_url = llava.chat(msg, SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].token_ids
    msg_pil = [{"role": "user", "content": [{"type": "image", "image": test_images[0]},
                                            {"type": "text", "text": "What is this?"}]}]
    via_pil = llava.chat(msg_pil, SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].token_ids
    assert via_url == via_pil


def test_bad_inputs_fail_alone(llama, llava, tiny_models, tmp_path, test_images):
    ctx = llama.engine.max_model_len
    with pytest.raises(ValueError, match="context"):
        llama.generate({"prompt_token_ids": [5] * ctx}, SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="empty"):
        llama.generate({"prompt_token_ids": []})
    with pytest.raises(ValueError, match="empty"):
        llama.generate("")
    with pytest.raises(ValueError, match="out of range"):
        llama.generate({"prompt_token_ids": [1, 10 ** 9]})
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="does not take images"):
        llama.generate({"prompt": "hi", "multi_modal_data": {"image": [test_images[0]]}})
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    bad = llava.engine.inputs.render_chat(conv)
    bad["multi_modal_data"]["image"] = [b"this is not an image"]
    with pytest.raises(ImageError, match="could not be decoded"):
        llava.generate(bad)
    bad["multi_modal_data"]["image"] = ["data:image/png;base64,@@@notbase64"]
    with pytest.raises(ImageError, match="base64"):
        llava.generate(bad)
    bad["multi_modal_data"]["image"] = []
    with pytest.raises(ValueError, match="placeholder"):
        llava.generate(bad)
    # A batch with one bad request queues nothing, and the engine serves the next batch.
    with pytest.raises(ValueError):
        llama.generate(["fine", {"prompt_token_ids": []}])
    assert not llama.engine.has_unfinished_requests()
    outs = llama.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=4))
    assert all(len(o.outputs[0].token_ids) == 4 for o in outs)
    assert llama.engine.blocks.num_used_blocks == 0
    # An unsupported family is refused by name.
    other = tmp_path / "gpt2"
    shutil.copytree(tiny_models("llama"), other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported model family 'gpt2'"):
        make_llm(str(other))


def test_abort_frees_blocks(llama):
    eng = llama.engine
    eng.add_request("a", PROMPTS[3], SamplingParams(max_tokens=50, ignore_eos=True))
    eng.add_request("b", PROMPTS[1], SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(3):
        eng.step()
    assert eng.blocks.num_used_blocks > 0
    eng.abort_request("a")
    eng.abort_request("b")
    assert eng.blocks.num_used_blocks == 0 and not eng.has_unfinished_requests()


def test_dummy_load_format(tiny_models):
    llm = make_llm(tiny_models("qwen3"), load_format="dummy", num_kv_blocks=64)
    out = llm.generate("hello", SamplingParams(temperature=0, max_tokens=4))[0]
    assert len(out.outputs[0].token_ids) == 4
