"""model_type -> our implementation."""

from __future__ import annotations

from stages.models.base import EngineModel


def model_class(model_type: str) -> type[EngineModel]:
    if model_type in ("llama", "qwen2", "qwen3"):
        from stages.models.text import TextLM

        return TextLM
    if model_type == "llava":
        from stages.models.llava import LlavaLM

        return LlavaLM
    if model_type == "qwen2_5_vl":
        from stages.models.qwen2_5_vl import Qwen25VLLM

        return Qwen25VLLM
    raise ValueError(f"unsupported model family {model_type!r}")
