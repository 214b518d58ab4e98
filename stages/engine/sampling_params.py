"""SamplingParams live in ``bus`` (they travel on the wire and the router validates them);
the engine re-exports them under vLLM's import path."""

from bus.sampling_params import GREEDY_TEMPERATURE_EPS, MAX_LOGPROBS, SamplingParams

__all__ = ["SamplingParams", "GREEDY_TEMPERATURE_EPS", "MAX_LOGPROBS"]
