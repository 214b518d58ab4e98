"""Triton kernels for attention over the paged KV cache, and their launchers.

The cache of one layer is ``[num_blocks, page, kv_heads, head_dim]`` (see
``backend.py``); a token's K (or V) for one kv head is ``head_dim``
contiguous values at ``slot * kv_heads * head_dim + kv_head * head_dim``.

- ``write_kv``: one program per new token stores its K and V rows at its slot
  (a negative slot is a padding row of a CUDA-graph batch and is skipped).
- ``decode_attention``: one query token per sequence. A program takes one
  (sequence, kv head, split) and all the query heads that share the kv head
  (GQA: the group is the M side of the dot, padded to 16), walks its split of
  the context through the block table, and leaves a partial output and its
  log-sum-exp; a second kernel merges the splits (flash-decoding). Split
  bounds are computed in the kernel from the device context length, so the
  launch does not depend on host lengths and can be captured in a CUDA graph.
- ``extend_attention``: prefill chunks of a flat varlen batch. A program takes
  one (query tile, head); keys come from the cache (the chunk's own K/V are
  written before attention), first the part every query of the tile sees in
  full (no mask), then the diagonal part with the causal mask. A cached or
  already computed prefix is simply more of the first part.

Accumulation is fp32; for fp32 inputs the dots run in IEEE fp32 (not tf32) so
fp32 results stay close enough to the reference for greedy equality.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


def _interpreter_compat() -> None:
    """Under ``TRITON_INTERPRET=1``: let loop bounds loaded from memory work with numpy 2.

    Triton 3.6's interpreter holds a scalar as a one-element array and turns it into a
    Python int with ``int(array)``, which numpy 2 refuses for arrays of one dimension;
    ``range(start, end)`` with a loaded ``end`` then fails. Patch that one conversion.
    """
    from triton.runtime import interpreter

    if getattr(interpreter, "_epd_patched", False):
        return
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
    interpreter._epd_patched = True


if triton.knobs.runtime.interpret:
    _interpreter_compat()


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, k_cache, v_cache, slots, stride_kt, stride_vt,
                     ROW: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slots + t).to(tl.int64)
    if slot >= 0:
        offs = tl.arange(0, BLOCK)
        mask = offs < ROW
        k = tl.load(k_ptr + t * stride_kt + offs, mask=mask)
        v = tl.load(v_ptr + t * stride_vt + offs, mask=mask)
        tl.store(k_cache + slot * ROW + offs, k.to(k_cache.dtype.element_ty), mask=mask)
        tl.store(v_cache + slot * ROW + offs, v.to(v_cache.dtype.element_ty), mask=mask)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slots: torch.Tensor) -> None:
    """``k``/``v``: [T, kv_heads, head_dim], rows contiguous; ``slots``: [T] (negative: skip)."""
    t = k.shape[0]
    if t == 0:
        return
    k, v = k.reshape(t, -1), v.reshape(t, -1)
    if k.stride(1) != 1:
        k = k.contiguous()
    if v.stride(1) != 1:
        v = v.contiguous()
    row = k.shape[1]
    _write_kv_kernel[(t,)](k, v, k_cache, v_cache, slots, k.stride(0), v.stride(0),
                           ROW=row, BLOCK=triton.next_power_of_2(row), num_warps=4 if row >= 512 else 1)


@triton.jit
def _decode_split_kernel(q_ptr, out_ptr, k_cache, v_cache, block_tables, ctx_lens, part_o, part_lse,
                         qk_scale, stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
                         KVH: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr,
                         BLOCK_D: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
                         NUM_SPLITS: tl.constexpr, IEEE: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.program_id(2)
    ctx = tl.load(ctx_lens + b)
    chunk = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = s * chunk
    end = tl.minimum(start + chunk, ctx)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kvh * G + g
    gmask = g < G
    dmask = d < D
    q = tl.load(q_ptr + b * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    row = KVH * D
    for n0 in range(start, end, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        nmask = offs < end
        page = tl.load(block_tables + b * stride_bt + offs // PAGE, mask=nmask, other=0).to(tl.int64)
        kv_off = (page * PAGE + offs % PAGE)[:, None] * row + kvh * D + d[None, :]
        kvmask = nmask[:, None] & dmask[None, :]
        k = tl.load(k_cache + kv_off, mask=kvmask, other=0.0)
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        qk = tl.where(nmask[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache + kv_off, mask=kvmask, other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    omask = gmask[:, None] & dmask[None, :]
    if NUM_SPLITS == 1:
        o = acc / tl.maximum(l_i, 1e-30)[:, None]
        tl.store(out_ptr + b * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=omask)
    else:
        o = acc / tl.maximum(l_i, 1e-30)[:, None]
        # part_o: [B, H, NUM_SPLITS, BLOCK_D]; part_lse: [B, H, NUM_SPLITS] (log2 units)
        base = (b * (KVH * G) + heads) * NUM_SPLITS + s
        tl.store(part_o + base[:, None] * BLOCK_D + d[None, :], o, mask=omask)
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.maximum(l_i, 1e-30)), float("-inf"))
        tl.store(part_lse + base, lse, mask=gmask)


@triton.jit
def _decode_merge_kernel(out_ptr, part_o, part_lse, stride_ot, stride_oh, H: tl.constexpr,
                         D: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr,
                         BLOCK_S: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    smask = s < NUM_SPLITS
    base = (b * H + h) * NUM_SPLITS
    lse = tl.load(part_lse + base + s, mask=smask, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # an empty row (padding): output zeros, not NaN
    w = tl.exp2(lse - m)
    o = tl.load(part_o + (base + s)[:, None] * BLOCK_D + d[None, :], mask=smask[:, None], other=0.0)
    acc = tl.sum(o * w[:, None], 0) / tl.maximum(tl.sum(w, 0), 1e-30)
    tl.store(out_ptr + b * stride_ot + h * stride_oh + d, acc.to(out_ptr.dtype.element_ty), mask=d < D)


def decode_splits(batch: int, kv_heads: int, num_sms: int) -> int:
    """Splits of the context per (sequence, kv head) so that the grid fills the GPU about twice."""
    want = -(-2 * num_sms // max(1, batch * kv_heads))
    return max(1, min(64, triton.next_power_of_2(want) if want > 1 else 1))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, ctx_lens: torch.Tensor, scale: float,
                     num_splits: int, out: torch.Tensor | None = None,
                     workspace: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``q``: [B, H, D] (one token per sequence) -> [B, H, D].

    ``block_tables``: [>=B, W] int32; ``ctx_lens``: [>=B] int32 (0: padding row, output 0).
    ``workspace``: preallocated (part_o, part_lse) for ``num_splits > 1`` (CUDA graphs).
    """
    b, h, d = q.shape
    kvh, page = k_cache.shape[2], k_cache.shape[1]
    g = h // kvh
    out = torch.empty_like(q) if out is None else out
    if b == 0:
        return out
    block_d = triton.next_power_of_2(d)
    ieee = q.dtype == torch.float32
    block_n = 32 if ieee else 64
    if num_splits > 1:
        if workspace is None:
            part_o = torch.empty(b, h, num_splits, block_d, dtype=torch.float32, device=q.device)
            part_lse = torch.empty(b, h, num_splits, dtype=torch.float32, device=q.device)
        else:
            part_o, part_lse = workspace
    else:
        part_o = part_lse = out  # unused
    _decode_split_kernel[(b, kvh, num_splits)](
        q, out, k_cache, v_cache, block_tables, ctx_lens, part_o, part_lse, scale * _LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        KVH=kvh, G=g, BLOCK_G=max(16, triton.next_power_of_2(g)), D=d, BLOCK_D=block_d, PAGE=page,
        BLOCK_N=block_n, NUM_SPLITS=num_splits, IEEE=ieee, num_warps=4, num_stages=2)
    if num_splits > 1:
        _decode_merge_kernel[(b, h)](out, part_o, part_lse, out.stride(0), out.stride(1), H=h, D=d,
                                     BLOCK_D=block_d, NUM_SPLITS=num_splits,
                                     BLOCK_S=max(2, triton.next_power_of_2(num_splits)), num_warps=4)
    return out


