"""Triton varlen attention for the vision towers: full (non-causal) attention within segments.

``q``/``k``/``v`` are ``[T, H, D]`` (any strides with unit stride on D); segment
``i`` is rows ``cu[i]:cu[i+1]`` and attends only to itself. One program takes one
(query tile, segment, head) and walks the segment's keys with an online softmax
(flash attention), so all windows or images of a layer go in one launch with no
padding to a dense mask. Tiles past a segment's end do nothing: the grid is sized
by the longest segment, and a layer's segments are near-equal (windows of one
size, or whole images).

Accumulation is fp32; for fp32 inputs the dots run in IEEE fp32 (not tf32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from stages.attention import triton_kernels

_LOG2E = 1.4426950408889634

if triton.knobs.runtime.interpret:
    triton_kernels._interpreter_compat()  # loop bounds loaded from memory under numpy 2


@triton.jit
def _varlen_kernel(q_ptr, k_ptr, v_ptr, o_ptr, cu, qk_scale,
                   sqt, sqh, skt, skh, svt, svh, sot, soh,
                   D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   IEEE: tl.constexpr):
    mt = tl.program_id(0)
    seg = tl.program_id(1)
    h = tl.program_id(2)
    start = tl.load(cu + seg).to(tl.int64)
    length = (tl.load(cu + seg + 1) - tl.load(cu + seg)).to(tl.int32)
    if mt * BLOCK_M < length:
        rows = mt * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < length
        d = tl.arange(0, BLOCK_D)
        dmask = d < D
        q = tl.load(q_ptr + (start + rows)[:, None] * sqt + h * sqh + d[None, :],
                    mask=rmask[:, None] & dmask[None, :], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for n0 in range(0, length, BLOCK_N):
            offs = n0 + tl.arange(0, BLOCK_N)
            nmask = offs < length
            kv_mask = nmask[:, None] & dmask[None, :]
            k = tl.load(k_ptr + (start + offs)[:, None] * skt + h * skh + d[None, :], mask=kv_mask, other=0.0)
            if IEEE:
                qk = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
            else:
                qk = tl.dot(q, tl.trans(k)) * qk_scale
            qk = tl.where(nmask[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.exp2(qk - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + (start + offs)[:, None] * svt + h * svh + d[None, :], mask=kv_mask, other=0.0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        o = acc / tl.maximum(l_i, 1e-30)[:, None]
        tl.store(o_ptr + (start + rows)[:, None] * sot + h * soh + d[None, :],
                 o.to(o_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])


def _tiles(dtype: torch.dtype, max_len: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): small tiles when the segments are small windows."""
    if dtype == torch.float32:
        return 32, 32, 4, 2
    if max_len <= 64:
        return 64, 64, 4, 2
    return 128, 64, 8, 3


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_len: int, scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of each segment of ``cu_seqlens`` ([S+1], on q's device) with itself -> [T, H, D]."""
    t, h, d = q.shape
    out = torch.empty(t, h, d, dtype=q.dtype, device=q.device) if out is None else out
    segs = cu_seqlens.numel() - 1
    if t == 0 or segs == 0 or max_len == 0:
        return out
    block_m, block_n, warps, stages = _tiles(q.dtype, max_len)
    cu = cu_seqlens.to(torch.int32)
    grid = (triton.cdiv(max_len, block_m), segs, h)
    _varlen_kernel[grid](q, k, v, out, cu, scale * _LOG2E,
                         q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                         out.stride(0), out.stride(1),
                         D=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_M=block_m, BLOCK_N=block_n,
                         IEEE=q.dtype == torch.float32, num_warps=warps, num_stages=stages)
    return out
