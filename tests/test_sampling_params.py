import msgpack
import pytest

from stages.engine.sampling_params import SamplingParams


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (1, 1.0, 1.0, 0, 0.0, None)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.max_tokens, p.min_tokens, p.stop, p.stop_token_ids) == (16, 0, [], [])
    assert (p.ignore_eos, p.logprobs, p.include_stop_str_in_output) == (False, None, False)
    assert p.skip_special_tokens and p.spaces_between_special_tokens
    assert not p.greedy


def test_normalisation():
    p = SamplingParams(stop="###", stop_token_ids=(7, 8), top_k=-1, temperature=1, max_tokens=None)
    assert p.stop == ["###"] and p.stop_token_ids == [7, 8]
    assert p.top_k == 0 and isinstance(p.temperature, float) and p.max_tokens is None
    assert SamplingParams(stop=("a", "bc")).stop == ["a", "bc"]


def test_greedy_threshold_and_reset_of_filters():
    assert SamplingParams(temperature=0.0).greedy
    assert SamplingParams(temperature=9e-6).greedy
    assert not SamplingParams(temperature=1e-5).greedy
    p = SamplingParams(temperature=0, top_p=0.5, top_k=3, min_p=0.2)
    assert (p.top_p, p.top_k, p.min_p) == (1.0, 0, 0.0)


@pytest.mark.parametrize("field, value, allowed", [
    ("n", 2, "1"),
    ("n", 0, "1"),
    ("temperature", -0.1, ">= 0"),
    ("temperature", float("nan"), "finite"),
    ("temperature", float("inf"), "finite"),
    ("temperature", "0.7", "a number"),
    ("temperature", True, "a number"),
    ("top_p", 0.0, "(0, 1]"),
    ("top_p", 1.5, "(0, 1]"),
    ("top_k", -2, "-1 or 0"),
    ("top_k", 2.0, "an integer"),
    ("min_p", -0.1, "[0, 1]"),
    ("min_p", 1.1, "[0, 1]"),
    ("presence_penalty", 2.5, "[-2, 2]"),
    ("presence_penalty", -2.5, "[-2, 2]"),
    ("frequency_penalty", 3.0, "[-2, 2]"),
    ("repetition_penalty", 0.0, "> 0"),
    ("repetition_penalty", -1.0, "> 0"),
    ("max_tokens", 0, ">= 1"),
    ("max_tokens", 1.5, "an integer"),
    ("min_tokens", -1, ">= 0"),
    ("logprobs", -1, "[0, 20]"),
    ("logprobs", 21, "[0, 20]"),
    ("seed", 1.5, "an integer"),
    ("seed", 2**64, "None or an integer"),
    ("stop", "", "non-empty"),
    ("stop", ["ok", ""], "non-empty"),
    ("stop", ["ok", 3], "non-empty strings"),
    ("stop", 5, "a string or a list"),
    ("stop_token_ids", [1, -1], "integers >= 0"),
    ("stop_token_ids", 3, "a list"),
    ("ignore_eos", 1, "a bool"),
    ("skip_special_tokens", "yes", "a bool"),
])
def test_bad_values_name_field_value_and_range(field, value, allowed):
    with pytest.raises(ValueError) as err:
        SamplingParams(**{field: value})
    message = str(err.value)
    assert message.startswith(field) and repr(value) in message and allowed in message


def test_min_tokens_above_max_tokens():
    with pytest.raises(ValueError, match=r"min_tokens must be <= max_tokens \(4\), got 5"):
        SamplingParams(min_tokens=5, max_tokens=4)
    assert SamplingParams(min_tokens=5, max_tokens=None).min_tokens == 5


def test_edges_accepted():
    SamplingParams(top_p=1.0, min_p=1.0, presence_penalty=-2, frequency_penalty=2,
                   logprobs=20, seed=-(2**63), max_tokens=1, top_k=1)
    SamplingParams(logprobs=0, seed=2**64 - 1, repetition_penalty=1e-3)


def test_wire_round_trip():
    p = SamplingParams(temperature=0.7, top_p=0.9, top_k=40, seed=3, stop=["\n\n", "###"],
                       stop_token_ids=[2], logprobs=5, max_tokens=None, min_tokens=2)
    data = msgpack.unpackb(msgpack.packb(p.to_dict()))
    assert SamplingParams.from_dict(data) == p


def test_from_dict_rejects_unknown_and_validates():
    with pytest.raises(ValueError, match="unknown SamplingParams fields: \\['best_of'\\]"):
        SamplingParams.from_dict({"best_of": 2})
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams.from_dict({"top_p": 0})
