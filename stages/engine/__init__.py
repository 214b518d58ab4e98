"""The inference engine every stage worker runs (vLLM-style offline API)."""

from stages.engine.config import EngineConfig
from stages.engine.outputs import CompletionOutput, Logprob, RequestOutput
from stages.engine.sampling_params import SamplingParams


def __getattr__(name):
    # LLM / LLMEngine pull in torch and transformers: import them only when asked for.
    if name == "LLM":
        from stages.engine.llm import LLM

        return LLM
    if name == "LLMEngine":
        from stages.engine.llm_engine import LLMEngine

        return LLMEngine
    raise AttributeError(name)


__all__ = ["LLM", "LLMEngine", "EngineConfig", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]
