"""The vision towers' varlen attention equals transformers' per-segment attention.

Two levels: the varlen functions against one SDPA call per segment on random
inputs (odd lengths, segments of mixed sizes, one length covering every row), and
the whole Qwen2.5-VL tower with our attention against transformers' own tower on
the same weights, images of several sizes (full and edge windows), fp32 on CPU.
Without CUDA the Triton kernel runs in Triton's interpreter.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from stages.attention import vision  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
IMPLS = ["sdpa", "triton"]


def per_segment(q, k, v, lengths, scale):
    outs, start = [], 0
    for n in lengths:
        sl = slice(start, start + n)
        o = F.scaled_dot_product_attention(*(x[sl].transpose(0, 1) for x in (q, k, v)), scale=scale)
        outs.append(o.transpose(0, 1))
        start += n
    return torch.cat(outs)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("lengths", [[64] * 5, [7, 64, 33, 64, 1, 130], [200, 200], [17]])
def test_varlen_matches_per_segment(impl, lengths):
    if impl == "triton":
        pytest.importorskip("triton")
    g = torch.Generator().manual_seed(sum(lengths))
    t, h, d = sum(lengths), 3, 40  # d not a power of two, like the 7B tower's 80
    qkv = torch.randn(t, 3, h, d, generator=g).to(DEVICE)
    q, k, v = qkv.unbind(1)  # strided views, as the tower's qkv split gives
    cu = torch.tensor([0] + lengths, device=DEVICE).cumsum(0).to(torch.int32)
    ref = per_segment(q, k, v, lengths, d ** -0.5)
    out = vision.varlen_attention(q, k, v, cu, d ** -0.5, impl)
    assert out.shape == ref.shape
    err = ((out - ref).norm() / ref.norm()).item()
    assert err < 1e-5, err


@pytest.mark.parametrize("impl", IMPLS)
def test_varlen_half_precision(impl):
    """The tensor-core path (non-IEEE dots, fp32 accumulation) against an fp32 reference.

    fp16, because Triton's interpreter has no bf16 (bf16 runs in the cuda test below)."""
    if impl == "triton":
        pytest.importorskip("triton")
    lengths = [64, 64, 30, 130, 64]
    g = torch.Generator().manual_seed(5)
    t, h, d = sum(lengths), 2, 80
    q, k, v = torch.randn(t, 3, h, d, generator=g).to(DEVICE, torch.float16).unbind(1)
    cu = torch.tensor([0] + lengths, device=DEVICE).cumsum(0).to(torch.int32)
    ref = per_segment(q.float(), k.float(), v.float(), lengths, d ** -0.5)
    out = vision.varlen_attention(q, k, v, cu, d ** -0.5, impl)
    assert out.dtype == torch.float16
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < 2e-3, err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_7b_tower_shapes_on_cuda(impl):
    """The 7B tower's attention shapes in bf16: 16 heads of 80, windows of 64 with edge windows,
    and one whole 1344x1344 image (9,216 rows)."""
    for lengths in ([64] * 40 + [32, 16, 8], [9216, 4096]):
        g = torch.Generator().manual_seed(len(lengths))
        t, h, d = sum(lengths), 16, 80
        q, k, v = torch.randn(t, 3, h, d, generator=g).to(DEVICE, torch.bfloat16).unbind(1)
        cu = torch.tensor([0] + lengths, device=DEVICE).cumsum(0).to(torch.int32)
        ref = per_segment(q.float(), k.float(), v.float(), lengths, d ** -0.5)
        out = vision.varlen_attention(q, k, v, cu, d ** -0.5, impl)
        err = ((out.float() - ref).norm() / ref.norm()).item()
        assert err < 1e-2, (lengths[:3], err)


def tiny_tower_config():
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig

    cfg = Qwen2_5_VLVisionConfig(depth=3, hidden_size=64, intermediate_size=96, num_heads=2, out_hidden_size=48,
                                 patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                                 fullatt_block_indexes=[1])
    cfg._attn_implementation = "sdpa"
    return cfg


@pytest.mark.parametrize("impl", IMPLS)
def test_qwen_tower_matches_transformers(impl):
    if impl == "triton":
        pytest.importorskip("triton")
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    torch.manual_seed(0)
    cfg = tiny_tower_config()
    ref = Qwen2_5_VisionTransformerPretrainedModel._from_config(cfg, torch_dtype=torch.float32).eval()
    ours = Qwen2_5_VisionTransformerPretrainedModel._from_config(cfg, torch_dtype=torch.float32).eval()
    ours.load_state_dict(ref.state_dict())
    assert vision.use_varlen_attention(ours, impl) == cfg.depth
    ref, ours = ref.to(DEVICE), ours.to(DEVICE)
    # grids in patches: a 56 px window is 2x2 merged tokens, so 10x6 and 6x14 leave edge windows
    grid = torch.tensor([[1, 8, 8], [1, 10, 6], [1, 6, 14], [1, 4, 4]], device=DEVICE)
    n = int(grid.prod(-1).sum())
    pixels = torch.randn(n, 3 * 2 * 14 * 14, device=DEVICE)
    with torch.no_grad():
        a, b = ref(pixels, grid_thw=grid), ours(pixels, grid_thw=grid)
    a = getattr(a, "pooler_output", a)
    b = getattr(b, "pooler_output", b)
    assert a.shape == b.shape == (n // 4, 48)
    err = ((a - b).norm() / a.norm()).item()
    assert err < 1e-5, err


def test_auto_is_transformers_on_cpu():
    """On CPU "auto" runs transformers' own forward: the engine's CPU path stays bitwise theirs."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    torch.manual_seed(1)
    cfg = tiny_tower_config()
    ref = Qwen2_5_VisionTransformerPretrainedModel._from_config(cfg, torch_dtype=torch.float32).eval()
    ours = Qwen2_5_VisionTransformerPretrainedModel._from_config(cfg, torch_dtype=torch.float32).eval()
    ours.load_state_dict(ref.state_dict())
    vision.use_varlen_attention(ours)
    grid = torch.tensor([[1, 10, 6], [1, 4, 8]])
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14)
    with torch.no_grad():
        a, b = ref(pixels, grid_thw=grid), ours(pixels, grid_thw=grid)
    assert torch.equal(getattr(a, "pooler_output", a), getattr(b, "pooler_output", b))


@pytest.mark.parametrize("impl", IMPLS)
def test_engine_greedy_with_varlen_tower(tiny_models, test_images, impl):
    """The whole engine with our tower attention forced on (CPU): greedy ids == transformers'."""
    import numpy as np
    from PIL import Image

    from tests.conftest import make_llm
    from tests.test_engine_equality import GREEDY, chat_cases, our_prompt, references

    if impl == "triton":
        pytest.importorskip("triton")
    d = tiny_models("qwen2_5_vl")
    llm = make_llm(d, enable_prefix_caching=False)
    assert vision.use_varlen_attention(llm.engine.runner.model, impl) > 0
    rng = np.random.default_rng(7)  # larger images: several windows each, edge windows too
    big = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((200, 150), (170, 230))]
    cases = chat_cases("qwen2_5_vl", big + list(test_images))
    got = [o.outputs[0].token_ids for o in llm.generate([our_prompt(llm, *c) for c in cases], GREEDY)]
    assert got == references(d, cases)
