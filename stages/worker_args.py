"""``epd-stage``'s command line, and the engine configuration it gives."""

from __future__ import annotations

import argparse

from bus import messages as m
from stages.engine.config import EngineConfig


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="epd-stage", description="Run one epd stage worker.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--role", required=True, choices=m.ROLES, help="the stage this worker runs")
    ap.add_argument("--model", required=True, help="local HF-format model directory")
    ap.add_argument("--router", required=True, help="the router's worker address, e.g. tcp://127.0.0.1:7100")
    ap.add_argument("--control", help="the router's control (PUB) address")
    ap.add_argument("--worker-id", help="name in the router's registry and metrics (None: ROLE-<random>)")
    ap.add_argument("--host", default="127.0.0.1", help="address this worker's transfer server binds")
    ap.add_argument("--transfer", default="auto", choices=["auto", "shm", "zmq", "ucx"],
                    help="KV / embedding transfer backend")
    ap.add_argument("--pull-timeout", type=float, default=30.0,
                    help="seconds a pull from a peer may take before it counts as dead")
    ap.add_argument("--device", default="cpu", help="cpu, cuda[:N] or npu[:N]")
    ap.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, "
                                                    "float16")
    ap.add_argument("--load-format", default="auto", help="auto (the checkpoint) or dummy (random weights)")
    ap.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    ap.add_argument("--num-kv-blocks", type=int, help="KV blocks (None: from --kv-cache-memory-gb)")
    ap.add_argument("--kv-cache-memory-gb", type=float, default=1.0, help="KV cache size, GiB")
    ap.add_argument("--max-model-len", type=int, help="context length (None: the model's)")
    ap.add_argument("--max-num-seqs", type=int, default=64, help="sequences per engine step")
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens per engine step")
    ap.add_argument("--no-prefix-caching", action="store_true", help="turn the prefix cache off")
    ap.add_argument("--no-profile-cache", action="store_true",
                    help="measure the cost profile again instead of reading it from $EPD_CACHE/profiles")
    ap.add_argument("--async-decode", default="auto", type=str.lower, choices=["auto", "on", "off", "true", "false"],
                    help="queue each decode step before reading the last one's tokens (auto: on CUDA)")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--log-level", default="INFO", help="logging level")
    return ap.parse_args(argv)


def engine_config(a: argparse.Namespace) -> EngineConfig:
    return EngineConfig(model=a.model, dtype=a.dtype, device=a.device, load_format=a.load_format,
                        block_size=a.block_size, num_kv_blocks=a.num_kv_blocks,
                        kv_cache_memory_gb=a.kv_cache_memory_gb, max_model_len=a.max_model_len,
                        max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_num_batched_tokens,
                        enable_prefix_caching=not a.no_prefix_caching, role=a.role,
                        async_decode=None if a.async_decode == "auto" else a.async_decode in ("on", "true"))
