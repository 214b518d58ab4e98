"""The decode GEMV kernel equals ``x @ W.T`` for every path (FMA, tensor cores, split-K).

On a machine without CUDA the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``,
set here before the kernels are defined), so CI checks the very kernels the GPU runs. Shapes
are odd (77 x 131: no dimension a multiple of a block) and small, so the interpreter is quick.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from stages.models import gemv_triton as G  # noqa: E402
from stages.models.gemv_triton import GemvConfig  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# (BLOCK_N, BLOCK_K, split_k, warps, stages, dot): small blocks so 77 x 131 spans several tiles
SMALL = [GemvConfig(8, 32), GemvConfig(4, 64, split_k=3), GemvConfig(8, 32, split_k=2, prefetch=True),
         GemvConfig(16, 32, dot=True),
         GemvConfig(16, 32, split_k=2, dot=True), GemvConfig(32, 16, split_k=5, dot=True)]


def reference(x, w, b):
    y = x.double() @ w.double().T
    return y if b is None else y + b.double()


def _name(c: GemvConfig) -> str:
    return f"{'dot' if c.dot else 'fma'}-n{c.block_n}-k{c.block_k}-s{c.split_k}{'-pf' if c.prefetch else ''}"


@pytest.mark.parametrize("cfg", SMALL, ids=_name)
@pytest.mark.parametrize("m", [1, 3, 8, 16])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_matmul_fp32(cfg, m, bias):
    if not cfg.fits(G.m_bucket(m)):
        pytest.skip("FMA configs serve at most 4 rows")
    g = torch.Generator().manual_seed(m * 7 + cfg.block_n)
    n, k = 77, 131
    x = torch.randn(m, k, generator=g).to(DEVICE)
    w = torch.randn(n, k, generator=g).to(DEVICE)
    b = torch.randn(n, generator=g).to(DEVICE) if bias else None
    y = G.gemv(x, w, b, cfg)
    assert y.shape == (m, n) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), reference(x, w, b), atol=1e-4, rtol=1e-4)


def test_even_blocks_strided_weight_and_batched_input():
    """K a multiple of the blocks (the unmasked loads; the prefetching loop, down to one chunk a
    split), a weight that is a row slice of a wider fused one (row stride != K), and x with
    leading dimensions."""
    g = torch.Generator().manual_seed(3)
    fused = torch.randn(64, 128, generator=g).to(DEVICE)
    w = fused[16:48]
    x = torch.randn(2, 2, 128, generator=g).to(DEVICE)
    for cfg in (GemvConfig(8, 64), GemvConfig(8, 32, split_k=2), GemvConfig(16, 64, split_k=2, dot=True),
                GemvConfig(4, 32, prefetch=True), GemvConfig(4, 16, split_k=4, prefetch=True),
                GemvConfig(4, 16, split_k=8, prefetch=True)):
        y = G.gemv(x, w, None, cfg)
        assert y.shape == (2, 2, 32)
        torch.testing.assert_close(y.double(), x.double() @ w.double().T, atol=1e-4, rtol=1e-4)


# Triton 3.6's interpreter mis-computes tl.dot on bf16 (fp16 is right): bf16 runs on CUDA only.
HALF = [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    DEVICE.type != "cuda", reason="the interpreter's bf16 dot is wrong"))]


@pytest.mark.parametrize("dtype", HALF)
def test_half_output_dtype(dtype):
    """16-bit in, 16-bit out, fp32 accumulation: within one rounding of the exact result."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 96, generator=g).to(DEVICE, dtype)
    w = torch.randn(40, 96, generator=g).to(DEVICE, dtype)
    b = torch.randn(40, generator=g).to(DEVICE, dtype)
    for cfg in (GemvConfig(8, 32), GemvConfig(16, 32, split_k=2, dot=True)):
        y = G.gemv(x, w, b, cfg)
        assert y.dtype == dtype
        torch.testing.assert_close(y.double(), reference(x, w, b), atol=3e-2, rtol=1e-2)


