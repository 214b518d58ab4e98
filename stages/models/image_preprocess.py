"""Image -> encoder inputs, bit-identical to transformers' PIL image processor, several times faster.

transformers' Qwen2-VL processor (PIL backend) converts the picture to RGB, resizes it with PIL
to multiples of ``patch * merge`` within ``[min_pixels, max_pixels]``, rescales it in float64,
normalizes it in float32 and flattens it into patches, each repeated over the temporal patch.
Most of its time goes to whole-image float64 and channel-moving copies. Here the host only puts
the uint8 pixels in patch order (one byte per value); the encoder maps every value through a
256-entry table per channel, computed by transformers' own float steps, on its own device
(``qwen_pixel_values``): the same bits, with a quarter of the bytes written and uploaded.
"""

from __future__ import annotations


import numpy as np
import torch
from PIL import Image

from stages.engine.image_geometry import qwen_resize


def to_rgb(image: Image.Image) -> Image.Image:
    """transformers' ``convert_to_rgb``: any transparency is composited onto white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def value_table(processor, channels: int = 3) -> np.ndarray:
    """[channels, 256] float32: what rescale and normalize make of each uint8 value.

    The same operations in the same precisions as transformers' ``rescale`` (float64 product,
    cast to float32) and ``normalize`` (float32 subtract and divide), so a lookup equals them.
    """
    x = np.broadcast_to(np.arange(256, dtype=np.uint8), (channels, 256))
    if processor.do_rescale:
        x = (x.astype(np.float64) * processor.rescale_factor).astype(np.float32)
    x = x.astype(np.float32)
    if processor.do_normalize:
        mean = np.broadcast_to(np.asarray(processor.image_mean, dtype=np.float32), (channels,))
        std = np.broadcast_to(np.asarray(processor.image_std, dtype=np.float32), (channels,))
        x = (x - mean[:, None]) / std[:, None]
    return np.ascontiguousarray(x, dtype=np.float32)


class QwenPixels:
    """Qwen2-VL / Qwen2.5-VL encoder inputs for one image, with every parameter from the processor.

    A call gives ``pixel_bytes``: [grid_h * grid_w, C * temporal * patch * patch] uint8 in
    transformers' order (merge windows row-major, inside one the patches row-major, inside a
    patch channel, temporal copy, row, column; a single image has grid_t 1 and is repeated over
    the temporal patch), ``pixel_table``: [C, 256] float32, what rescale and normalize make of
    each value per channel (one tensor shared by every image), and ``grid_thw``. No
    ``pixel_values``: ``qwen_pixel_values`` turns these into the float pixels transformers gives.
    """

    def __init__(self, processor):
        if not processor.do_convert_rgb:
            raise ValueError("image processors without do_convert_rgb are not supported")
        self.patch = processor.patch_size
        self.merge = processor.merge_size
        self.temporal = processor.temporal_patch_size
        self.do_resize = processor.do_resize
        self.min_pixels = processor.size["shortest_edge"]
        self.max_pixels = processor.size["longest_edge"]
        self.resample = processor.resample if processor.resample is not None else Image.Resampling.BILINEAR
        self.table = torch.from_numpy(value_table(processor))

    def __call__(self, image: Image.Image) -> dict:
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL image, got {type(image).__name__}")
        image = to_rgb(image)
        if self.do_resize:
            h, w = qwen_resize(image.height, image.width, self.patch * self.merge, self.min_pixels, self.max_pixels)
            if (w, h) != image.size:  # PIL's resize to the same size is a copy
                image = image.resize((w, h), resample=self.resample)
        pixels = np.asarray(image)  # [H, W, C] uint8
        height, width, c = pixels.shape
        p, m, t = self.patch, self.merge, self.temporal
        gh, gw = height // p, width // p
        n = gh * gw
        # [merge rows, merge cols, row in window, col in window, C, patch row, patch col], as bytes
        once = np.ascontiguousarray(
            pixels.reshape(gh // m, m, p, gw // m, m, p, c).transpose(0, 3, 1, 4, 6, 2, 5)
        ).reshape(n, c, 1, p * p)
        out = np.empty((n, c, t, p * p), dtype=np.uint8)
        np.copyto(out, once)  # the temporal copies
        return {"pixel_bytes": torch.from_numpy(out.reshape(n, c * t * p * p)), "pixel_table": self.table,
                "grid_thw": (1, gh, gw)}


def qwen_pixel_values(inputs: list[dict], device, dtype: torch.dtype) -> torch.Tensor:
    """The encoder's pixels [patches, C * temporal * patch * patch] on ``device`` in ``dtype``
    for a batch of ``QwenPixels`` outputs: transformers' float32 ``pixel_values`` cast to ``dtype``.

    The uint8 values go to the device (a quarter of float32's bytes) and are looked up there, one
    index over the whole batch in the channel's row of the table. The lookup is exact, and casting
    the table's entries first gives the bits of casting every looked-up value.
    """
    table = inputs[0]["pixel_table"]
    if any(i["pixel_table"] is not table and not torch.equal(i["pixel_table"], table) for i in inputs[1:]):
        raise ValueError("images preprocessed with different value tables in one batch")
    cols = inputs[0]["pixel_bytes"].shape[1]
    values = torch.empty((sum(len(i["pixel_bytes"]) for i in inputs), cols), dtype=torch.uint8, device=device)
    row = 0
    for i in inputs:  # no host-side concatenation: each image's bytes go straight to their rows
        b = i["pixel_bytes"]
        values[row:row + len(b)].copy_(b)
        row += len(b)
    channels, entries = table.shape
    lut = table.to(device=device, dtype=dtype).reshape(-1)
    # column k holds channel k // (cols / channels); its entries start at channel * 256 in ``lut``
    start = torch.arange(cols, device=device, dtype=torch.int32) // (cols // channels) * entries
    index = values + start  # uint8 + int32 -> int32
    return lut.index_select(0, index.reshape(-1)).reshape(values.shape)
