"""LLaVA: a CLIP vision tower, a two-layer projector and a Llama decoder.

The vision tower is transformers' own CLIP module (same weights, same
numbers); the decoder is ours over the paged KV cache. Checkpoints load from
the original hub layout (``language_model.model.*``,
``vision_tower.vision_model.*``) and from transformers 5's
(``model.language_model.*``, ``model.vision_tower.*``, ``lm_head.*``).
"""

from __future__ import annotations

import torch
from torch import nn

from stages.models.base import ImageSupport, VisionLanguageModel, load_image_processor
from stages.models.llama import DecoderLM, DecoderSpec


class LlavaImages(ImageSupport):
    def __init__(self, model_dir, hf_config):
        self.processor = load_image_processor(model_dir)
        self.placeholder_id = hf_config.image_token_id
        vc = hf_config.vision_config
        n = (vc.image_size // vc.patch_size) ** 2
        self.num_tokens = n if hf_config.vision_feature_select_strategy == "default" else n + 1

    def preprocess(self, image):
        pixels = self.processor(images=[image], return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels[0]}, self.num_tokens


class Projector(nn.Module):
    def __init__(self, vision_hidden: int, text_hidden: int, act: str, bias: bool):
        super().__init__()
        from transformers.activations import ACT2FN

        self.linear_1 = nn.Linear(vision_hidden, text_hidden, bias=bias)
        self.act = ACT2FN[act]
        self.linear_2 = nn.Linear(text_hidden, text_hidden, bias=bias)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaLM(VisionLanguageModel):
    VISION_MODULES = ("vision_tower", "multi_modal_projector")

    def __init__(self, hf_config, backend, parts=VisionLanguageModel.PARTS):
        self.feature_layer = hf_config.vision_feature_layer
        if not isinstance(self.feature_layer, int):
            raise ValueError("LLaVA with several vision feature layers is not supported")
        self.strategy = hf_config.vision_feature_select_strategy
        text_cfg = hf_config.text_config
        self.spec = DecoderSpec(text_cfg, text_cfg.model_type, getattr(hf_config, "tie_word_embeddings", False))
        super().__init__(hf_config, backend, parts)
        self._set_geometry(self.spec)

    def _build_vision(self):
        from transformers import CLIPVisionModel

        hf_config = self.hf_config
        vc = hf_config.vision_config
        vc._attn_implementation = "sdpa"
        self.vision_tower = CLIPVisionModel(vc)
        self.multi_modal_projector = Projector(vc.hidden_size, hf_config.text_config.hidden_size,
                                               hf_config.projector_hidden_act,
                                               getattr(hf_config, "multimodal_projector_bias", True))

    def _build_language(self):
        text_cfg = self.hf_config.text_config
        self.language_model = DecoderLM(text_cfg, text_cfg.model_type, self.backend, tie=self.spec.tie)

    @classmethod
    def image_support(cls, model_dir, hf_config) -> ImageSupport:
        return LlavaImages(model_dir, hf_config)

    def encode_images(self, inputs: list[dict]) -> list[torch.Tensor]:
        self._need("vision")
        dtype = self.multi_modal_projector.linear_1.weight.dtype
        device = self.multi_modal_projector.linear_1.weight.device
        pixels = torch.stack([i["pixel_values"] for i in inputs]).to(device=device, dtype=dtype)
        out = self.vision_tower(pixels, output_hidden_states=True)
        feats = out.hidden_states[self.feature_layer]
        if self.strategy == "default":
            feats = feats[:, 1:]  # drop CLS
        return list(self.multi_modal_projector(feats))

    def checkpoint_name(self, name: str) -> str | None:
        if "rotary_emb.inv_freq" in name or name.endswith("position_ids"):
            return None
        for old, new in (("model.language_model.", "language_model.model."),
                         ("model.multi_modal_projector.", "multi_modal_projector."),
                         ("model.vision_tower.", "vision_tower."),
                         ("lm_head.", "language_model.lm_head.")):
            if name.startswith(old):
                name = new + name[len(old):]
                break
        if name.startswith("vision_tower.vision_model."):  # transformers 5's CLIP has no wrapper
            name = "vision_tower." + name[len("vision_tower.vision_model."):]
        if self.spec.tie and name == "language_model.lm_head.weight":
            return None
        return name

    def skip_param(self, name: str) -> bool:
        return ".rotary." in name or name.endswith("position_ids")
