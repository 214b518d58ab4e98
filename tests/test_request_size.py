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
    want = hf_completion_inputs(model, "Once upon a time")["input_ids"].shape[1]
    assert sizer.count(_req(prompt="Once upon a time")).prompt_tokens == want
    assert sizer.count(_req(ids=[5, 6, 7])).prompt_tokens == 3


def test_qwen_resize_bounds():
    h, w = qwen_resize(3024, 4032, 28, 56 * 56, 28 * 28 * 1280)
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 28 * 28 * 1280
    h, w = qwen_resize(10, 10, 28, 56 * 56, 28 * 28 * 1280)
    assert h * w >= 56 * 56


def test_counting_loads_no_torch(llava_dir):
    import subprocess
    import sys

    code = ("import sys, router.server; from router.request_size import PromptSizer; "
            f"PromptSizer({llava_dir!r}); "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'stages')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