def test_candidates_and_buckets():
    assert [G.m_bucket(m) for m in (1, 2, 3, 4, 5, 8, 9, 16)] == [1, 2, 4, 4, 8, 8, 16, 16]
    assert G.shape_class(37888, 3584) == "wide" and G.shape_class(3584, 18944) == "deep"
    assert G.shape_class(4608, 3584) == "square"
    for m in (1, 2, 4, 8, 16):
        cands = G.candidates(m, 3584, 18944)
        assert cands and all(c.fits(G.m_bucket(m)) for c in cands)
        if m > 4:
            assert all(c.dot for c in cands)
    assert any(c.split_k > 1 for c in G.candidates(1, 3584, 18944))


def test_linear_falls_back_without_a_picked_config():
    """Off CUDA (or for a shape never picked) ``linear`` is ``F.linear``, bit for bit, and
    ``prepare_decode_gemv`` does nothing."""
    from stages.models import layers

    x, w, b = torch.randn(3, 20), torch.randn(12, 20), torch.randn(12)
    assert torch.equal(G.linear(x, w, b), torch.nn.functional.linear(x, w, b))
    assert G.pick_config(1, 12, 20, torch.float32, "cpu") is None
    model = torch.nn.Module()
    model.lm_head = torch.nn.Linear(20, 12, bias=False)
    assert G.prepare_decode_gemv(model) == {}
    assert layers.small_rows_linear is None
    assert torch.equal(layers.linear(x, w, b), torch.nn.functional.linear(x, w, b))


def test_decode_linear_weights_walks_the_language_model(tiny_models):
    """The fused qkv and gate-up weights, o/down projections and lm_head, each once."""
    from transformers import AutoConfig

    from stages.attention.torch_paged import TorchPagedAttention
    from stages.models.llama import DecoderLM

    cfg = AutoConfig.from_pretrained(tiny_models("qwen2"))
    model = DecoderLM(cfg, "qwen2", TorchPagedAttention())
    groups = G.decode_linear_weights(model)
    layer = model.model.layers[0]
    shapes = {tuple(layer.self_attn.qkv_weight.shape), tuple(layer.self_attn.o_proj.weight.shape),
              tuple(layer.mlp.gate_up_weight.shape), tuple(layer.mlp.down_proj.weight.shape),
              tuple(model.lm_head.weight.shape)}
    assert {(n, k) for n, k, _ in groups} == shapes
    total = sum(len(ws) for ws in groups.values())
    assert total == 4 * cfg.num_hidden_layers + 1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_7b_shapes_on_cuda():
    """Qwen2.5-VL-7B's decode linears in bf16, every candidate, against cuBLAS; then the picker
    and ``linear`` inside a captured CUDA graph."""
    shapes = [(4608, 3584), (3584, 3584), (37888, 3584), (3584, 18944)]
    g = torch.Generator(device="cuda").manual_seed(0)
    for n, k in shapes:
        w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
        b = (torch.randn(n, device="cuda", generator=g) * 0.1).to(torch.bfloat16)
        for m in (1, 2, 4, 8, 16):
            x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
            want = torch.nn.functional.linear(x.float(), w.float(), b.float())
            for cfg in G.candidates(m, n, k):
                got = G.gemv(x, w, b, cfg).float()
                torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2, msg=lambda s: f"{cfg} m={m}: {s}")
    n, k = 3584, 18944
    w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    G._PICKED[(1, n, k, torch.bfloat16)] = GemvConfig(8, 512, split_k=4)  # force the kernel (and split-K)
    x = torch.randn(1, k, device="cuda", generator=g).to(torch.bfloat16)
    graph = torch.cuda.CUDAGraph()
    G.linear(x, w)  # compile outside the capture
    with torch.cuda.graph(graph):
        y = G.linear(x, w)
    x.copy_(torch.randn(1, k, device="cuda", generator=g).to(torch.bfloat16))
    graph.replay()
    torch.testing.assert_close(y.float(), (x.float() @ w.float().T), atol=2e-2, rtol=2e-2)
    del G._PICKED[(1, n, k, torch.bfloat16)]
    G.pick_config(1, 4608, 3584, torch.bfloat16, "cuda")  # runs, whatever it picks
    G._PICKED.pop((1, 4608, 3584, torch.bfloat16))
