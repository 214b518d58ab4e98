"""Prompt token ids == transformers' processor (tokenizer for text families), for every family:
chat and completion prompts, with 0, 1 and 3 images for the vision families.

The ids are read from what the engine actually ran (``RequestOutput.prompt_token_ids``
after ``LLM.chat`` / ``LLM.generate``), so the image placeholders are already expanded.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from stages.engine import SamplingParams
from tests.conftest import FAMILIES, VLM_FAMILIES, make_llm
from tests.hf_reference import hf_chat_inputs, hf_completion_inputs, load_hf

ONE = SamplingParams(temperature=0.0, max_tokens=1)
# The placeholder each vision family's processor expands, as a user writes it in a completion prompt.
PLACEHOLDER = {"llava": "<image>\n", "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>"}
TEXT = "router fast router cat how router router cat"


@pytest.fixture(scope="module")
def llms(tiny_models):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = make_llm(tiny_models(family), num_kv_blocks=256, enable_prefix_caching=False)
        return cache[family]

    return get


def conversations(family: str, images) -> list[tuple[list[dict], list]]:
    """(messages, images) pairs: plain string content, a system turn, several turns, 0/1/3 images."""
    convs = [([{"role": "user", "content": TEXT}], []),
             ([{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Why?"}], []),
             ([{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi! How can I help?"},
               {"role": "user", "content": [{"type": "text", "text": "Count to 3"}]}], [])]
    for n in ((0, 1, 3) if family in VLM_FAMILIES else ()):
        imgs = images[:n]
        parts = [{"type": "image"} for _ in imgs] + [{"type": "text", "text": f"{TEXT} {n}"}]
        convs.append(([{"role": "user", "content": parts}], imgs))
    return convs


def _ids(inputs: dict) -> list[int]:
    return inputs["input_ids"][0].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_prompt_ids_match_transformers(llms, tiny_models, test_images, family):
    d, llm = tiny_models(family), llms(family)
    for messages, imgs in conversations(family, test_images):
        it = iter(imgs)
        ours = [{**m, "content": [{"type": "image", "image": next(it)} if p["type"] == "image" else p
                                  for p in m["content"]] if isinstance(m["content"], list) else m["content"]}
                for m in messages]
        got = llm.chat(ours, ONE)[0].prompt_token_ids
        assert got == _ids(hf_chat_inputs(d, messages, imgs)), (family, messages)


@pytest.mark.parametrize("family", FAMILIES)
def test_completion_prompt_ids_match_transformers(llms, tiny_models, test_images, family):
    d, llm = tiny_models(family), llms(family)
    cases = [(TEXT, []), ("1 2 3 4 5 6 7 8 9 10", []), ("Why?", [])]
    if family in VLM_FAMILIES:
        cases += [(PLACEHOLDER[family] * n + f"{TEXT} {n}", test_images[:n]) for n in (1, 3)]
    for text, imgs in cases:
        got = llm.generate({"prompt": text, "multi_modal_data": {"image": imgs}}, ONE)[0].prompt_token_ids
        assert got == _ids(hf_completion_inputs(d, text, imgs)), (family, text)
        # A prompt given as token ids runs exactly as given.
        ids = load_hf(d)[1](text).input_ids  # placeholders not expanded: one per image
        assert llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": imgs}},
                            ONE)[0].prompt_token_ids == _ids(hf_completion_inputs(d, text, imgs))


def test_llava_chat_starts_with_bos(llms, tiny_models):
    """The case issue 10 found: LLaVA's template writes no <s>, its processor adds one."""
    llm = llms("llava")
    bos = llm.get_tokenizer().bos_token_id
    ids = llm.chat([{"role": "user", "content": TEXT}], ONE)[0].prompt_token_ids
    assert ids[0] == bos and ids[1] != bos
    # Llama's template writes the bos itself: exactly one.
    ids = llms("llama").chat([{"role": "user", "content": TEXT}], ONE)[0].prompt_token_ids
    assert ids[0] == llms("llama").get_tokenizer().bos_token_id and ids.count(ids[0]) == 1


def test_prompt_rules_import_no_torch():
    code = ("import sys, stages.engine.prompt_ids; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
