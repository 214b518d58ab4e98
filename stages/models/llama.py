"""The Llama / Qwen2 / Qwen3 decoder over the paged KV cache.

One implementation covers the family: Qwen2 adds q/k/v biases, Qwen3 adds
per-head RMSNorm on q and k, Qwen2.5-VL's language model uses M-RoPE
(positions [3, T]). Module names mirror Hugging Face's so checkpoints load
by name.
"""

from __future__ import annotations

import torch
from torch import nn

from stages.attention.backend import AttentionBackend, AttentionMetadata
from stages.models.base import EngineModel, copy_named_weights
from stages.models.layers import GatedMLP, RMSNorm, RotaryEmbedding, apply_rotary, fuse_linears, linear


class DecoderSpec:
    """The few facts of a HF text config the decoder needs, read once."""

    def __init__(self, cfg, family: str, tie: bool | None = None):
        self.hidden = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or self.hidden // self.heads
        self.intermediate = cfg.intermediate_size
        self.layers = cfg.num_hidden_layers
        self.eps = cfg.rms_norm_eps
        self.vocab = cfg.vocab_size
        # VLM configs keep tie_word_embeddings on the outer config: the caller passes it.
        self.tie = bool(getattr(cfg, "tie_word_embeddings", False)) if tie is None else tie
        self.qkv_bias = family in ("qwen2", "qwen2_5_vl") or bool(getattr(cfg, "attention_bias", False))
        self.o_bias = family not in ("qwen2", "qwen2_5_vl") and bool(getattr(cfg, "attention_bias", False))
        self.mlp_bias = bool(getattr(cfg, "mlp_bias", False))
        self.qk_norm = family == "qwen3"
        rope = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
        rope.setdefault("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        self.rope = rope
        self.mrope_section = rope.get("mrope_section") if family == "qwen2_5_vl" else None


class Attention(nn.Module):
    def __init__(self, spec: DecoderSpec, backend: AttentionBackend):
        super().__init__()
        self.spec, self.backend = spec, backend
        d = spec.head_dim
        self.q_proj = nn.Linear(spec.hidden, spec.heads * d, bias=spec.qkv_bias)
        self.k_proj = nn.Linear(spec.hidden, spec.kv_heads * d, bias=spec.qkv_bias)
        self.v_proj = nn.Linear(spec.hidden, spec.kv_heads * d, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(spec.heads * d, spec.hidden, bias=spec.o_bias)
        if spec.qk_norm:
            self.q_norm = RMSNorm(d, spec.eps)
            self.k_norm = RMSNorm(d, spec.eps)
        self.scale = d ** -0.5
        self.fused = backend.fused_ops  # Triton kernels for rotary (and the MLP's silu-mul)
        # One qkv matmul everywhere: each output is its own dot product, so the numbers are the
        # three projections' (checked bitwise on CPU), for two ops less per layer.
        self.qkv_weight, self.qkv_bias = fuse_linears(self.q_proj, self.k_proj, self.v_proj)

    def _forward_fused(self, x, cos, sin, meta, kv_cache):
        """One qkv matmul, rotary in place on its output (one kernel for q and k)."""
        from stages.models.triton_ops import rope_

        s, t, d = self.spec, x.shape[0], self.spec.head_dim
        qkv = linear(x, self.qkv_weight, self.qkv_bias)
        nq, nk = s.heads * d, s.kv_heads * d
        v = qkv[:, nq + nk:].view(t, s.kv_heads, d)
        if s.qk_norm:
            q = self.q_norm(qkv[:, :nq].view(t, s.heads, d))
            k = self.k_norm(qkv[:, nq:nq + nk].view(t, s.kv_heads, d))
            rope_(q, cos, sin)
            rope_(k, cos, sin)
        else:
            rope_(qkv[:, :nq + nk].view(t, s.heads + s.kv_heads, d), cos, sin)
            q = qkv[:, :nq].view(t, s.heads, d)
            k = qkv[:, nq:nq + nk].view(t, s.kv_heads, d)
        k_cache, v_cache = kv_cache
        self.backend.write_kv(k_cache, v_cache, k, v, meta)
        o = self.backend.attend(q, k, v, k_cache, v_cache, meta, self.scale)
        return linear(o.reshape(t, s.heads * d), self.o_proj.weight, self.o_proj.bias)

    def forward(self, x, cos, sin, meta: AttentionMetadata, kv_cache):
        if self.fused:
            return self._forward_fused(x, cos, sin, meta, kv_cache)
        s, t, d = self.spec, x.shape[0], self.spec.head_dim
        qkv = linear(x, self.qkv_weight, self.qkv_bias)
        nq, nk = s.heads * d, s.kv_heads * d
        v = qkv[:, nq + nk:].view(t, s.kv_heads, d)
        if s.qk_norm:
            q = apply_rotary(self.q_norm(qkv[:, :nq].view(t, s.heads, d)), cos, sin)
            k = apply_rotary(self.k_norm(qkv[:, nq:nq + nk].view(t, s.kv_heads, d)), cos, sin)
        else:  # rotary is elementwise per head: q's and k's heads in one pass
            qk = apply_rotary(qkv[:, :nq + nk].view(t, s.heads + s.kv_heads, d), cos, sin)
            q, k = qk[:, :s.heads], qk[:, s.heads:]
        k_cache, v_cache = kv_cache
        self.backend.write_kv(k_cache, v_cache, k, v, meta)
        o = self.backend.attend(q, k, v, k_cache, v_cache, meta, self.scale)
        return linear(o.reshape(t, nq), self.o_proj.weight, self.o_proj.bias)


class DecoderLayer(nn.Module):
    def __init__(self, spec: DecoderSpec, backend: AttentionBackend):
        super().__init__()
        self.self_attn = Attention(spec, backend)
        self.mlp = GatedMLP(spec.hidden, spec.intermediate, spec.mlp_bias, fused=backend.fused_ops)
        self.input_layernorm = RMSNorm(spec.hidden, spec.eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden, spec.eps)

    def forward(self, x, cos, sin, meta, kv_cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, meta, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_fused(self, residual, delta, cos, sin, meta, kv_cache):
        """The same layer on the fast path, the residual add fused into the next norm.

        Takes and returns (residual, delta) with the layer's input = residual + delta
        (``delta`` None: the input is ``residual`` itself).
        """
        from stages.models.triton_ops import rmsnorm

        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        if delta is None:
            h = rmsnorm(residual, norm1.weight, norm1.eps)
        else:
            residual, h = rmsnorm(residual, norm1.weight, norm1.eps, delta)
        a = self.self_attn(h, cos, sin, meta, kv_cache)
        residual, h = rmsnorm(residual, norm2.weight, norm2.eps, a)
        return residual, self.mlp(h)


class DecoderBody(nn.Module):
    """HF's ``model.*``: embeddings, layers, final norm."""

    def __init__(self, spec: DecoderSpec, backend: AttentionBackend):
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab, spec.hidden)
        self.layers = nn.ModuleList(DecoderLayer(spec, backend) for _ in range(spec.layers))
        self.norm = RMSNorm(spec.hidden, spec.eps)
        self.rotary = RotaryEmbedding(spec.rope, spec.head_dim, spec.mrope_section)
        self.fused = backend.fused_ops

    def forward(self, x, positions, meta, kv_caches):
        cos, sin = self.rotary(positions, x.dtype)
        if self.fused:
            from stages.models.triton_ops import rmsnorm

            residual, delta = x, None
            for layer, kv in zip(self.layers, kv_caches):
                residual, delta = layer.forward_fused(residual, delta, cos, sin, meta, kv)
            return rmsnorm(residual, self.norm.weight, self.norm.eps, delta)[1]
        for layer, kv in zip(self.layers, kv_caches):
            x = layer(x, cos, sin, meta, kv)
        return self.norm(x)


class DecoderLM(EngineModel):
    """Causal LM: ``model`` (body) + ``lm_head``; used alone or inside a VLM."""

    def __init__(self, text_config, family: str, backend: AttentionBackend, tie: bool | None = None):
        super().__init__()
        spec = DecoderSpec(text_config, family, tie)
        self.spec = spec
        self.model = DecoderBody(spec, backend)
        self.lm_head = nn.Linear(spec.hidden, spec.vocab, bias=False)
        if spec.tie:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.uses_mrope = spec.mrope_section is not None
        self.num_layers, self.num_kv_heads, self.head_dim = spec.layers, spec.kv_heads, spec.head_dim

    def embed_tokens(self, input_ids):
        return self.model.embed_tokens(input_ids)

    def forward(self, positions, meta, kv_caches, input_ids=None, inputs_embeds=None):
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        return self.model(inputs_embeds, positions, meta, kv_caches)

    def compute_logits(self, hidden):
        return linear(hidden, self.lm_head.weight, self.lm_head.bias)

    def checkpoint_name(self, key: str) -> str | None:
        if "rotary_emb.inv_freq" in key:
            return None
        if self.spec.tie and key == "lm_head.weight":
            return None  # tied: the embedding is the head
        return key

    def skip_param(self, name: str) -> bool:
        return name.startswith("model.rotary.") or (self.spec.tie and name == "lm_head.weight")
