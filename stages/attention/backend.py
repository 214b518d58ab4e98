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
from dataclasses import dataclass, field
from itertools import chain

import numpy as np
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
    # Derived once per step by the backend (gather indices, masks, device buffers) and reused by
    # every layer.
    cache: dict | None = None
    # Host arrays of the flat layout (numpy): ``positions`` [T] of each new token in its
    # sequence, ``seq_of_token`` [T]; filled by ``build_metadata``.
    host: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.numel())


def padded_tables(block_tables: list[list[int]]) -> np.ndarray:
    """The block tables as one zero-padded int32 array [S, W] (no loop over sequences)."""
    b = len(block_tables)
    nblk = np.fromiter(map(len, block_tables), np.int64, b)
    width = max(1, int(nblk.max()) if b else 1)
    table = np.zeros((b, width), np.int32)
    table[np.arange(width)[None, :] < nblk[:, None]] = np.fromiter(chain.from_iterable(block_tables),
                                                                   np.int32, int(nblk.sum()))
    return table


class PersistentBlockTables:
    """Block tables kept across steps in one host array: a sequence keeps its row while it is
    scheduled, and a step writes only the block ids appended since the last one.

    A sequence's table list only grows by appends, and is replaced by a new list when its
    blocks are freed (preemption), so "same list object, longer" means "copy the tail"; a
    sequence absent from a step gives its row back (it rewrites it when it returns).
    """

    def __init__(self, max_rows: int, max_blocks: int):
        self.table = np.zeros((max_rows, max_blocks), np.int32)
        self.filled = [0] * max_rows  # ids written in each row (beyond: zeros)
        self.rows: dict = {}  # key -> [row, the list object, ids copied]
        self.free = list(range(max_rows - 1, -1, -1))

    def gather(self, keys: list, tables: list[list[int]]) -> np.ndarray | None:
        """The batch's tables [S, W] (zero-padded), or None when they do not fit (caller falls back)."""
        if len(keys) > self.table.shape[0] or any(len(t) > self.table.shape[1] for t in tables):
            return None
        present = set(keys)
        for key in [k for k in self.rows if k not in present]:
            self.free.append(self.rows.pop(key)[0])
        idx = np.empty(len(keys), np.int64)
        width = 1
        for i, (key, t) in enumerate(zip(keys, tables)):
            ent = self.rows.get(key)
            n = len(t)
            if ent is None or ent[1] is not t or n < ent[2]:
                row = ent[0] if ent is not None else self.free.pop()
                if n:
                    self.table[row, :n] = t
                if self.filled[row] > n:
                    self.table[row, n:self.filled[row]] = 0
                self.filled[row] = n
                ent = self.rows[key] = [row, t, n]
            elif n > ent[2]:
                self.table[ent[0], ent[2]:n] = t[ent[2]:n]
                ent[2] = self.filled[ent[0]] = n
            idx[i] = ent[0]
            width = max(width, n)
        return self.table[idx, :width]


def token_slots(table: np.ndarray, seq: np.ndarray, positions: np.ndarray, block_size: int) -> np.ndarray:
    """Cache slots (int64) of tokens at ``positions`` of sequences ``seq`` (rows of ``table``)."""
    return table[seq, positions // block_size].astype(np.int64) * block_size + positions % block_size


def flat_layout(query_lens: np.ndarray, context_lens: np.ndarray, block_tables: list[list[int]],
                block_size: int, table: np.ndarray | None = None) -> dict:
    """The flat batch's host arrays, vectorized (no loop over tokens or sequences).

    Returns ``query_start`` [S+1], ``seq_of_token`` [T], ``positions`` [T] (each
    new token's index in its sequence), ``block_table`` [S, W] int32 (zero-padded)
    and ``slots`` [T] int64. ``table``: the padded tables when the caller keeps them already.
    """
    b = len(query_lens)
    starts = np.zeros(b + 1, np.int64)
    np.cumsum(query_lens, out=starts[1:])
    t = int(starts[-1])
    seq_of_token = np.repeat(np.arange(b), query_lens)
    positions = np.arange(t) - starts[seq_of_token] + (context_lens - query_lens)[seq_of_token]
    if table is None:
        table = padded_tables(block_tables)
    return {"query_start": starts, "seq_of_token": seq_of_token, "positions": positions,
            "block_table": table, "slots": token_slots(table, seq_of_token, positions, block_size)}


class AttentionBackend(ABC):
    """Writes new K/V into the paged cache and attends over it.

    Implementations must give the same numbers (up to float rounding) as
    causal softmax attention over each sequence's full context. The backend
    owns the step's metadata (``build_metadata``): the runner hands it the
    scheduler's lengths and block tables, never cache offsets.
    """

    #: whether pure-decode steps may be captured in CUDA graphs (``decode_graph_metadata``)
    supports_cuda_graphs = False
    #: whether the model should use fused projections and Triton kernels for its small ops
    #: (norms, rotary, silu-mul); read when the model is built
    fused_ops = False

    def build_metadata(self, query_lens: list[int], context_lens: list[int],
                       block_tables: list[list[int]], block_size: int,
                       device: torch.device, table: np.ndarray | None = None) -> AttentionMetadata:
        """One step's metadata; sequences in batch order, decodes (``q_len == 1``) first.

        ``table``: ``block_tables`` already padded ([S, W] int32), e.g. from ``PersistentBlockTables``.
        """
        q = np.asarray(query_lens, np.int64)
        c = np.asarray(context_lens, np.int64)
        lay = flat_layout(q, c, block_tables, block_size, table)
        nd = int(np.argmin(q == 1)) if (q != 1).any() else len(q)
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(lay["slots"]).to(device), query_start=lay["query_start"][:-1].tolist(),
            query_lens=list(query_lens), context_lens=list(context_lens), block_tables=block_tables,
            num_decodes=nd, block_size=block_size)
        meta.host = lay
        return meta

    def decode_graph_metadata(self, slots: torch.Tensor, ctx_lens: torch.Tensor, block_table: torch.Tensor,
                              block_size: int) -> AttentionMetadata:
        """Metadata of a captured decode step that reads static device buffers: ``slots`` and
        ``ctx_lens`` [b] int64 (padding rows: slot -1, context 0), ``block_table`` [>=b, W] int32."""
        raise NotImplementedError(f"{type(self).__name__} does not run in CUDA graphs")

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


BACKENDS = ("auto", "torch", "triton")


def get_attention_backend(device: torch.device, name: str = "auto",
                          dtype: torch.dtype | None = None) -> AttentionBackend:
    """The backend for ``device``: ``auto`` picks triton on CUDA, the plain torch one elsewhere.

    ``torch`` (the reference) works on cpu, cuda and npu; ``triton`` on CUDA, and on the
    CPU only under ``TRITON_INTERPRET=1`` (tests).
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        name = "triton" if torch.device(device).type == "cuda" else "torch"
    if name == "triton":
        from stages.attention.triton_paged import TritonPagedAttention

        return TritonPagedAttention(torch.device(device), dtype)
    from stages.attention.torch_paged import TorchPagedAttention

    return TorchPagedAttention()
