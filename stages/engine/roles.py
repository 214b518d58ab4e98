"""What each role holds, and switching an engine's role in place.

- encode: the vision tower and projector; no language model, no KV pool.
- prefill: the language model and a KV pool; the vision tower is built on the first image the
  worker must encode itself (no encoder in the deployment, or an embedding pull that failed).
- decode: the language model and a KV pool.
- mixed: everything.

A text-only family has no vision part, so it cannot serve the encode role.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

log = logging.getLogger(__name__)

_PARTS = {"encode": ("vision",), "prefill": ("language",), "decode": ("language",), "mixed": ("vision", "language")}


def role_parts(role: str) -> tuple[str, ...]:
    """The model parts a worker of ``role`` builds at start-up."""
    return _PARTS[role]


def needs_kv(role: str) -> bool:
    return role != "encode"


def switch_role(engine, role: str) -> dict:
    """Make ``engine`` hold what ``role`` needs and nothing more; see ``LLMEngine.switch_role``."""
    from stages.engine.block_manager import BlockManager
    from transfer.content_cache import ContentCache

    if role not in _PARTS:
        raise ValueError(f"role must be one of {', '.join(_PARTS)}, got {role!r}")
    if engine.has_unfinished_requests():
        raise RuntimeError(f"cannot switch to {role}: {engine.scheduler.num_unfinished} request(s) still run")
    runner, t0, old = engine.runner, time.perf_counter(), engine.config.role
    parts = set(role_parts(role)) & set(runner.model.PARTS)
    if not parts:
        raise ValueError(f"{engine.hf_config.model_type} has no part a {role} worker needs")
    if not needs_kv(role) and engine.handoffs:
        raise RuntimeError(f"cannot switch to {role}: {len(engine.handoffs)} prefilled request(s) wait "
                           "in the KV pool for a decode worker")
    if not needs_kv(role) and runner.num_blocks:
        old_blocks = engine.blocks
        old_blocks.reset_prefix_cache()  # tells the cluster index (events) that these blocks are gone
        runner.free_kv()
        _replace_blocks(engine, BlockManager(0, engine.config.block_size, engine.config.enable_prefix_caching),
                        old_blocks)
    if "vision" not in parts:
        runner.encoder_cache = ContentCache(runner.encoder_cache.max_bytes)  # embeddings of images it won't encode
    runner.set_parts(parts)  # frees first, then builds: the peak is the larger of the two roles
    if engine.device.type == "cuda":
        torch.cuda.empty_cache()  # give the freed weights and pool back to other processes
    if needs_kv(role) and not runner.num_blocks:
        runner.allocate_kv()
        _replace_blocks(engine, BlockManager(runner.num_blocks, engine.config.block_size,
                                             engine.config.enable_prefix_caching), engine.blocks)
    engine.config = dataclasses.replace(engine.config, role=role)
    engine.max_model_len = engine.context_len()
    out = dict(runner.memory(), role=role, switch_s=round(time.perf_counter() - t0, 3))
    log.info("role %s -> %s: %s", old, role, out)
    return out


def _replace_blocks(engine, new, old) -> None:
    """Swap the engine's block manager, keeping its event stream (and undrained events)."""
    if old.events is not None:
        new.record_events(old.events.maxlen)
        new.events.extend(old.events)
    new.prefix_hits, new.prefix_queries = old.prefix_hits, old.prefix_queries  # running totals
    engine.blocks = engine.scheduler.blocks = new
