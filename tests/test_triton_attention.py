"""Our Triton kernels equal the torch reference backend on random paged batches.

On a machine without CUDA the kernels run in Triton's interpreter
(``TRITON_INTERPRET=1``, set here before the kernels are defined), so CI checks
the very kernels the GPU runs. Layouts cover odd lengths, block boundaries,
GQA ratios 1/4/7, chunks after a cached prefix and long decodes (several splits).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from stages.attention import triton_kernels as K  # noqa: E402
from stages.attention.torch_paged import TorchPagedAttention  # noqa: E402
from stages.attention.triton_paged import TritonPagedAttention  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_batch(layout, heads, kv_heads, dim, block_size, num_blocks, seed, dtype=torch.float32):
    """Random cache + queries for ``layout`` = [(earlier context, new tokens)], decodes first."""
    g = torch.Generator().manual_seed(seed)
    free = torch.randperm(num_blocks, generator=g).tolist()
    shape = (num_blocks, block_size, kv_heads, dim)
    k_cache = torch.randn(shape, generator=g).to(DEVICE, dtype)  # garbage where nothing was written
    v_cache = torch.randn(shape, generator=g).to(DEVICE, dtype)
    tables, k_new, v_new = [], [], []
    for past, new in layout:
        ctx = past + new
        tables.append([free.pop() for _ in range(-(-ctx // block_size))])
        k_new.append(torch.randn(new, kv_heads, dim, generator=g))
        v_new.append(torch.randn(new, kv_heads, dim, generator=g))
    t = sum(n for _, n in layout)
    q = torch.randn(t, heads, dim, generator=g).to(DEVICE, dtype)
    k = torch.cat(k_new).to(DEVICE, dtype)
    v = torch.cat(v_new).to(DEVICE, dtype)
    return q, k, v, k_cache, v_cache, tables


def run_both(layout, heads, kv_heads, dim, block_size=16, num_blocks=64, seed=0, dtype=torch.float32):
    q, k, v, k_cache, v_cache, tables = make_batch(layout, heads, kv_heads, dim, block_size, num_blocks, seed,
                                                   dtype)
    q_lens = [n for _, n in layout]
    ctx = [p + n for p, n in layout]
    ref, tri = TorchPagedAttention(), TritonPagedAttention(DEVICE, dtype)
    outs, caches = [], []
    for backend in (ref, tri):
        kc, vc = k_cache.clone(), v_cache.clone()
        meta = backend.build_metadata(q_lens, ctx, tables, block_size, DEVICE)
        backend.write_kv(kc, vc, k, v, meta)
        outs.append(backend.attend(q, k, v, kc, vc, meta, dim ** -0.5))
        caches.append((kc, vc))
    return outs, caches


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (7, 1)])  # GQA 1, 4, 7
def test_mixed_batch_matches_reference(heads, kv_heads):
    # Decodes at odd lengths and on block boundaries, then prefills: from scratch, after a
    # prefix (cache hit / earlier chunk) ending mid-block and on a boundary, one spanning tiles.
    layout = [(0, 1), (15, 1), (16, 1), (40, 1), (0, 7), (5, 11), (16, 17), (33, 40)]
    (want, got), ((kr, vr), (kt, vt)) = run_both(layout, heads, kv_heads, 32, seed=heads)
    torch.testing.assert_close(kt, kr, atol=0, rtol=0)  # the KV write is a plain copy
    torch.testing.assert_close(vt, vr, atol=0, rtol=0)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_long_decode_uses_splits():
    """Few sequences, long contexts: several splits per (sequence, kv head), merged."""
    layout = [(300, 1), (77, 1), (129, 1)]
    kernel_splits = K.decode_splits(len(layout), 2, num_sms=8)
    assert kernel_splits > 1
    (want, got), _ = run_both(layout, 8, 2, 32, num_blocks=40, seed=3)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_decode_split_counts_agree():
    """The same decode batch gives the same output with 1, 3 and 8 splits."""
    q, _, _, kc, vc, tables = make_batch([(90, 1), (17, 1)], 8, 2, 32, 16, 24, seed=5)
    width = max(map(len, tables))
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=DEVICE)
    ctx = torch.tensor([91, 18], dtype=torch.int32, device=DEVICE)
    outs = [K.decode_attention(q, kc, vc, bt, ctx, 0.2, n) for n in (1, 3, 8)]
    torch.testing.assert_close(outs[1], outs[0], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(outs[2], outs[0], atol=2e-5, rtol=2e-5)


def test_padding_rows_write_and_read_nothing():
    """A CUDA-graph padding row (slot -1, context 0) leaves the cache alone and outputs zeros."""
    q, k, v, kc, vc, tables = make_batch([(20, 1)], 4, 2, 32, 16, 8, seed=7)
    before = kc.clone()
    K.write_kv(kc, vc, k, v, torch.tensor([-1], dtype=torch.int32, device=DEVICE))
    assert torch.equal(kc, before)
    bt = torch.tensor([tables[0], tables[0]], dtype=torch.int32, device=DEVICE)
    ctx = torch.tensor([21, 0], dtype=torch.int32, device=DEVICE)
    q2 = torch.cat([q, q])
    for splits in (1, 4):
        out = K.decode_attention(q2, kc, vc, bt, ctx, 0.2, splits)
        assert torch.isfinite(out).all() and not out[1].any()


def test_fused_small_ops_match_torch_ops():
    """RMSNorm (with the residual add), rotary in place and silu-mul equal the torch op chains."""
    from stages.models.layers import RMSNorm, apply_rotary
    from stages.models.triton_ops import rmsnorm, rope_, silu_mul

    g = torch.Generator().manual_seed(11)
    x, delta = torch.randn(5, 48, generator=g), torch.randn(5, 48, generator=g)
    norm = RMSNorm(48, 1e-6)
    norm.weight.data = torch.randn(48, generator=g)
    x, delta, norm = x.to(DEVICE), delta.to(DEVICE), norm.to(DEVICE)
    torch.testing.assert_close(rmsnorm(x, norm.weight, 1e-6), norm(x), atol=1e-5, rtol=1e-5)
    total, normed = rmsnorm(x, norm.weight, 1e-6, delta)
    torch.testing.assert_close(total, x + delta)
    torch.testing.assert_close(normed, norm(x + delta), atol=1e-5, rtol=1e-5)
    qk = torch.randn(5, 6, 32, generator=g).to(DEVICE)
    cos, sin = torch.randn(5, 32, generator=g).to(DEVICE), torch.randn(5, 32, generator=g).to(DEVICE)
    want = apply_rotary(qk, cos, sin)
    torch.testing.assert_close(rope_(qk.clone(), cos, sin), want, atol=1e-6, rtol=1e-5)
    gu = torch.randn(5, 2 * 40, generator=g).to(DEVICE)
    torch.testing.assert_close(silu_mul(gu), torch.nn.functional.silu(gu[:, :40]) * gu[:, 40:], atol=1e-6,
                               rtol=1e-5)


def test_fused_decoder_matches_plain_decoder():
    """The fast path's decoder (fused qkv/gate-up, fused norms, rope, Triton attention) equals
    the plain one on the same weights: a prefill chunk, then a mixed step over its cache."""
    from transformers import Qwen2Config

    from stages.models.llama import DecoderLM

    cfg = Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, max_position_embeddings=256)
    torch.manual_seed(0)
    with torch.device(DEVICE):  # as the engine builds it (fused qkv views live on the device they were made on)
        plain = DecoderLM(cfg, "qwen2", TorchPagedAttention())
    fast_backend = TritonPagedAttention(DEVICE, torch.float32)
    fast_backend.fused_ops = True
    with torch.device(DEVICE):
        fast = DecoderLM(cfg, "qwen2", fast_backend)
    fast.load_state_dict(plain.state_dict())
    assert fast.model.layers[0].self_attn.qkv_weight.abs().sum() > 0  # loaded through the views
    bs, blocks = 4, 8
    outs = []
    for model in (plain, fast):
        kv = [(torch.zeros(blocks, bs, 2, 16, device=DEVICE), torch.zeros(blocks, bs, 2, 16, device=DEVICE))
              for _ in range(2)]
        backend = model.model.layers[0].self_attn.backend
        steps = [([9], [9], [[0, 1, 2]]), ([1, 3], [10, 3], [[0, 1, 2], [3]])]  # prefill; decode + new prompt
        ids = [torch.arange(3, 12), torch.tensor([5, 7, 9, 11])]
        for (q_lens, ctx, tables), input_ids in zip(steps, ids):
            meta = backend.build_metadata(q_lens, ctx, tables, bs, DEVICE)
            pos = torch.from_numpy(meta.host["positions"]).to(DEVICE)
            with torch.inference_mode():
                outs.append(model(pos, meta, kv, input_ids=input_ids.to(DEVICE)))
    for want, got in zip(outs[:2], outs[2:]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_7b_shapes_on_cuda():
    """Qwen2.5-7B's attention shapes (28 heads, 4 kv heads, head_dim 128) in bf16: long decodes
    (split-K), a long prefill from scratch and chunks after long prefixes."""
    layout = [(4095, 1), (511, 1), (17, 1), (0, 1000), (2048, 333), (700, 129)]
    (want, got), _ = run_both(layout, 28, 4, 128, num_blocks=600, seed=1, dtype=torch.bfloat16)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


def test_persistent_block_tables_follow_appends_frees_and_returns():
    """Across steps the kept tables equal freshly padded ones: appends, a preemption (new list),
    a sequence leaving and coming back, rows reused by newcomers."""
    from stages.attention.backend import PersistentBlockTables, padded_tables

    kept = PersistentBlockTables(max_rows=3, max_blocks=6)
    a, b, c = [4, 9], [1], [7, 2, 3]
    steps = [(["a", "b"], lambda: None), (["a", "b", "c"], lambda: a.append(5)),
             (["b", "c"], lambda: b.extend([8, 11])), (["a", "c"], lambda: a.append(6))]
    tables = {"a": a, "b": b, "c": c}
    for keys, change in steps:
        change()
        got = kept.gather(keys, [tables[k] for k in keys])
        np.testing.assert_array_equal(got, padded_tables([tables[k] for k in keys]))
    tables["c"] = [0]  # preempted: its blocks freed, a new list
    got = kept.gather(["c", "a"], [tables["c"], tables["a"]])
    np.testing.assert_array_equal(got, padded_tables([tables["c"], tables["a"]]))
    assert kept.gather(["a"], [[1] * 7]) is None  # wider than the rows: the caller falls back
