"""Building blocks shared by the decoder models: norms, rotary embeddings, MLP.

Every op follows Hugging Face's order of float operations (norms in fp32,
rotary tables in fp32) so greedy decoding matches transformers token for token.
"""

from __future__ import annotations

import math

import torch
from torch import nn


# The linear for CUDA inputs of at most 16 rows (decode steps): set by
# gemv_triton.prepare_decode_gemv (engine flag decode_gemv); None: torch's everywhere.
small_rows_linear = None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``nn.functional.linear``, or the decode GEMV kernel for small CUDA batches once prepared."""
    if small_rows_linear is not None and x.shape[0] <= 16 and x.is_cuda:
        return small_rows_linear(x, weight, bias)
    return nn.functional.linear(x, weight, bias)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # the same ops without two no-op casts (CPU steps are op-bound)
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def fuse_linears(*linears: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several linears over the same input, their outputs side by side.

    Each linear's parameters become views into the fused tensors, so checkpoints still load
    by the original names and no weight is held twice.
    """
    first = linears[0]
    rows = sum(lin.out_features for lin in linears)
    w = torch.empty(rows, first.in_features, dtype=first.weight.dtype, device=first.weight.device)
    b = None if first.bias is None else torch.empty(rows, dtype=first.bias.dtype, device=first.bias.device)
    off = 0
    with torch.no_grad():
        for lin in linears:
            n = lin.out_features
            # Keep the values the linear holds (a model built on its own, not loaded, stays the same model).
            w[off:off + n].copy_(lin.weight)
            lin.weight = nn.Parameter(w[off:off + n], requires_grad=False)
            if b is not None:
                b[off:off + n].copy_(lin.bias)
                lin.bias = nn.Parameter(b[off:off + n], requires_grad=False)
            off += n
    return w, b


class GatedMLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)).

    Gate and up always share one matmul (the same numbers as two: each output is its own dot
    product; one op less per layer). ``fused``: a fused silu-mul kernel too (GPU fast path).
    """

    def __init__(self, hidden: int, intermediate: int, bias: bool = False, fused: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self.fused = fused
        self.gate_up_weight, self.gate_up_bias = fuse_linears(self.gate_proj, self.up_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down = self.down_proj
        gate_up = linear(x, self.gate_up_weight, self.gate_up_bias)
        if self.fused:
            from stages.models.triton_ops import silu_mul

            return linear(silu_mul(gate_up), down.weight, down.bias)
        gate, up = gate_up.chunk(2, dim=-1)
        return linear(nn.functional.silu(gate) * up, down.weight, down.bias)


def rope_inv_freq(rope: dict, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling for a ``rope_parameters`` dict.

    Supports the rope types our model families ship with: default, linear,
    llama3 (and mrope/default for Qwen2.5-VL, whose frequencies are default).
    """
    base = float(rope.get("rope_theta", 10000.0))
    dim = int(head_dim * rope.get("partial_rotary_factor", 1.0))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in ("default", "mrope"):
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / rope["factor"], 1.0
    if kind == "llama3":
        factor = rope["factor"]
        low, high = rope["low_freq_factor"], rope["high_freq_factor"]
        old_ctx = rope["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    raise ValueError(f"unsupported rope_type {kind!r} (supported: default, linear, llama3, mrope)")


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions; ``mrope_section`` enables Qwen2-VL's 3-axis M-RoPE.

    ``positions`` is [T] for plain RoPE or [3, T] (temporal, height, width)
    for M-RoPE, where each axis drives its own slice of the frequencies.
    """

    #: positions covered by the CPU table (fp32 cos|sin, 2 x 4096 x head_dim floats, 1 MiB at d=128)
    TABLE_POSITIONS = 4096

    def __init__(self, rope: dict, head_dim: int, mrope_section: list[int] | None = None):
        super().__init__()
        inv_freq, self.scaling = rope_inv_freq(rope, head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.mrope_section = mrope_section
        self._table: torch.Tensor | None = None  # [TABLE_POSITIONS, 2 * head_dim]: cos | sin

    def _cos_sin(self, positions: torch.Tensor) -> torch.Tensor:
        """fp32 cos | sin [..., T, 2 * head_dim], element for element HF's formula."""
        freqs = positions[..., None].float() * self.inv_freq.float()  # [..., T, dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return torch.cat((emb.cos() * self.scaling, emb.sin() * self.scaling), dim=-1)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # On the CPU a step is bound by op count: look rows up in a table computed once by the
        # same formula (same values) instead of ~8 small ops. Elsewhere (graphs, no host sync) compute.
        lo, hi = torch.aminmax(positions) if positions.device.type == "cpu" else (None, None)
        if lo is not None and 0 <= int(lo) and int(hi) < self.TABLE_POSITIONS:
            if self._table is None:
                self._table = self._cos_sin(torch.arange(self.TABLE_POSITIONS))
            cs = self._table[positions]
        else:
            cs = self._cos_sin(positions)
        cos, sin = cs.chunk(2, dim=-1)
        if self.mrope_section is not None:
            cos, sin = self._select_mrope(cos), self._select_mrope(sin)
        return cos.to(dtype), sin.to(dtype)

    def _select_mrope(self, x: torch.Tensor) -> torch.Tensor:
        # x: [3, T, D]; chunk i of the (doubled) sections takes axis i % 3.
        chunks = x.split(self.mrope_section * 2, dim=-1)
        return torch.cat([c[i % 3] for i, c in enumerate(chunks)], dim=-1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D]; cos/sin: [T, D]."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    return x * cos + rotate_half(x) * sin
