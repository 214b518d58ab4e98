"""One request's state inside the engine.

Everything needed to rebuild the request elsewhere is its prompt (token ids
plus image items) and the tokens already produced: preemption by recompute
and a move to another worker both restart from exactly that.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from stages.engine.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class ImageItem:
    """One image of a prompt, as placeholder tokens ``[offset, offset + length)``.

    ``content_hash`` is the hash of the decoded pixels: it keys the encoder
    cache, the prefix-cache block hashes and (later) the cluster index.
    ``inputs`` holds what the vision encoder eats; ``embedding`` is filled
    once encoded here or received from an encode worker.
    """

    content_hash: str
    offset: int
    length: int
    inputs: dict = field(default_factory=dict)
    embedding: torch.Tensor | None = None


@dataclass
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    images: list[ImageItem] = field(default_factory=list)
    # M-RoPE (Qwen2.5-VL): positions of the prompt, and the shift of every later token.
    mrope_positions: torch.Tensor | None = None
    mrope_delta: int = 0
    prompt: str | None = None
    arrival_time: float = 0.0
    eos_token_ids: frozenset[int] = frozenset()
    max_tokens: int = 16  # resolved against the context length at admission

    output_token_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # hashes of full blocks, in order
    num_registered_blocks: int = 0  # leading blocks of block_table already in the prefix cache
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    # KV of the first num_computed_tokens, computed by a prefill worker: [layers, 2, tokens, kv_heads, dim].
    pending_kv: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def token_id(self, i: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < n else self.output_token_ids[i - n]

    def token_ids(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n:end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - n]

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
