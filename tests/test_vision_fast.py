"""The Qwen2.5-VL vision blocks' fast forward (stages/models/qwen_vision_fast.py) equals transformers'.

The whole tower with the fast blocks forced against transformers' tower on the same random
weights, fp32 on CPU (Triton kernels in Triton's interpreter): a small config with an
intermediate size that is not a multiple of the padding, one full-attention block, images
with edge windows. Then the padded weights under reloading and replacement, the CPU default
left bitwise transformers', and the tiny engine's greedy ids. A bf16 test at the 7B shapes
runs on CUDA.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from stages.attention import vision  # noqa: E402
from stages.models import qwen_vision_fast as fast  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ATTN = ["sdpa", "triton", "reference"]


def tower_config(**over):
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig

    fields = dict(depth=3, hidden_size=64, intermediate_size=90, num_heads=2, out_hidden_size=48, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
    fields.update(over)
    cfg = Qwen2_5_VLVisionConfig(**fields)
    cfg._attn_implementation = "sdpa"
    return cfg


def two_towers(cfg, dtype=torch.float32, seed=0):
    """transformers' tower and a copy on DEVICE, same weights: unit-gain matrices, norm weights
    around 1, biases around 0 (the init's std 0.02 leaves the blocks a rounding error of the output)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    torch.manual_seed(seed)
    ref = Qwen2_5_VisionTransformerPretrainedModel._from_config(cfg, torch_dtype=dtype).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn_like(p) * p[0].numel() ** -0.5)
            else:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name or "ln_q" in name else 0.0))
    ours = Qwen2_5_VisionTransformerPretrainedModel._from_config(cfg, torch_dtype=dtype).eval()
    ours.load_state_dict(ref.state_dict())
    return ref.to(DEVICE), ours.to(DEVICE)


def run(tower, pixels, grid):
    with torch.no_grad():
        out = tower(pixels, grid_thw=grid)
    return getattr(out, "pooler_output", out)


