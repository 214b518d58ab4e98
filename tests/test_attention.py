"""The paged attention backend equals plain causal attention over each sequence."""

from __future__ import annotations

import pytest
import torch

from stages.attention.backend import AttentionMetadata
from stages.attention.torch_paged import TorchPagedAttention
from tests.conftest import TEST_DEVICE


def naive(q, k, v, q_len, ctx, scale):
    """q: [q_len, H, D]; k/v: [ctx, KVH, D] -> [q_len, H, D], causal at the end of the context."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    q_pos = torch.arange(ctx - q_len, ctx)[:, None]
    scores = scores.masked_fill(torch.arange(ctx)[None, :] > q_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.double()).float()


@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 2, 16), (8, 8, 64), (6, 1, 32)])
def test_mixed_batch_matches_naive(heads, kv_heads, dim):
    g = torch.Generator().manual_seed(heads * 100 + dim)
    bs, num_blocks = 4, 64
    # (earlier context, new tokens) per sequence: decodes first, then prefills with/without context.
    layout = [(9, 1), (1, 1), (30, 1), (16, 1), (0, 7), (5, 11), (12, 4), (0, 1 + 16 * 2)]
    layout.sort(key=lambda x: x[1] != 1)
    free = torch.randperm(num_blocks, generator=g).tolist()
    shape = (num_blocks, bs, kv_heads, dim)
    k_cache = torch.zeros(shape, device=TEST_DEVICE)
    v_cache = torch.zeros(shape, device=TEST_DEVICE)
    tables, full_k, full_v = [], [], []
    q_parts, k_new, v_new, slots, q_start = [], [], [], [], []
    offset = 0
    backend = TorchPagedAttention()
    for past, new in layout:
        ctx = past + new
        table = [free.pop() for _ in range(-(-ctx // bs))]
        tables.append(table)
        k_all = torch.randn(ctx, kv_heads, dim, generator=g)
        v_all = torch.randn(ctx, kv_heads, dim, generator=g)
        full_k.append(k_all)
        full_v.append(v_all)
        for i in range(past):  # earlier context already in the cache
            s = table[i // bs] * bs + i % bs
            k_cache.view(-1, kv_heads, dim)[s] = k_all[i].to(TEST_DEVICE)
            v_cache.view(-1, kv_heads, dim)[s] = v_all[i].to(TEST_DEVICE)
        q_parts.append(torch.randn(new, heads, dim, generator=g))
        k_new.append(k_all[past:])
        v_new.append(v_all[past:])
        slots += [table[i // bs] * bs + i % bs for i in range(past, ctx)]
        q_start.append(offset)
        offset += new
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=TEST_DEVICE), query_start=q_start,
        query_lens=[n for _, n in layout], context_lens=[p + n for p, n in layout], block_tables=tables,
        num_decodes=sum(1 for _, n in layout if n == 1), block_size=bs)
    q = torch.cat(q_parts).to(TEST_DEVICE)
    k, v = torch.cat(k_new).to(TEST_DEVICE), torch.cat(v_new).to(TEST_DEVICE)
    backend.write_kv(k_cache, v_cache, k, v, meta)
    scale = dim ** -0.5
    out = backend.attend(q, k, v, k_cache, v_cache, meta, scale).cpu()
    for i, (past, new) in enumerate(layout):
        ref = naive(q_parts[i], full_k[i], full_v[i], new, past + new, scale)
        got = out[q_start[i]:q_start[i] + new]
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)
