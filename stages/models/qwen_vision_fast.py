"""A fast forward for the Qwen2.5-VL vision tower's blocks on GPU, installed on each block.

transformers' block computes ``x = x + attn(norm1(x)); x = x + mlp(norm2(x))`` with
RMSNorm in fp32 (``weight * h.to(dtype)``), rotary on fp32 copies of q and k (rotate-half
by concatenation), and ``down(silu(gate(x)) * up(x))``. At the 7B shapes (intermediate
3420, not a multiple of 8) cuBLAS falls back to its slow 2-element-aligned GEMMs, and the
small ops cost a third of the tower. Here a block is ten kernels:

- norm1: our Triton RMSNorm; norm2 with the attention's residual add fused in;
- qkv linear, then rotary in place on the q and k columns of its output (one Triton kernel,
  fp32 math and one rounding, as transformers'), attention over the strided q/k/v views
  (``stages/attention/vision.py``: the attention module's ``impl``), proj linear;
- MLP: gate and up as one GEMM, silu-mul in one Triton kernel, down; the intermediate size
  padded with zeros to a multiple of ``PAD`` (zero gate/up rows give silu(0) * 0 = 0, which
  meets zero down columns), then the residual add.

The patch embedding (a Conv3d whose stride is its kernel: cuDNN runs it as a slow implicit
GEMM, 4.4 ms for 36,864 patches) becomes the one matmul it is.

The padded weights are built on the first fast forward (after loading) and the modules'
``gate_proj``/``up_proj``/``down_proj`` parameters become views into them (as
``layers.fuse_linears`` does): names, shapes and values unchanged, checkpoints load as
before, no weight held twice. Parameters replaced since (``.to()``, assignment) are noticed
by address and padded again.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stages.attention import vision

IMPLS = ("auto", "reference", "fast")
PAD = 64  # intermediate size rounded up to this: 3420 -> 3456 (1% more MLP work, aligned GEMMs)


def use_fast_blocks(tower: nn.Module, impl: str = "auto") -> int:
    """Give every vision block (and the patch embedding) of ``tower`` the fast forward under
    ``impl``; returns how many blocks.

    ``"auto"``: the fast forward on CUDA, transformers' on CPU (exact); ``"fast"`` forces it
    (CPU tests run its Triton kernels in the interpreter); ``"reference"``: transformers'.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    count = 0
    for module in tower.modules():
        if type(module).__name__ == "Qwen2_5_VLVisionBlock":
            module._epd_block_impl = impl
            module.forward = types.MethodType(_block_forward, module)
            count += 1
        elif type(module).__name__ == "Qwen2_5_VisionPatchEmbed":
            module._epd_block_impl = impl
            module.forward = types.MethodType(_patch_embed_forward, module)
    return count


def _patch_embed_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """Drop-in for ``Qwen2_5_VisionPatchEmbed.forward``: [patches, C * T * P * P] -> [patches, embed]."""
    impl = self._epd_block_impl
    if impl == "reference" or (impl == "auto" and not hidden_states.is_cuda):
        return type(self).forward(self, hidden_states)
    w = self.proj.weight  # [embed, C, T, P, P]: a patch's pixels in the order of the input's rows
    return F.linear(hidden_states.reshape(-1, w[0].numel()).to(w.dtype), w.reshape(w.shape[0], -1), self.proj.bias)