def max_rel(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


# grids in patches: a 56 px window is 2x2 merged tokens, so 10x6 and 6x14 leave edge windows
GRID = [[1, 8, 8], [1, 10, 6], [1, 6, 14], [1, 4, 4]]


def inputs(grid, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    grid = torch.tensor(grid, device=DEVICE)
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14, generator=g).to(DEVICE, dtype)
    return pixels, grid


@pytest.mark.parametrize("attn", ATTN)
def test_fast_tower_matches_transformers(attn):
    pytest.importorskip("triton")
    cfg = tower_config()
    ref, ours = two_towers(cfg)
    names = {k: v.shape for k, v in ours.state_dict().items()}
    assert vision.use_varlen_attention(ours, attn, blocks="fast") == cfg.depth
    pixels, grid = inputs(GRID)
    a, b = run(ref, pixels, grid), run(ours, pixels, grid)
    assert a.shape == b.shape == (pixels.shape[0] // 4, 48)
    assert max_rel(a, b) < 1e-5, max_rel(a, b)
    # the MLP weights are now views into padded storage (90 -> 128); names, shapes and values kept
    mlp = ours.blocks[0].mlp
    assert mlp._epd_padded.gate_up.shape == (256, 64) and mlp._epd_padded.down.shape == (64, 128)
    assert {k: v.shape for k, v in ours.state_dict().items()} == names
    ref_state = ref.state_dict()
    assert all(torch.equal(v, ref_state[k]) for k, v in ours.state_dict().items())


def test_padded_weights_follow_reloads_and_replacements():
    """Weights copied in after the padding land in it; a replaced parameter is padded again."""
    pytest.importorskip("triton")
    cfg = tower_config(depth=2, fullatt_block_indexes=[0])
    ref, ours = two_towers(cfg)
    vision.use_varlen_attention(ours, "sdpa", blocks="fast")
    pixels, grid = inputs([[1, 6, 10], [1, 4, 4]])
    run(ours, pixels, grid)  # pads
    padded = ours.blocks[1].mlp._epd_padded
    other, _ = two_towers(cfg, seed=3)
    ours.load_state_dict(other.state_dict())  # a checkpoint load: copies into the views
    assert ours.blocks[1].mlp._epd_padded is padded
    assert max_rel(run(other, pixels, grid), run(ours, pixels, grid)) < 1e-5
    assert ours.blocks[1].mlp._epd_padded is padded  # nothing rebuilt
    mlp = ours.blocks[1].mlp
    mlp.down_proj.weight = torch.nn.Parameter(mlp.down_proj.weight.detach() * 2)  # replaced, not copied into
    with torch.no_grad():
        other.blocks[1].mlp.down_proj.weight.mul_(2)
    assert max_rel(run(other, pixels, grid), run(ours, pixels, grid)) < 1e-5
    assert ours.blocks[1].mlp._epd_padded is not padded


def test_auto_is_transformers_on_cpu():
    """On CPU "auto" runs transformers' block forward on untouched weights: bitwise theirs."""
    cfg = tower_config()
    ref, ours = two_towers(cfg, seed=1)
    ref, ours = ref.cpu(), ours.cpu()
    assert fast.use_fast_blocks(ours) == cfg.depth
    pixels, grid = inputs([[1, 10, 6], [1, 4, 8]])
    pixels, grid = pixels.cpu(), grid.cpu()
    assert torch.equal(run(ref, pixels, grid), run(ours, pixels, grid))
    assert not hasattr(ours.blocks[0].mlp, "_epd_padded")
    assert ours.blocks[0].mlp.down_proj.weight.is_contiguous()


def test_rope_qk_matches_transformers_rotary():
    pytest.importorskip("triton")
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    g = torch.Generator().manual_seed(2)
    t, h, d = 7, 3, 40
    qkv = torch.randn(t, 3 * h, d, generator=g).to(DEVICE)
    cos, sin = torch.randn(2, t, d, generator=g).to(DEVICE).unbind(0)
    q, k = qkv.view(t, 3, h, d)[:, 0], qkv.view(t, 3, h, d)[:, 1]
    want_q, want_k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    v = qkv[:, 2 * h:].clone()
    fast.rope_qk_(qkv[:, :2 * h], cos, sin)
    tol = dict(atol=1e-6, rtol=1e-6) if DEVICE.type == "cuda" else dict(atol=0, rtol=0)  # GPU: fused multiply-adds
    torch.testing.assert_close(qkv[:, :h], want_q, **tol)
    torch.testing.assert_close(qkv[:, h:2 * h], want_k, **tol)
    assert torch.equal(qkv[:, 2 * h:], v)  # v untouched


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_7b_shapes_on_cuda():
    """The 7B block shapes (hidden 1280, 16 heads of 80, intermediate 3420) in bf16, 4 blocks with
    full attention in 1 and 3: the fast tower is as close to an fp32 run as transformers' bf16 tower."""
    cfg = tower_config(depth=4, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                       window_size=112, fullatt_block_indexes=[1, 3])
    ref32, ours = two_towers(cfg)
    ref16, ours = copy.deepcopy(ref32).to(torch.bfloat16), ours.to(torch.bfloat16)
    vision.use_varlen_attention(ref16, "reference", blocks="reference")
    vision.use_varlen_attention(ours, "sdpa", blocks="fast")
    pixels, grid = inputs([[1, 96, 96], [1, 36, 52], [1, 20, 20]])
    want = run(ref32, pixels, grid).float()
    theirs = run(ref16, pixels.bfloat16(), grid).float()
    got = run(ours, pixels.bfloat16(), grid).float()
    err_theirs = ((theirs - want).norm() / want.norm()).item()
    err_ours = ((got - want).norm() / want.norm()).item()
    assert err_ours < max(1.5 * err_theirs, 1e-2), (err_ours, err_theirs)
    assert ours.blocks[0].mlp._epd_padded.down.shape == (1280, 3456)


@pytest.mark.parametrize("attn", ["sdpa", "triton"])
def test_engine_greedy_with_fast_blocks(tiny_models, test_images, attn):
    """The whole engine with the fast blocks forced on (CPU): greedy ids == transformers'."""
    import numpy as np
    from PIL import Image

    from tests.conftest import make_llm
    from tests.test_engine_equality import GREEDY, chat_cases, our_prompt, references

    pytest.importorskip("triton")
    d = tiny_models("qwen2_5_vl")
    llm = make_llm(d, enable_prefix_caching=False)
    assert vision.use_varlen_attention(llm.engine.runner.model, attn, blocks="fast") > 0
    rng = np.random.default_rng(7)  # larger images: several windows each, edge windows too
    big = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((200, 150), (170, 230))]
    cases = chat_cases("qwen2_5_vl", big + list(test_images))
    got = [o.outputs[0].token_ids for o in llm.generate([our_prompt(llm, *c) for c in cases], GREEDY)]
    assert got == references(d, cases)
    assert llm.engine.runner.model.visual.blocks[0].mlp._epd_padded is not None
