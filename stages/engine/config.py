"""Engine configuration: one frozen dataclass, checked once."""

from __future__ import annotations

from dataclasses import dataclass, fields

ROLES = ("encode", "prefill", "decode", "mixed")


@dataclass(frozen=True)
class EngineConfig:
    model: str
    dtype: str = "auto"  # auto: float32 on cpu, bfloat16 on accelerators
    device: str = "cpu"
    load_format: str = "auto"  # auto | safetensors | dummy
    seed: int = 0
    block_size: int = 16
    # KV pool size: an explicit block count wins over the memory budget.
    num_kv_blocks: int | None = None
    kv_cache_memory_gb: float = 1.0
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    encoder_cache_mb: int = 512
    max_images_per_prompt: int = 16
    # auto: our Triton kernels on CUDA, the plain-torch reference elsewhere (torch | triton to force).
    attention_backend: str = "auto"
    # Capture pure-decode steps in CUDA graphs (per batch-size bucket, at start-up) where the
    # backend supports it.
    cuda_graphs: bool = True
    # Queue decode step N+1 before reading step N's tokens, so the host's bookkeeping overlaps
    # the device's work (stages/engine/lookahead.py; decode batches sampled on the device alone).
    # None: on for CUDA, off elsewhere (a CPU step is the host's own work: nothing to overlap).
    async_decode: bool | None = None
    # Linears of decode steps (<= 16 rows, CUDA, bf16/fp16) through our Triton GEMV where it beat
    # cuBLAS when timed at start-up (stages/models/gemv_triton.py: prepare_decode_gemv).
    # None: on for CUDA (a shape keeps cuBLAS unless our kernel was faster), off elsewhere.
    decode_gemv: bool | None = None
    # The stage this engine serves; it decides which weights and whether a KV pool are built
    # (stages/engine/roles.py). "mixed" builds everything.
    role: str = "mixed"
    # CPU: a step with less arithmetic than this (GFLOP, weights + attention) runs on one thread,
    # a larger one on all of torch's threads (stages/engine/cpu_threads.py says why); 0: always all.
    cpu_parallel_min_gflop: float = 1.0

    def __post_init__(self):
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise ValueError(f"num_kv_blocks must be >= 2, got {self.num_kv_blocks}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.block_size:
            raise ValueError("max_num_batched_tokens must be >= block_size")
        if self.kv_cache_memory_gb <= 0:
            raise ValueError("kv_cache_memory_gb must be > 0")
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"attention_backend must be auto, torch or triton, got {self.attention_backend!r}")
        if self.cpu_parallel_min_gflop < 0:
            raise ValueError(f"cpu_parallel_min_gflop must be >= 0, got {self.cpu_parallel_min_gflop}")
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> "EngineConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine argument(s): {', '.join(unknown)}")
        return cls(model=str(model), **kwargs)
