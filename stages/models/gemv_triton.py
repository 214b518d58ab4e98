"""Skinny matmuls of decode steps: ``y[M, N] = x[M, K] @ W[N, K]^T (+ bias)`` for M <= 16.

At batch 1..16 a linear layer reads its whole weight to do almost no arithmetic, so its time
is the weight's bytes over the memory bandwidth. A program owns ``BLOCK_N`` rows of W and
streams them along K in ``BLOCK_K`` chunks (16-byte loads, coalesced along K); the few rows of
x are reused from registers/L1. Two inner products:

- FMA (``dot=False``, M <= 4): products in fp32 registers, reduced along K once at the end;
- tensor cores (``dot=True``): ``tl.dot(W_tile, x_tile^T)`` with x padded to 16 rows: W is the
  wide operand, so the loads are pipelined through shared memory.

When N gives few tiles (the down projection: N = 3584, K = 18944) the K range is also split
over a grid axis; each split writes fp32 partials and a second kernel sums them in a fixed
order (deterministic), adds the bias and rounds to x's dtype.

``pick_config`` times a few candidates per (M bucket, N, K, dtype) against
``torch.nn.functional.linear`` inside CUDA graphs (as decode runs them) and caches the winner,
or None when cuBLAS is as fast: ``linear`` then falls back to it, so enabling the kernel cannot
make a step slower. ``linear`` never times or compiles on its own: call ``prepare_decode_gemv``
before capturing decode graphs. Launches allocate only their outputs (and split-K partials)
with ``torch.empty``, so they can be captured.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from stages.attention import triton_kernels  # noqa: F401  (interpreter compatibility patch)

log = logging.getLogger(__name__)

MAX_ROWS = 16
_FMA_MAX_ROWS = 4
_CUBLAS_MARGIN = 0.03  # a kernel must beat cuBLAS by this fraction (timing noise) to be used


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 1
    dot: bool = False
    prefetch: bool = False  # FMA: load the next W chunk before the products of this one

    def fits(self, bucket: int) -> bool:
        if self.dot:
            return True
        # FMA keeps bucket x BLOCK_N x BLOCK_K fp32 products live: at most 64 registers a thread
        return bucket <= _FMA_MAX_ROWS and bucket * self.block_n * self.block_k <= 64 * 32 * self.num_warps


def _fma(bn, bk, split=1, warps=4, prefetch=False):
    return GemvConfig(bn, bk, split, warps, 1, False, prefetch)


def _dot(bn, bk, split=1, warps=4, stages=4):
    return GemvConfig(bn, bk, split, warps, stages, True)


# Candidates per shape class (H200, 132 SMs), the FMA ones first. "wide": many output tiles
# (gate-up 37888, lm_head 152064); "deep": K >> N, few tiles (down 18944 -> 3584): split-K;
# "square": the rest (qkv 3584 -> 4608, o 3584 -> 3584). Triton pipelines only loads that
# feed a dot, so the FMA loop's bytes in flight come from occupancy (and ``prefetch``: one
# chunk ahead in registers, where the splits divide K evenly); the dot path streams W through
# shared memory ``num_stages`` chunks ahead (cp.async; wgmma from BLOCK_N 64).
CONFIGS: dict[str, list[GemvConfig]] = {
    "wide": [_fma(8, 512), _fma(16, 512), _fma(4, 1024), _fma(16, 512, warps=8), _fma(2, 1024), _fma(4, 512),
             _fma(8, 512, prefetch=True), _fma(4, 512, prefetch=True), _fma(16, 256, prefetch=True),
             _dot(64, 128), _dot(32, 128), _dot(64, 256, stages=3), _dot(128, 128, stages=3), _dot(16, 256),
             _dot(128, 64), _dot(64, 128, stages=6), _dot(32, 256)],
    "square": [_fma(4, 512), _fma(8, 512), _fma(4, 1024), _fma(8, 256, 2), _fma(2, 1024), _fma(2, 256, 2),
               _fma(4, 512, prefetch=True), _fma(8, 256, 2, prefetch=True), _fma(2, 512, prefetch=True),
               _dot(16, 256), _dot(32, 128, 2), _dot(16, 128, 2), _dot(64, 128, 4), _dot(32, 256, stages=3),
               _dot(16, 256, 2), _dot(16, 128, 4), _dot(32, 128, 4)],
    "deep": [_fma(8, 512), _fma(4, 512), _fma(8, 256, 2), _fma(8, 128, 4), _fma(4, 256, 2), _fma(2, 1024, 2),
             _fma(8, 512, prefetch=True), _fma(4, 256, 2, prefetch=True), _fma(8, 128, 4, prefetch=True),
             _dot(32, 128, 4), _dot(64, 128, 4), _dot(16, 256, 2), _dot(64, 128, 8), _dot(32, 256, 2, stages=3),
             _dot(16, 256, 4), _dot(32, 128, 8), _dot(16, 128, 8)],
}


def shape_class(n: int, k: int) -> str:
    if n >= 16384:
        return "wide"
    return "deep" if k >= 3 * n else "square"


def m_bucket(m: int) -> int:
    """1, 2, 4, 8 or 16: the row count a config is picked for."""
    return 1 << max(0, m - 1).bit_length()


def candidates(m: int, n: int, k: int) -> list[GemvConfig]:
    bucket = m_bucket(m)
    table = CONFIGS[shape_class(n, k)]
    return [c for c in table if c.fits(bucket)]


@triton.jit
def _mac(acc, w, x, BLOCK_M: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr):
    """acc + the products of one K chunk: w [BLOCK_N, BLOCK_K], x [BLOCK_M, BLOCK_K]."""
    if USE_DOT:
        if IEEE:
            acc = tl.dot(w, tl.trans(x), acc, input_precision="ieee")
        else:
            acc = tl.dot(w, tl.trans(x), acc)
    elif BLOCK_M == 1:
        acc += w.to(tl.float32) * x.to(tl.float32)
    else:
        acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    return acc


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, k_per_split,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                 EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr,
                 PREFETCH: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ms = tl.arange(0, BLOCK_M)
    ks = tl.arange(0, BLOCK_K)
    # Clamped indices keep the loads in bounds without masks (and vectorised); the extra rows
    # and columns are computed from duplicates and dropped at the store.
    rows_c = tl.minimum(rows, N - 1).to(tl.int64)
    ms_c = tl.minimum(ms, M - 1)
    k_lo = pid_k * k_per_split
    w_ptrs = w_ptr + rows_c[:, None] * stride_wn + (k_lo + ks)[None, :]
    x_ptrs = x_ptr + ms_c[:, None] * stride_xm + (k_lo + ks)[None, :]
    if USE_DOT:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    elif BLOCK_M == 1:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    if PREFETCH:  # EVEN_K only: the next chunk's loads are in flight during this chunk's products
        w = tl.load(w_ptrs, eviction_policy="evict_first")
        x = tl.load(x_ptrs)
        for k0 in range(BLOCK_K, k_per_split, BLOCK_K):
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
            w_next = tl.load(w_ptrs, eviction_policy="evict_first")
            x_next = tl.load(x_ptrs)
            acc = _mac(acc, w, x, BLOCK_M, USE_DOT, IEEE)
            w = w_next
            x = x_next
        acc = _mac(acc, w, x, BLOCK_M, USE_DOT, IEEE)
    else:
        for k0 in range(0, k_per_split, BLOCK_K):
            if EVEN_K:
                w = tl.load(w_ptrs, eviction_policy="evict_first")  # streamed once: keep L2 for the rest
                x = tl.load(x_ptrs)
            else:
                kmask = (k_lo + k0 + ks) < K
                w = tl.load(w_ptrs, mask=kmask[None, :], other=0.0, eviction_policy="evict_first")
                x = tl.load(x_ptrs, mask=kmask[None, :], other=0.0)
            acc = _mac(acc, w, x, BLOCK_M, USE_DOT, IEEE)
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
    if USE_DOT:
        out = tl.trans(acc)
    elif BLOCK_M == 1:
        out = tl.sum(acc, axis=1)[None, :]
    else:
        out = tl.sum(acc, axis=2)
    mask = (ms[:, None] < M) & (rows[None, :] < N)
    offs = ms[:, None] * N + rows[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            out += tl.load(b_ptr + rows_c).to(tl.float32)[None, :]
        tl.store(y_ptr + offs, out.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(y_ptr + pid_k * M * N + offs, out, mask=mask)


@triton.jit
def _splitk_reduce_kernel(p_ptr, b_ptr, y_ptr, M, N, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr,
                          HAS_BIAS: tl.constexpr):
    m = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):  # a fixed order: the same bits every run
        acc += tl.load(p_ptr + (s * M + m) * N + cols, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * N + cols, acc.to(y_ptr.dtype.element_ty), mask=mask)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cfg: GemvConfig) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` with ``cfg``; x: [..., K] with at most 16 rows, weight: [N, K] with
    unit stride along K. fp32 accumulation, output in x's dtype."""
    n, k = weight.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    if weight.stride(1) != 1:
        raise ValueError("gemv needs a weight with unit stride along K")
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*lead, n)
    bucket = m_bucket(m)
    block_m = max(16, bucket) if cfg.dot else bucket
    chunk = triton.cdiv(triton.cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    split = triton.cdiv(k, chunk)  # splits that hold some of K
    even = chunk * split == k
    has_bias = bias is not None
    dst = y if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    _gemv_kernel[(triton.cdiv(n, cfg.block_n), split)](
        x2, weight, bias if has_bias else weight, dst, m, n, k, x2.stride(0), weight.stride(0), chunk,
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=split, EVEN_K=even,
        HAS_BIAS=has_bias, USE_DOT=cfg.dot, IEEE=x.dtype == torch.float32, PREFETCH=cfg.prefetch and even,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if split > 1:
        block = 1024
        _splitk_reduce_kernel[(triton.cdiv(n, block), m)](dst, bias if has_bias else dst, y, m, n, SPLIT_K=split,
                                                          BLOCK=block, HAS_BIAS=has_bias, num_warps=4)
    return y.reshape(*lead, n)


# (M bucket, N, K, dtype) -> the picked config, or None: cuBLAS.
_PICKED: dict[tuple, GemvConfig | None] = {}


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, through the kernel when a config was picked for the shape (CUDA, <= 16 rows)."""
    k = x.shape[-1]
    if x.is_cuda and k and weight.stride(-1) == 1 and x.dtype == weight.dtype:
        m = x.numel() // k
        if 1 <= m <= MAX_ROWS:
            cfg = _PICKED.get((m_bucket(m), weight.shape[0], k, x.dtype))
            if cfg is not None:
                return gemv(x, weight, bias, cfg)
    return F.linear(x, weight, bias)


def graph_time_us(fn, calls: int, warmup: int = 3, reps: int = 10) -> float:
    """Median GPU time per call (µs) of ``fn(i)`` for i < calls, captured in one CUDA graph."""
    dev = torch.cuda.current_stream().device
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):  # compiles and cuBLAS workspaces outside the capture
        for i in range(min(calls, 2)):
            fn(i)
    torch.cuda.current_stream(dev).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    for _ in range(warmup):
        graph.replay()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize(dev)
    times = sorted(s.elapsed_time(e) for s, e in events)
    del graph
    return times[len(times) // 2] * 1000.0 / calls


def _timing_weights(n: int, k: int, dtype, device, weights) -> list[torch.Tensor]:
    """Distinct weights of the shape, together several times L2 (50 MB on H200) so that no call
    finds its weight cached: the given ones (a model's layers), else random scratch ones."""
    weights = list(weights or [])
    need = max(1, math.ceil(256e6 / (n * k * torch.finfo(dtype).bits // 8)))
    while len(weights) < need:
        weights.append(torch.randn(n, k, device=device).to(dtype))
    return weights


@torch.no_grad()
def pick_config(m: int, n: int, k: int, dtype: torch.dtype, device, weights=None) -> GemvConfig | None:
    """The fastest candidate for (bucket of m, n, k, dtype) if it beats cuBLAS, else None; cached.

    Times CUDA graphs of calls cycling over ``weights`` (same-shaped tensors, e.g. every
    layer's; scratch ones are added up to 256 MB) so the timing reads from memory as decode does.
    """
    bucket = m_bucket(m)
    key = (bucket, n, k, dtype)
    if key in _PICKED:
        return _PICKED[key]
    device = torch.device(device)
    if device.type != "cuda" or not 1 <= m <= MAX_ROWS:
        return None
    with torch.cuda.device(device):
        ws = _timing_weights(n, k, dtype, device, weights)
        bytes_per_call = n * k * torch.finfo(dtype).bits // 8
        calls = min(64, max(4, len(ws), math.ceil(1e9 / bytes_per_call)))
        x = torch.randn(bucket, k, device=device).to(dtype)
        ref = F.linear(x, ws[0]).float()
        tol = 2e-2 * ref.abs().max().item() + 1e-3
        cublas_t = graph_time_us(lambda i: F.linear(x, ws[i % len(ws)]), calls)
        best, best_t = None, cublas_t * (1 - _CUBLAS_MARGIN)
        for cfg in candidates(bucket, n, k):
            try:  # a compile or launch that fails here fails on this first call, outside any capture
                err = (gemv(x, ws[0], None, cfg).float() - ref).abs().max().item()
                if not err <= tol:
                    raise ValueError(f"max |error| {err:.3g} vs F.linear")
                t = graph_time_us(lambda i, cfg=cfg: gemv(x, ws[i % len(ws)], None, cfg), calls)
            except Exception as e:
                log.warning("gemv candidate %s left out for %s: %s", cfg, key, e)
                continue
            if t < best_t:
                best, best_t = cfg, t
        log.info("gemv %s: cuBLAS %.1f us, %s", key, cublas_t,
                 f"picked {best} ({best_t:.1f} us)" if best else "no candidate beats it")
    _PICKED[key] = best
    return best


def decode_linear_weights(model) -> dict[tuple[int, int, torch.dtype], list[torch.Tensor]]:
    """(N, K, dtype) -> the language model's weights that go through ``layers.linear``: fused
    qkv and gate-up, o and down projections, lm_head (the vision tower's are left out)."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    seen: set[int] = set()
    for name, mod in model.named_modules():
        if "visual" in name or "vision" in name:
            continue
        ws = [getattr(mod, a, None) for a in ("qkv_weight", "gate_up_weight")]
        if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in ("o_proj", "down_proj", "lm_head"):
            ws.append(mod.weight)
        for w in ws:
            if isinstance(w, torch.Tensor) and w.dim() == 2 and w.data_ptr() not in seen:
                seen.add(w.data_ptr())
                groups.setdefault((w.shape[0], w.shape[1], w.dtype), []).append(w.detach())
    return groups


def prepare_decode_gemv(model, max_rows: int = MAX_ROWS) -> dict:
    """Pick configs for the model's decode linears (every M bucket up to ``max_rows``) and route
    ``stages.models.layers.linear`` through ``linear``. Call once at start-up, after the weights
    are loaded and before decode graphs are captured; a no-op off CUDA. Returns
    {(bucket, N, K): config or None} for the log."""
    from stages.models import layers

    groups = decode_linear_weights(model)
    if not groups or next(iter(groups.values()))[0].device.type != "cuda":
        return {}
    picked = {}
    for (n, k, dtype), ws in groups.items():
        if dtype not in (torch.bfloat16, torch.float16):
            continue
        for bucket in (1, 2, 4, 8, 16):
            if bucket <= max_rows:
                picked[(bucket, n, k)] = pick_config(bucket, n, k, dtype, ws[0].device, ws)
    torch.cuda.empty_cache()  # scratch timing weights
    layers.small_rows_linear = linear
    return picked


def disable_decode_gemv() -> None:
    """Every ``stages.models.layers.linear`` back to ``F.linear`` (cuBLAS), process-wide."""
    from stages.models import layers

    layers.small_rows_linear = None
