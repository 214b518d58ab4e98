"""Per-request sampling parameters, with vLLM's names, defaults and valid ranges."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

# Below this temperature a request is decoded greedily (vLLM's _SAMPLING_EPS).
GREEDY_TEMPERATURE_EPS = 1e-5
MAX_LOGPROBS = 20
# torch.Generator.manual_seed accepts exactly this range.
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _number(name: str, value: Any) -> float:
    # bool is an int subclass, but `temperature=True` is a caller bug, not 1.0.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(name, value, "a number")
    if not math.isfinite(value):
        _fail(name, value, "a finite number")
    return float(value)


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(name, value, "an integer")
    return value


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        _fail(name, value, "a bool")
    return value


@dataclass
class SamplingParams:
    """How to sample one request's continuation (vLLM semantics).

    After construction the fields are normalised: `stop` is a list of strings,
    `stop_token_ids` a list of ints, `top_k` 0 when off (-1 is accepted as "off"),
    float fields are floats. A greedy request (temperature < 1e-5) has top_p, top_k
    and min_p reset to their "off" values, as vLLM does.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True

    def __post_init__(self) -> None:
        if _integer("n", self.n) != 1:
            _fail("n", self.n, "1 (parallel sampling is not supported)")

        self.temperature = _number("temperature", self.temperature)
        if self.temperature < 0:
            _fail("temperature", self.temperature, ">= 0")
        self.top_p = _number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            _fail("top_p", self.top_p, "in (0, 1]")
        if _integer("top_k", self.top_k) < -1:
            _fail("top_k", self.top_k, "-1 or 0 (off) or >= 1")
        self.top_k = max(self.top_k, 0)
        self.min_p = _number("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            _fail("min_p", self.min_p, "in [0, 1]")

        if self.seed is not None and not _SEED_MIN <= _integer("seed", self.seed) <= _SEED_MAX:
            _fail("seed", self.seed, f"None or an integer in [{_SEED_MIN}, {_SEED_MAX}]")

        for name in ("presence_penalty", "frequency_penalty"):
            value = _number(name, getattr(self, name))
            if not -2 <= value <= 2:
                _fail(name, value, "in [-2, 2]")
            setattr(self, name, value)
        self.repetition_penalty = _number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            _fail("repetition_penalty", self.repetition_penalty, "> 0")

        if self.max_tokens is not None and _integer("max_tokens", self.max_tokens) < 1:
            _fail("max_tokens", self.max_tokens, "None or >= 1")
        if _integer("min_tokens", self.min_tokens) < 0:
            _fail("min_tokens", self.min_tokens, ">= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            _fail("min_tokens", self.min_tokens, f"<= max_tokens ({self.max_tokens})")

        self.stop = self._normalise_stop(self.stop)
        self.stop_token_ids = self._normalise_stop_token_ids(self.stop_token_ids)

        if self.logprobs is not None and not 0 <= _integer("logprobs", self.logprobs) <= MAX_LOGPROBS:
            _fail("logprobs", self.logprobs, f"None or in [0, {MAX_LOGPROBS}]")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens",
                     "spaces_between_special_tokens"):
            _flag(name, getattr(self, name))

        if self.greedy:
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0

    @staticmethod
    def _normalise_stop(stop: Any) -> list[str]:
        if stop is None:
            return []
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, (list, tuple)):
            _fail("stop", stop, "None, a string or a list of strings")
        for s in stops:
            if not isinstance(s, str) or not s:
                _fail("stop", stop, "made of non-empty strings")
        return list(stops)

    @staticmethod
    def _normalise_stop_token_ids(ids: Any) -> list[int]:
        if ids is None:
            return []
        if not isinstance(ids, (list, tuple)):
            _fail("stop_token_ids", ids, "None or a list of token ids")
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int) or i < 0:
                _fail("stop_token_ids", ids, "made of integers >= 0")
        return list(ids)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE_EPS

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (str, int, float, bool, None, lists) that msgpack can carry."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingParams:
        """Inverse of `to_dict`; validates like the constructor and rejects unknown keys."""
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown SamplingParams fields: {sorted(unknown)}")
        return cls(**data)

