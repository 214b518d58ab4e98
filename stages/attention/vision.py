"""Varlen attention for the Qwen2.5-VL vision tower on GPU, all windows or images at once.

transformers' tower without flash-attn runs one SDPA call per segment: for four
1344x1344 images that is 576 windows in each of 28 window layers, ~16k small
launches plus their splits and concatenations, and the GPU idles between them.
Here a layer's segments go through one of:

- ``"sdpa"``: segments grouped by length; each group is one batched SDPA call
  (flash) over ``[n, H, L, D]`` — a plain view when the group is every row of
  the layer, else gathered by index and scattered back. Windows come in a few
  sizes (edge windows are smaller), images in one per resolution.
- ``"triton"``: one launch of our varlen kernel (``vision_triton.py``).
- ``"reference"``: transformers' own forward (the CPU default: exact).

Host lengths (one sync) are computed once per ``cu_seqlens`` tensor: the tower
passes the same tensor to every layer of a kind, so a forward syncs twice.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

IMPLS = ("auto", "reference", "sdpa", "triton")
# perf/bench_vision.py on one H200, 7B tower in bf16, 4 x 1344x1344 images (36,864 patches):
# "sdpa" 0.291 s, "triton" 0.302 s, transformers' 0.83 s. PyTorch's flash kernel takes head_dim 80
# as is, where ours pads it to 128 (3/8 of the dot work wasted).
CUDA_DEFAULT = "sdpa"


def resolve_impl(impl: str, is_cuda: bool) -> str:
    """``"auto"`` -> ``CUDA_DEFAULT`` on CUDA, ``"reference"`` elsewhere; others as given."""
    if impl == "auto":
        return CUDA_DEFAULT if is_cuda else "reference"
    return impl


def rotary_cos_sin(kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The (cos, sin) [T, D] a vision attention gets: ``position_embeddings``, or older
    transformers' ``rotary_pos_emb`` angles [T, D / 2]."""
    cos_sin = kwargs.get("position_embeddings")
    if cos_sin is None:
        emb = torch.cat((kwargs["rotary_pos_emb"],) * 2, dim=-1)
        cos_sin = emb.cos(), emb.sin()
    return cos_sin


def _host_lengths(cu_seqlens: torch.Tensor) -> list[int]:
    cached = getattr(cu_seqlens, "_epd_lengths", None)
    if cached is None:
        cached = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        cu_seqlens._epd_lengths = cached  # lives exactly as long as this tensor
    return cached


def grouped_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """``q``/``k``/``v``: [T, H, D] -> [T, H, D], each segment attending only to itself."""
    t, h, d = q.shape
    lengths = _host_lengths(cu_seqlens)
    groups: dict[int, list[int]] = {}
    start = 0
    for n in lengths:
        if n:
            groups.setdefault(n, []).append(start)
        start += n
    if len(groups) == 1:  # one length covers every row: a view, no gather
        (n, starts), = groups.items()
        b = len(starts)
        qs, ks, vs = (x.view(b, n, h, d).transpose(1, 2) for x in (q, k, v))
        return F.scaled_dot_product_attention(qs, ks, vs, scale=scale).transpose(1, 2).reshape(t, h, d)
    out = torch.empty(t, h, d, dtype=q.dtype, device=q.device)
    for n, starts in groups.items():
        b = len(starts)
        idx = (torch.tensor(starts)[:, None] + torch.arange(n)).flatten().to(q.device, non_blocking=True)
        qs, ks, vs = (x.index_select(0, idx).view(b, n, h, d).transpose(1, 2) for x in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)
        out.index_copy_(0, idx, o.transpose(1, 2).reshape(b * n, h, d))
    return out


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     scale: float, impl: str) -> torch.Tensor:
    """[T, H, D] -> [T, H, D] with ``impl`` one of ``"sdpa"``, ``"triton"``."""
    if impl == "sdpa":
        return grouped_sdpa(q, k, v, cu_seqlens, scale)
    if impl == "triton":
        from stages.attention.vision_triton import varlen_attention as triton_varlen

        return triton_varlen(q, k, v, cu_seqlens, max(_host_lengths(cu_seqlens), default=0), scale)
    raise ValueError(f"unknown vision attention impl {impl!r}")


def _qwen_forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Drop-in for ``Qwen2_5_VLVisionAttention.forward`` (same qkv/proj weights and rotary)."""
    impl = resolve_impl(self._epd_impl, hidden_states.is_cuda)
    if impl == "reference" or args:
        return type(self).forward(self, hidden_states, cu_seqlens, *args, **kwargs)
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    t = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(t, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, *rotary_cos_sin(kwargs))
    out = varlen_attention(q, k, v, cu_seqlens, self.scaling, impl)
    return self.proj(out.reshape(t, -1))


def use_varlen_attention(tower: torch.nn.Module, impl: str = "auto", blocks: str = "auto") -> int:
    """Route every vision attention module of ``tower`` through ``impl``; returns how many.

    ``"auto"``: transformers' forward on CPU (exact), ``CUDA_DEFAULT`` on CUDA. ``blocks``: the
    Qwen2.5-VL blocks' forward (``stages/models/qwen_vision_fast.py``: ``"auto"`` is its fast
    one on CUDA, transformers' on CPU; ``"fast"``, ``"reference"``).
    Module names and weight values are untouched (checkpoints load as before).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    from stages.models.qwen_vision_fast import use_fast_blocks

    use_fast_blocks(tower, blocks)
    count = 0
    for module in tower.modules():
        if type(module).__name__ == "Qwen2_5_VLVisionAttention":
            module._epd_impl = impl
            module.forward = types.MethodType(_qwen_forward, module)
            count += 1
    return count
