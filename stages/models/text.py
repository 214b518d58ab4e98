"""Text-only families (llama, qwen2, qwen3): the decoder as a whole model."""

from __future__ import annotations

from stages.models.llama import DecoderLM


class TextLM(DecoderLM):
    def __init__(self, hf_config, backend, parts=("language",)):
        if "language" not in parts:
            raise ValueError("a text-only model has no vision part: its workers prefill, decode or run mixed")
        super().__init__(hf_config, hf_config.model_type, backend)
