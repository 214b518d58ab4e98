"""Attention over a paged KV cache.

The KV cache of one layer is a pair of tensors shaped
``[num_blocks, block_size, num_kv_heads, head_dim]``. A sequence owns a list
of block ids (its block table); token ``i`` of the sequence lives in block
``table[i // block_size]`` at offset ``i % block_size``, i.e. at the flat
*slot* ``table[i // block_size] * block_size + i % block_size``.

A forward pass carries a flat batch of new tokens from several sequences.
Each sequence contributes ``q_len`` new tokens that sit at the end of its
``ctx_len`` tokens of context (context includes the new tokens), so a
decode step is ``q_len == 1`` and a prefill chunk is ``q_len > 1``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Per-step layout of the flat token batch; shared by every layer.

    Invariants: sequences appear in the batch in ``seq`` order, decodes
    (``q_len == 1``) first, then prefills; ``query_start[i]`` is the offset
    of sequence ``i``'s first new token in the flat batch.
    """

    slot_mapping: torch.Tensor  # [num_tokens] long: cache slot of each new token
    query_start: list[int]  # per sequence
    query_lens: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    num_decodes: int  # sequences [0, num_decodes) have q_len == 1
    block_size: int
    # Derived once per step by the backend (gather indices, masks) and reused by every layer.
    cache: dict | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.numel())


class AttentionBackend(ABC):
    """Writes new K/V into the paged cache and attends over it.

    Implementations must give the same numbers (up to float rounding) as
    causal softmax attention over each sequence's full context.
    """

    @abstractmethod
    def write_kv(self, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor, meta: AttentionMetadata) -> None:
        """Store ``k``/``v`` ([num_tokens, kv_heads, head_dim]) at ``meta.slot_mapping``."""

    @abstractmethod
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """``q``: [num_tokens, heads, head_dim] -> [num_tokens, heads, head_dim].

        ``k``/``v`` are this step's new keys and values (already written to
        the cache); a backend may use them directly where a sequence has no
        earlier context.
        """


def get_attention_backend(device: torch.device) -> AttentionBackend:
    """The backend for ``device``; the plain torch one works on cpu, cuda and npu."""
    from stages.attention.torch_paged import TorchPagedAttention

    return TorchPagedAttention()