def _block_forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Drop-in for ``Qwen2_5_VLVisionBlock.forward``."""
    impl = self._epd_block_impl
    if impl == "auto":
        impl = "fast" if hidden_states.is_cuda else "reference"
    if impl == "reference" or args:
        return type(self).forward(self, hidden_states, cu_seqlens, *args, **kwargs)
    from stages.models.triton_ops import rmsnorm

    x = hidden_states
    h = rmsnorm(x, self.norm1.weight, self.norm1.variance_epsilon)
    attn = _attention(self.attn, h, cu_seqlens, kwargs)
    x, h = rmsnorm(x, self.norm2.weight, self.norm2.variance_epsilon, delta=attn)  # x + attn, norm2 of it
    return x + _mlp(self.mlp, h)


def _attention(attn: nn.Module, h: torch.Tensor, cu_seqlens: torch.Tensor, kwargs: dict) -> torch.Tensor:
    impl = vision.resolve_impl(getattr(attn, "_epd_impl", "reference"), h.is_cuda)
    if impl == "reference":
        return attn(h, cu_seqlens=cu_seqlens, **kwargs)
    t, heads = h.shape[0], attn.num_heads
    qkv = F.linear(h, attn.qkv.weight, attn.qkv.bias).view(t, 3 * heads, -1)  # heads of q, then k, then v
    cos, sin = vision.rotary_cos_sin(kwargs)
    rope_qk_(qkv[:, :2 * heads], cos, sin)
    q, k, v = qkv.view(t, 3, heads, -1).unbind(1)
    out = vision.varlen_attention(q, k, v, cu_seqlens, attn.scaling, impl)
    return F.linear(out.reshape(t, -1), attn.proj.weight, attn.proj.bias)


def _mlp(mlp: nn.Module, h: torch.Tensor) -> torch.Tensor:
    pad = _padded(mlp)
    gate_up = F.linear(h, pad.gate_up, pad.gate_up_bias)
    if type(mlp.act_fn).__name__ in ("SiLUActivation", "SiLU"):
        from stages.models.triton_ops import silu_mul

        act = silu_mul(gate_up)
    else:
        gate, up = gate_up.chunk(2, dim=-1)
        act = mlp.act_fn(gate) * up
    return F.linear(act, pad.down, mlp.down_proj.bias)


@dataclass
class _Padded:
    gate_up: torch.Tensor  # [2 * n_pad, hidden]: gate rows, zeros, up rows, zeros
    gate_up_bias: torch.Tensor | None  # [2 * n_pad] likewise
    down: torch.Tensor  # [hidden_out, n_pad]: down's columns, then zeros
    ptrs: tuple  # the parameters' addresses when they were made views of the above


def _param_ptrs(mlp: nn.Module) -> tuple:
    gate, up = mlp.gate_proj, mlp.up_proj
    return (gate.weight.data_ptr(), up.weight.data_ptr(), mlp.down_proj.weight.data_ptr(),
            gate.bias is not None and gate.bias.data_ptr(), up.bias is not None and up.bias.data_ptr())


def _padded(mlp: nn.Module) -> _Padded:
    pad = getattr(mlp, "_epd_padded", None)
    if pad is None or pad.ptrs != _param_ptrs(mlp):
        pad = mlp._epd_padded = _pad(mlp)
    return pad


def _pad(mlp: nn.Module) -> _Padded:
    gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    n, hidden = gate.weight.shape
    n_pad = -(-n // PAD) * PAD

    def view(t: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(t, requires_grad=False)

    # Inside the engine's inference mode the new storage must still be ordinary tensors (weights reload into it).
    with torch.inference_mode(False), torch.no_grad():
        w = gate.weight.new_zeros(2 * n_pad, hidden)
        w[:n].copy_(gate.weight)
        w[n_pad:n_pad + n].copy_(up.weight)
        gate.weight, up.weight = view(w[:n]), view(w[n_pad:n_pad + n])
        b = None
        if gate.bias is not None:
            b = gate.bias.new_zeros(2 * n_pad)
            b[:n].copy_(gate.bias)
            b[n_pad:n_pad + n].copy_(up.bias)
            gate.bias, up.bias = view(b[:n]), view(b[n_pad:n_pad + n])
        d = down.weight.new_zeros(down.weight.shape[0], n_pad)
        d[:, :n].copy_(down.weight)
        down.weight = view(d[:, :n])
    return _Padded(w, b, d, _param_ptrs(mlp))


# ---- rotary ---------------------------------------------------------------------------------

def rope_qk_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary in place on ``x`` ([T, heads, D], last dim contiguous; q's and k's heads
    of the qkv output side by side); ``cos``/``sin``: [T, D], any float dtype.

    transformers' vision rotary: ``(x * cos + rotate_half(x) * sin)`` on fp32 copies, rounded
    once to ``x``'s dtype. (``triton_ops.rope_`` rounds each product, as the decoder's does.)
    """
    import triton

    t, h, d = x.shape
    cos, sin = cos.contiguous(), sin.contiguous()
    if t:
        _rope_kernel()[(t,)](x, cos, sin, x.stride(0), x.stride(1), cos.stride(0), H=h, HALF=d // 2,
                             BLOCK_H=triton.next_power_of_2(h), BLOCK=triton.next_power_of_2(d // 2),
                             num_warps=4)
    return x


_KERNEL = None


def _rope_kernel():
    """The Triton kernel, compiled on first use (this module imports without Triton)."""
    global _KERNEL
    if _KERNEL is None:
        import triton
        import triton.language as tl

        from stages.attention import triton_kernels  # noqa: F401  (interpreter compatibility patch)

        @triton.jit
        def _vision_rope_kernel(x_ptr, cos_ptr, sin_ptr, stride_t, stride_h, stride_c, H: tl.constexpr,
                                HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK: tl.constexpr):
            t = tl.program_id(0).to(tl.int64)
            h = tl.arange(0, BLOCK_H)
            d = tl.arange(0, BLOCK)
            dm = d < HALF
            m = (h < H)[:, None] & dm[None, :]
            base = x_ptr + t * stride_t + h[:, None] * stride_h + d[None, :]
            x1 = tl.load(base, mask=m, other=0.0)
            ty = x1.dtype
            x1 = x1.to(tl.float32)
            x2 = tl.load(base + HALF, mask=m, other=0.0).to(tl.float32)
            c1 = tl.load(cos_ptr + t * stride_c + d, mask=dm, other=0.0).to(tl.float32)[None, :]
            c2 = tl.load(cos_ptr + t * stride_c + HALF + d, mask=dm, other=0.0).to(tl.float32)[None, :]
            s1 = tl.load(sin_ptr + t * stride_c + d, mask=dm, other=0.0).to(tl.float32)[None, :]
            s2 = tl.load(sin_ptr + t * stride_c + HALF + d, mask=dm, other=0.0).to(tl.float32)[None, :]
            tl.store(base, (x1 * c1 + (-x2) * s1).to(ty), mask=m)
            tl.store(base + HALF, (x2 * c2 + x1 * s2).to(ty), mask=m)

        _KERNEL = _vision_rope_kernel
    return _KERNEL
