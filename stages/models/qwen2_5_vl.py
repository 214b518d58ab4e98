"""Qwen2.5-VL: transformers' vision transformer + our M-RoPE decoder.

Positions are three rows (temporal, height, width). Text tokens advance all
three together; an image's tokens take their grid coordinates offset by the
text position where the image starts, and the text after it resumes at
``start + max(h, w) / merge``. Tokens generated later sit at
``index + mrope_delta``: a decode worker must get the delta from prefill.
Checkpoints load from the hub layout (``model.*``, ``visual.*``,
``lm_head.*``) and transformers 5's (``model.language_model.*``,
``model.visual.*``).
"""

from __future__ import annotations

import torch

from stages.attention.vision import use_varlen_attention
from stages.models.base import ImageSupport, VisionLanguageModel, load_image_processor
from stages.models.image_preprocess import QwenPixels, qwen_pixel_values
from stages.models.llama import DecoderLM, DecoderSpec


def mrope_positions(token_ids: list[int], images, merge: int) -> tuple[torch.Tensor, int]:
    """M-RoPE positions [3, T] for a prompt whose images are ``images`` (offset, length, grid)."""
    parts, pos, cursor = [], 0, 0
    for img in images:
        if img.offset > cursor:
            n = img.offset - cursor
            parts.append(torch.arange(pos, pos + n).expand(3, -1))
            pos += n
        t, h, w = img.inputs["grid_thw"]
        gh, gw = h // merge, w // merge
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
        parts.append(torch.stack([tt + pos, hh + pos, ww + pos]).reshape(3, -1))
        pos += max(gh, gw)
        cursor = img.offset + img.length
    if cursor < len(token_ids):
        n = len(token_ids) - cursor
        parts.append(torch.arange(pos, pos + n).expand(3, -1))
        pos += n
    positions = torch.cat(parts, dim=1)
    return positions, int(positions.max()) + 1 - len(token_ids)


class QwenImages(ImageSupport):
    def __init__(self, model_dir, hf_config):
        # transformers' processor only for its parameters: ours gives the same pixels faster
        self.pixels = QwenPixels(load_image_processor(model_dir))
        self.placeholder_id = hf_config.image_token_id
        self.merge = hf_config.vision_config.spatial_merge_size

    def preprocess(self, image):
        inputs = self.pixels(image)  # uint8 patches + their table: the encoder's device does the lookup
        t, h, w = inputs["grid_thw"]
        return inputs, t * h * w // self.merge ** 2

    def mrope_positions(self, token_ids, images):
        return mrope_positions(token_ids, images, self.merge)


class Qwen25VLLM(VisionLanguageModel):
    uses_mrope = True
    VISION_MODULES = ("visual",)

    def __init__(self, hf_config, backend, parts=VisionLanguageModel.PARTS):
        self.spec = DecoderSpec(hf_config.text_config, "qwen2_5_vl", getattr(hf_config, "tie_word_embeddings", False))
        super().__init__(hf_config, backend, parts)
        self._set_geometry(self.spec)

    def _build_vision(self):
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

        vc = self.hf_config.vision_config
        vc._attn_implementation = "sdpa"
        self.visual = Qwen2_5_VisionTransformerPretrainedModel._from_config(vc, torch_dtype=torch.get_default_dtype())
        # transformers' sdpa path loops over windows; on CUDA ours runs a layer's segments at once
        use_varlen_attention(self.visual)

    def _build_language(self):
        self.language_model = DecoderLM(self.hf_config.text_config, "qwen2_5_vl", self.backend, tie=self.spec.tie)

    @classmethod
    def image_support(cls, model_dir, hf_config) -> ImageSupport:
        return QwenImages(model_dir, hf_config)

    def encode_images(self, inputs: list[dict]) -> list[torch.Tensor]:
        self._need("vision")
        p = next(self.visual.parameters())
        pixels = qwen_pixel_values(inputs, p.device, p.dtype)
        grid = torch.tensor([i["grid_thw"] for i in inputs], device=p.device)
        out = self.visual(pixels, grid_thw=grid)
        merged = out.pooler_output if hasattr(out, "pooler_output") else out
        sizes = (grid.prod(-1) // self.visual.spatial_merge_size ** 2).tolist()
        return list(torch.split(merged, sizes))

    def checkpoint_name(self, name: str) -> str | None:
        if "rotary_emb.inv_freq" in name or "rotary_pos_emb.inv_freq" in name:
            return None
        for old, new in (("model.language_model.", "language_model.model."),
                         ("model.visual.", "visual."),
                         ("lm_head.", "language_model.lm_head."),
                         ("model.", "language_model.model.")):
            if name.startswith(old):
                name = new + name[len(old):]
                break
        if self.spec.tie and name == "language_model.lm_head.weight":
            return None
        return name

    def skip_param(self, name: str) -> bool:
        return ".rotary." in name or "inv_freq" in name
