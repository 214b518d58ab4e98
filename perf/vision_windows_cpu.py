"""CPU check of the vision tower's varlen attention at the 7B tower's window geometry.

Four 1344x1344 images (4 x 9,216 patches, 576 windows of 64) through 28 window layers (the
7B's count), narrowed to one head of 80 and a small MLP so the per-call cost shows on a CPU;
fp32. Counts ``scaled_dot_product_attention`` calls per forward and times transformers' tower
against the same module with our grouped attention (alternating, twice each), with the
relative difference of the outputs.

    python -m perf.vision_windows_cpu
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from stages.attention import vision


def main() -> None:
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    torch.manual_seed(0)
    cfg = Qwen2_5_VLVisionConfig(depth=28, hidden_size=80, intermediate_size=96, num_heads=1, out_hidden_size=64,
                                 window_size=112, fullatt_block_indexes=[])
    cfg._attn_implementation = "sdpa"
    tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(cfg, torch_dtype=torch.float32).eval()
    grid = torch.tensor([[1, 96, 96]] * 4)
    x = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14)
    calls = [0]
    sdpa = F.scaled_dot_product_attention

    def counted(*a, **k):
        calls[0] += 1
        return sdpa(*a, **k)

    F.scaled_dot_product_attention = counted  # transformers and ours both call it through F
    ref = None
    for impl in ("reference", "sdpa", "reference", "sdpa"):
        vision.use_varlen_attention(tower, impl)
        calls[0] = 0
        with torch.no_grad():
            t = time.perf_counter()
            out = tower(x, grid_thw=grid).pooler_output
            s = time.perf_counter() - t
        ref = out if ref is None else ref
        print(f"{impl:9s}: {s:.2f} s, {calls[0]} SDPA calls, rel. diff vs transformers "
              f"{((out - ref).norm() / ref.norm()).item():.1e}", flush=True)


if __name__ == "__main__":
    main()