@triton.jit
def _attend_tile(acc, m_i, l_i, q, k_cache, v_cache, bt_row, kv_col, q_pos, lo, hi,
                 qk_scale, row, d, dmask, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
                 MASKED: tl.constexpr, IEEE: tl.constexpr):
    for n0 in range(lo, hi, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        if MASKED:
            nmask = offs < hi
            page = tl.load(bt_row + offs // PAGE, mask=nmask, other=0).to(tl.int64)
        else:
            nmask = offs < hi
            page = tl.load(bt_row + offs // PAGE).to(tl.int64)
        kv_off = (page * PAGE + offs % PAGE)[:, None] * row + kv_col + d[None, :]
        if MASKED:
            k = tl.load(k_cache + kv_off, mask=nmask[:, None] & dmask[None, :], other=0.0)
        else:
            k = tl.load(k_cache + kv_off, mask=dmask[None, :], other=0.0)
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        else:
            qk = tl.dot(q, tl.trans(k)) * qk_scale
        if MASKED:
            qk = tl.where((offs[None, :] <= q_pos[:, None]) & nmask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_cache + kv_off, mask=nmask[:, None] & dmask[None, :], other=0.0)
        else:
            v = tl.load(v_cache + kv_off, mask=dmask[None, :], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _extend_kernel(q_ptr, out_ptr, k_cache, v_cache, block_tables, q_starts, ctx_lens, tile_seq, tile_m,
                   qk_scale, stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
                   KVH: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                   PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    h = tl.program_id(0)
    tile = tl.program_id(1)
    i = tl.load(tile_seq + tile)
    mt = tl.load(tile_m + tile)
    qs = tl.load(q_starts + i)
    ql = tl.load(q_starts + i + 1) - qs
    ctx = tl.load(ctx_lens + i)
    prefix = ctx - ql
    rows = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < ql
    q_pos = prefix + rows
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q = tl.load(q_ptr + (qs + rows)[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)
    kvh = h // G
    bt_row = block_tables + i.to(tl.int64) * stride_bt
    row = KVH * D
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    first = prefix + mt * BLOCK_M  # every query of the tile sees keys [0, first)
    full = (first // BLOCK_N) * BLOCK_N
    last = prefix + tl.minimum((mt + 1) * BLOCK_M, ql)  # one past the tile's last query position
    acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_cache, v_cache, bt_row, kvh * D, q_pos, 0, full,
                                 qk_scale, row, d, dmask, PAGE, BLOCK_N, False, IEEE)
    acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_cache, v_cache, bt_row, kvh * D, q_pos, full, last,
                                 qk_scale, row, d, dmask, PAGE, BLOCK_N, True, IEEE)
    o = acc / tl.maximum(l_i, 1e-30)[:, None]
    tl.store(out_ptr + (qs + rows)[:, None] * stride_ot + h * stride_oh + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])


def extend_tiles(dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the extend kernel."""
    if dtype == torch.float32:
        return 32, 32, 4, 2
    return 128, 64, 8, 3


def extend_attention(q: torch.Tensor, out: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, q_starts: torch.Tensor, ctx_lens: torch.Tensor,
                     tile_seq: torch.Tensor, tile_m: torch.Tensor, num_tiles: int, scale: float) -> None:
    """Causal attention of prefill chunks over the cache, written into ``out`` ([T, H, D]).

    ``q_starts``: [S+1] int32 row offsets of the sequences in ``q``/``out``;
    ``ctx_lens``: [S] their context lengths (new tokens included, already in
    the cache); ``tile_seq``/``tile_m``: for each of ``num_tiles`` query tiles
    of ``extend_tiles(q.dtype)[0]`` rows, its sequence and tile index.
    """
    if num_tiles == 0:
        return
    _, h, d = q.shape
    kvh, page = k_cache.shape[2], k_cache.shape[1]
    block_m, block_n, warps, stages = extend_tiles(q.dtype)
    _extend_kernel[(h, num_tiles)](
        q, out, k_cache, v_cache, block_tables, q_starts, ctx_lens, tile_seq, tile_m, scale * _LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        KVH=kvh, G=h // kvh, D=d, BLOCK_D=triton.next_power_of_2(d), PAGE=page, BLOCK_M=block_m,
        BLOCK_N=block_n, IEEE=q.dtype == torch.float32, num_warps=warps, num_stages=stages)
