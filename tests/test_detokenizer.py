import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from stages.engine.detokenizer import (IncrementalDetokenizer, find_stop_string,
                                       stop_string_holdback)

SENTENCES = [
    "héllo 世界 🙂 and a café",
    "The quick brown fox jumps over the lazy dog.",
    "naïve façade — 日本語のテキスト",
    "emoji 🙂🙃👍🏽 mix, then more text",
    "hello hello world world\n\nnew paragraph",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>"]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A small GPT-2-style byte-level BPE: 256 byte tokens, ~100 merges, specials."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(SENTENCES, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=SPECIALS[0],
                                  clean_up_tokenization_spaces=False)
    tok.add_tokens(["<tool call>"])  # an added, non-special token
    return tok


def stream(tok, prompt, output, rng=None, **kwargs) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt, **kwargs)
    deltas, i = [], 0
    while i < len(output):
        step = rng.choice([1, 1, 1, 2, 3]) if rng else 1
        deltas.append(detok.add(output[i:i + step]))
        i += step
    deltas.append(detok.flush())
    assert detok.token_ids == list(output) and detok.text == "".join(deltas)
    return deltas


def test_multibyte_characters_are_split_across_byte_tokens(tokenizer):
    ids = tokenizer.encode("🙂👍🏽世")
    assert len(ids) > 3  # the fixture must really split characters into byte tokens
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)


@pytest.mark.parametrize("skip", [True, False])
def test_random_ids_concatenate_to_full_decode(tokenizer, skip):
    rng = random.Random(skip)
    for _ in range(150):
        prompt = tokenizer.encode(rng.choice(SENTENCES))
        output = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(40))]
        deltas = stream(tokenizer, prompt, output, rng, skip_special_tokens=skip)
        assert "".join(deltas) == tokenizer.decode(output, skip_special_tokens=skip)


@pytest.mark.parametrize("skip", [True, False])
def test_real_text_with_special_tokens_streams_whole_characters(tokenizer, skip):
    eos, start = tokenizer.convert_tokens_to_ids(SPECIALS)
    tool = tokenizer.convert_tokens_to_ids("<tool call>")
    # Unseen text, so characters are split into byte tokens.
    output = ([start] + tokenizer.encode("Grüße 🙂👍🏽 你好") + [tool] + tokenizer.encode(" ✓ ok")
              + [eos])
    deltas = stream(tokenizer, tokenizer.encode("prompt:"), output, skip_special_tokens=skip)
    assert "".join(deltas) == tokenizer.decode(output, skip_special_tokens=skip)
    assert all("\ufffd" not in d for d in deltas)
    assert ("<|endoftext|>" in "".join(deltas)) is not skip
    assert "<tool call>" in "".join(deltas)


def test_first_delta_keeps_its_leading_space(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("hello"))
    text = "".join(detok.add([i]) for i in tokenizer.encode(" world 🙂"))
    assert text == " world 🙂"


def test_empty_prompt_and_held_back_tail_is_flushed(tokenizer):
    ids = tokenizer.encode("🙂")
    detok = IncrementalDetokenizer(tokenizer, [])
    assert detok.add(ids[:-1]) == ""  # incomplete character: held back
    assert detok.flush() == tokenizer.decode(ids[:-1])  # ends as U+FFFD, like a full decode


def test_cost_per_token_does_not_grow_with_length(tokenizer):
    calls = []

    class Counting:
        def decode(self, ids, **kwargs):
            calls.append(len(ids))
            return tokenizer.decode(ids, **kwargs)

    ids = tokenizer.encode(" ".join(SENTENCES) * 30)
    detok = IncrementalDetokenizer(Counting(), [])
    for i in ids:
        detok.add([i])
    assert detok.text == tokenizer.decode(ids, skip_special_tokens=True)
    assert max(calls) <= 12 and len(calls) <= 2 * len(ids) + 1


def test_stop_string_split_across_deltas():
    text = "The answer is 42"
    assert find_stop_string(text, len(text), ["\n\n"], False) is None
    text += "\n"
    assert find_stop_string(text, 1, ["\n\n"], False) is None
    text += "\nNext question"
    assert find_stop_string(text, 14, ["\n\n"], False) == ("\n\n", 16)
    assert find_stop_string(text, 14, ["\n\n"], True) == ("\n\n", 18)


def test_stop_string_truncation_and_search_region():
    text = "abc STOP def"
    assert find_stop_string(text, 4, ["STOP"], False) is None  # completed before this delta
    assert find_stop_string(text, 8, ["STOP"], False) == ("STOP", 4)
    assert find_stop_string(text, 8, ["STOP"], True) == ("STOP", 8)
    assert text[:find_stop_string(text, 8, ["STOP"], True)[1]] == "abc STOP"
    # Earliest occurrence wins, whatever the list order.
    assert find_stop_string("x def STOP", 10, ["STOP", "def"], False) == ("def", 2)
    assert find_stop_string("anything", 0, ["any"], False) is None
    assert find_stop_string("anything", 3, [], False) is None


def test_stop_string_holdback():
    assert stop_string_holdback("hello wor", ["world!"]) == 3
    assert stop_string_holdback("hello", ["world!"]) == 0
    assert stop_string_holdback("ab\n", ["\n\n", "x"]) == 1
    assert stop_string_holdback("aSTO", ["STOP", "TOPAZ"]) == 3
    assert stop_string_holdback("s", ["s"]) == 0  # a complete stop is found, not held
