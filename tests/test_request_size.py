"""The router's prompt-token count (no torch) equals transformers' processor, per family."""

import io

import numpy as np
import pytest
from PIL import Image

from router.backend import ApiRequest
from router.request_size import PromptSizer, qwen_resize
from tests.conftest import VLM_FAMILIES
from tests.hf_reference import hf_chat_inputs, hf_completion_inputs


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _req(messages=None, prompt=None, ids=None, images=()):
    return ApiRequest("r", "m", "chat" if messages else "completion", messages, prompt, ids,
                      [_png(i) for i in images], {}, False)


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_counts_match_the_processor(tiny_models, test_images, family):
    model = tiny_models(family)
    sizer = PromptSizer(model)
    rng = np.random.default_rng(5)
    imgs = test_images + [Image.fromarray(rng.integers(0, 255, (700, 900, 3), dtype=np.uint8))]
    for k in (0, 1, 3):
        chosen = imgs[-k:] if k else []
        for text in ("What is in this picture?", "Hello there, how are you today"):
            msgs = [{"role": "user", "content": [{"type": "image"} for _ in chosen] + [{"type": "text", "text": text}]}]
            want = hf_chat_inputs(model, msgs, chosen)["input_ids"].shape[1]
            assert sizer.count(_req(messages=msgs, images=chosen)).prompt_tokens == want, (family, k, text)
    # Thin images: a side under half a patch rounds to 0 first in transformers' rule, then scales up.
    for h, w in ((10, 300), (6, 900), (300, 12)):
        thin = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))]
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "A strip"}]}]
        want = hf_chat_inputs(model, msgs, thin)["input_ids"].shape[1]
        assert sizer.count(_req(messages=msgs, images=thin)).prompt_tokens == want, (family, h, w)
    want = hf_completion_inputs(model, "Once upon a time")["input_ids"].shape[1]
    assert sizer.count(_req(prompt="Once upon a time")).prompt_tokens == want
    assert sizer.count(_req(ids=[5, 6, 7])).prompt_tokens == 3


def test_qwen_resize_bounds():
    h, w = qwen_resize(3024, 4032, 28, 56 * 56, 28 * 28 * 1280)
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 28 * 28 * 1280
    h, w = qwen_resize(10, 10, 28, 56 * 56, 28 * 28 * 1280)
    assert h * w >= 56 * 56


# The one module of ``stages`` the router may load (the workers' prompt rule), with its packages.
ROUTER_STAGES_MODULES = {"stages", "stages.engine", "stages.engine.prompt_ids", "stages.engine.image_geometry",
                         "stages.engine.config",
                         "stages.engine.outputs", "stages.engine.sampling_params"}


def test_counting_loads_no_torch(llava_dir):
    import subprocess
    import sys

    code = ("import sys, router.server; from router.request_size import PromptSizer; "
            f"PromptSizer({llava_dir!r}).count(__import__('router.backend').backend.ApiRequest("
            "'r', 'm', 'chat', [{'role': 'user', 'content': 'hi'}], None, None, [], {}, False)); "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')]; "
            f"bad += [m for m in sys.modules if m.split('.')[0] == 'stages' and m not in {ROUTER_STAGES_MODULES!r}]; "
            "assert not bad, bad; assert 'stages.engine.prompt_ids' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_router_counts_with_the_workers_rule(llava_dir):
    """One rule: the router's ids are what ``prompt_ids`` gives on transformers' tokenizer."""
    from transformers import AutoTokenizer

    from stages.engine.prompt_ids import chat_text_ids, completion_ids

    sizer, hf = PromptSizer(llava_dir), AutoTokenizer.from_pretrained(llava_dir)
    assert sizer.text_ids(_req(prompt="Once upon a time")) == completion_ids(hf, "Once upon a time")
    msgs = [{"role": "user", "content": "Hello there"}]
    text = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert sizer.text_ids(_req(messages=msgs)) == chat_text_ids(hf, text)
