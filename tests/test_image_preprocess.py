"""Our Qwen2.5-VL image preprocessing against transformers' processor: the same bits, the same grid."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from stages.models.base import load_image_processor
from stages.models.image_preprocess import QwenPixels, qwen_pixel_values
from stages.models.model_configs import preprocessor_config


def noise(h: int, w: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    a = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(a[..., 0] if channels == 1 else a, mode)


@pytest.fixture(scope="module")
def tiny_processor(tiny_models):
    return load_image_processor(tiny_models("qwen2_5_vl"))


@pytest.fixture(scope="module")
def processor_7b(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen_7b_preprocessor")
    (d / "preprocessor_config.json").write_text(json.dumps(preprocessor_config("qwen2_5_vl", "7b")))
    return load_image_processor(d)


def assert_same(processor, image):
    inputs = QwenPixels(processor)(image)
    ref = processor(images=[image], return_tensors="pt")
    assert inputs["grid_thw"] == tuple(ref["image_grid_thw"][0].tolist())
    assert "pixel_values" not in inputs  # nothing reads the bytes as float pixels by mistake
    assert inputs["pixel_bytes"].dtype == torch.uint8 and inputs["pixel_bytes"].shape == ref["pixel_values"].shape
    ours = qwen_pixel_values([inputs], "cpu", torch.float32)
    assert ours.dtype == ref["pixel_values"].dtype == torch.float32
    assert ours.shape == ref["pixel_values"].shape
    assert torch.equal(ours, ref["pixel_values"]), (ours - ref["pixel_values"]).abs().max()


# tiny: 4..64 merged tokens (3136..50176 pixels); 7b: 4..16384 (3136..12845056 pixels)
TINY_CASES = {
    "aligned": noise(224, 168),
    "round_up": noise(215, 160),
    "downscale": noise(900, 700),
    "wide": noise(40, 1100),
    "tall": noise(613, 29),
    "gray": noise(150, 190, "L"),
    "rgba": noise(170, 130, "RGBA"),
    "below_min_pixels": noise(12, 17),
}
B7_CASES = {
    "aligned_1344": noise(1344, 1344),
    "round_up": noise(1330, 1010),
    "round_down": noise(450, 300),
    "downscale": noise(3600, 3620),
    "wide": noise(60, 2000),
    "gray": noise(333, 517, "L"),
    "rgba": noise(411, 290, "RGBA"),
    "below_min_pixels": noise(30, 41),
}


@pytest.mark.parametrize("case", sorted(TINY_CASES))
def test_tiny_model_processor(tiny_processor, case):
    assert_same(tiny_processor, TINY_CASES[case])


@pytest.mark.parametrize("case", sorted(B7_CASES))
def test_7b_processor(processor_7b, case):
    assert_same(processor_7b, B7_CASES[case])


def test_palette_with_transparency(processor_7b):
    img = noise(200, 260).convert("P")
    img.info["transparency"] = 7  # one palette index is see-through: composited onto white
    assert_same(processor_7b, img)


def test_qwen_images_uses_it(tiny_models):
    from transformers import AutoConfig

    from stages.models.qwen2_5_vl import QwenImages

    d = tiny_models("qwen2_5_vl")
    images = QwenImages(d, AutoConfig.from_pretrained(d))
    img = noise(300, 200, seed=3)
    inputs, n = images.preprocess(img)
    ref = load_image_processor(d)(images=[img], return_tensors="pt")
    assert torch.equal(qwen_pixel_values([inputs], "cpu", torch.float32), ref["pixel_values"])
    t, h, w = inputs["grid_thw"]
    assert (t, h, w) == tuple(ref["image_grid_thw"][0].tolist()) and n == t * h * w // 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_lookup(processor_7b, dtype):
    """A batch of images of several sizes: one lookup gives transformers' pixels, image after image,
    cast to the tower's dtype."""
    pixels = QwenPixels(processor_7b)
    images = [B7_CASES[c] for c in ("round_up", "gray", "rgba", "below_min_pixels")]
    inputs = [pixels(img) for img in images]
    assert all(i["pixel_table"] is inputs[0]["pixel_table"] for i in inputs)
    ref = torch.cat([processor_7b(images=[img], return_tensors="pt")["pixel_values"] for img in images])
    ours = qwen_pixel_values(inputs, torch.device("cpu"), dtype)
    assert ours.dtype == dtype
    assert torch.equal(ours, ref.to(dtype))


def test_batch_rejects_mixed_tables(tiny_processor, processor_7b):
    a, b = QwenPixels(tiny_processor)(noise(56, 56)), QwenPixels(processor_7b)(noise(56, 56))
    b["pixel_table"] = b["pixel_table"] + 1
    with pytest.raises(ValueError):
        qwen_pixel_values([a, b], "cpu", torch.float32)


def test_rejects_non_pil(tiny_processor):
    with pytest.raises(TypeError):
        QwenPixels(tiny_processor)(np.zeros((28, 28, 3), np.uint8))
