"""What a prefill worker hands a decode worker: everything to continue a request.

The KV travels per token ([layers, 2, tokens, kv_heads, head_dim]) so the two
workers need not share a block size. Image embeddings travel too: if the
decode worker must preempt and recompute, it has what it needs without
asking the encoder again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class HandoffImage:
    content_hash: str
    offset: int
    length: int
    grid_thw: tuple[int, int, int] | None = None


@dataclass
class Handoff:
    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # what the prefill produced (the first token)
    params: dict  # SamplingParams.to_dict()
    prompt: str | None = None
    images: list[HandoffImage] = field(default_factory=list)
    sent_text_len: int = 0  # characters of the answer the client has already been sent
    num_cached_tokens: int = 0
    cumulative_logprob: float | None = None
    generator_state: bytes | None = None  # a seeded request's RNG, to continue the same stream
    kv: torch.Tensor | None = None
    image_embeddings: list[torch.Tensor] = field(default_factory=list)
