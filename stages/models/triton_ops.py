"""Fused Triton kernels for the decoder's small ops on the GPU fast path (bf16/fp16).

Each replaces a chain of torch ops (one kernel each) with one kernel and rounds where
torch rounds, so results equal the torch ops' in bf16 up to the fp32 reduction order:

- ``add_rmsnorm``: ``x + delta`` (the residual, rounded to the input dtype), then Hugging
  Face's RMSNorm: ``weight * (h * rsqrt(mean(h^2) + eps)).to(dtype)`` with ``h`` in fp32.
- ``rope_``: rotate-half rotary embedding of q and k in place: ``x * cos + rotate_half(x) * sin``
  with each product and the sum rounded as torch does.
- ``silu_mul``: ``silu(gate) * up`` from the fused gate/up projection's output.

The fp32 path never uses them: there the model keeps transformers' exact op sequence.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from stages.attention import triton_kernels  # noqa: F401  (interpreter compatibility patch)


@triton.jit
def _rmsnorm_kernel(x_ptr, delta_ptr, sum_ptr, out_ptr, w_ptr, eps, stride_x, stride_d, stride_s, stride_o,
                    N: tl.constexpr, BLOCK: tl.constexpr, HAS_DELTA: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_DELTA:
        x = (x.to(tl.float32) + tl.load(delta_ptr + row * stride_d + offs, mask=mask, other=0.0).to(tl.float32))
        x = x.to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_s + offs, x, mask=mask)
    h = x.to(tl.float32)
    var = tl.sum(h * h, 0) / N
    h = (h * tl.math.rsqrt(var + eps)).to(out_ptr.dtype.element_ty)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_o + offs, (w.to(tl.float32) * h.to(tl.float32)).to(out_ptr.dtype.element_ty),
             mask=mask)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float,
            delta: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of ``x`` ([T, N]); with ``delta``: returns (x + delta, rmsnorm(x + delta))."""
    t, n = x.shape
    out = torch.empty_like(x)
    total = torch.empty_like(x) if delta is not None else out
    if t:
        _rmsnorm_kernel[(t,)](x, delta if delta is not None else x, total, out, weight, eps, x.stride(0),
                              (delta if delta is not None else x).stride(0), total.stride(0), out.stride(0),
                              N=n, BLOCK=triton.next_power_of_2(n), HAS_DELTA=delta is not None,
                              num_warps=8 if n >= 2048 else 4)
    return (total, out) if delta is not None else out


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, stride_t, stride_h, stride_c, H: tl.constexpr,
                 HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK)
    hm = h < H
    dm = d < HALF
    m = hm[:, None] & dm[None, :]
    base = x_ptr + t * stride_t + h[:, None] * stride_h + d[None, :]
    x1 = tl.load(base, mask=m, other=0.0)
    x2 = tl.load(base + HALF, mask=m, other=0.0)
    c1 = tl.load(cos_ptr + t * stride_c + d, mask=dm, other=0.0)[None, :]
    c2 = tl.load(cos_ptr + t * stride_c + HALF + d, mask=dm, other=0.0)[None, :]
    s1 = tl.load(sin_ptr + t * stride_c + d, mask=dm, other=0.0)[None, :]
    s2 = tl.load(sin_ptr + t * stride_c + HALF + d, mask=dm, other=0.0)[None, :]
    ty = x1.dtype
    # torch: x * cos + cat(-x2, x1) * sin, each product and the sum rounded to the dtype
    o1 = ((x1 * c1).to(ty).to(tl.float32) + (-x2 * s1).to(ty).to(tl.float32)).to(ty)
    o2 = ((x2 * c2).to(ty).to(tl.float32) + (x1 * s2).to(ty).to(tl.float32)).to(ty)
    tl.store(base, o1, mask=m)
    tl.store(base + HALF, o2, mask=m)


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """In place on ``x`` ([T, heads, D], last dim contiguous); ``cos``/``sin``: [T, D]."""
    t, h, d = x.shape
    if t:
        _rope_kernel[(t,)](x, cos, sin, x.stride(0), x.stride(1), cos.stride(0), H=h, HALF=d // 2,
                           BLOCK_H=triton.next_power_of_2(h), BLOCK=triton.next_power_of_2(d // 2),
                           num_warps=4)
    return x


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, stride_g, stride_o, N: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = col < N
    g = tl.load(gu_ptr + row * stride_g + col, mask=mask, other=0.0)
    u = tl.load(gu_ptr + row * stride_g + N + col, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
    tl.store(out_ptr + row * stride_o + col, (act.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``gate_up``: [T, 2N] (gate then up) -> silu(gate) * up, [T, N]."""
    t, n2 = gate_up.shape
    n = n2 // 2
    out = torch.empty(t, n, dtype=gate_up.dtype, device=gate_up.device)
    if t:
        block = 1024
        _silu_mul_kernel[(t, triton.cdiv(n, block))](gate_up, out, gate_up.stride(0), out.stride(0), N=n,
                                                     BLOCK=block, num_warps=4)
    return out
