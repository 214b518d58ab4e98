"""The GPU backend: our Triton kernels over the paged cache (``triton_kernels.py``).

Per step the host builds the flat layout with a few numpy ops and ships it in
one int32 copy (through a pinned buffer on CUDA): slot mapping, query offsets, context
lengths, the prefill tile map and the block tables. Every layer reuses those
device views. Pure-decode steps can run inside a CUDA graph: the graph reads
its metadata from static buffers (``decode_graph_metadata``) refilled each step;
padding rows get context 0 and slot -1, so they write nothing and read nothing.
"""

from __future__ import annotations

import numpy as np
import torch

from stages.attention import triton_kernels as K
from stages.attention.backend import AttentionBackend, AttentionMetadata, flat_layout
from stages.attention.staging import PinnedStaging


class TritonPagedAttention(AttentionBackend):
    supports_cuda_graphs = True

    def __init__(self, device: torch.device, dtype: torch.dtype | None = None):
        self.device = device
        self.block_m = K.extend_tiles(dtype or torch.bfloat16)[0]
        # fp32 keeps transformers' exact op sequence outside attention (greedy equality tests).
        self.fused_ops = dtype in (torch.bfloat16, torch.float16)
        self.staging = PinnedStaging(torch.int32)
        self.num_sms = (torch.cuda.get_device_properties(device).multi_processor_count
                        if device.type == "cuda" else 4)

    def build_metadata(self, query_lens, context_lens, block_tables, block_size, device,
                       table=None) -> AttentionMetadata:
        q = np.asarray(query_lens, np.int64)
        c = np.asarray(context_lens, np.int64)
        lay = flat_layout(q, c, block_tables, block_size, table)
        s, t = len(q), int(lay["query_start"][-1])
        nd = int(np.argmin(q == 1)) if (q != 1).any() else s
        # Prefill query tiles: (sequence, tile index), longest sequences' tiles first.
        tiles = -(-q[nd:] // self.block_m)
        tile_seq = np.repeat(np.arange(nd, s), tiles)
        tile_start = np.zeros(len(tiles) + 1, np.int64)
        np.cumsum(tiles, out=tile_start[1:])
        tile_m = np.arange(len(tile_seq)) - tile_start[tile_seq - nd]
        table = lay["block_table"]
        parts = [lay["slots"], lay["query_start"], c, tile_seq, tile_m, table.reshape(-1)]
        sizes = [len(p) for p in parts]
        dev = self.staging.to_device(np.concatenate(parts), device)
        views = list(torch.split(dev, sizes))
        meta = AttentionMetadata(
            slot_mapping=views[0], query_start=lay["query_start"][:-1].tolist(), query_lens=list(query_lens),
            context_lens=list(context_lens), block_tables=block_tables, num_decodes=nd, block_size=block_size)
        meta.cache = {"q_start": views[1], "ctx": views[2], "tile_seq": views[3], "tile_m": views[4],
                      "num_tiles": len(tile_seq), "table": views[5].view(s, table.shape[1]), "tokens": t}
        meta.host = lay
        return meta

    def write_kv(self, k_cache, v_cache, k, v, meta):
        K.write_kv(k_cache, v_cache, k, v, meta.slot_mapping)

    def attend(self, q, k_new, v_new, k_cache, v_cache, meta, scale):
        c = meta.cache
        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd:
            splits = K.decode_splits(nd, k_cache.shape[2], self.num_sms)
            K.decode_attention(q[:nd], k_cache, v_cache, c["table"], c["ctx"], scale, splits, out=out[:nd])
        if c["num_tiles"]:
            K.extend_attention(q, out, k_cache, v_cache, c["table"], c["q_start"], c["ctx"], c["tile_seq"],
                               c["tile_m"], c["num_tiles"], scale)
        return out

    def decode_graph_metadata(self, slots, ctx_lens, block_table, block_size) -> AttentionMetadata:
        b = slots.shape[0]
        meta = AttentionMetadata(slot_mapping=slots, query_start=list(range(b)), query_lens=[1] * b,
                                 context_lens=[1] * b, block_tables=[], num_decodes=b, block_size=block_size)
        meta.cache = {"ctx": ctx_lens, "table": block_table, "num_tiles": 0}
        return meta
