"""A worker's own costs, measured at start-up on its device and fitted to the model of
``bus.step_cost`` (least squares, coefficients kept non-negative).

- steps (prefill, decode, mixed roles): prompts of a few lengths (the new-token and quadratic
  attention terms), one on top of a cached prefix (what cached tokens still cost), and decode
  batches of a few sizes and contexts;
- encodes (encode, mixed, and prefill once it holds its vision tower: a prefill worker encodes
  when no encoder is left): one and two images of a few sizes.

It runs before the worker registers and leaves no trace: its blocks leave the prefix cache,
its images the encoder cache, its counts the counters. The fit is cached on disk under
``$EPD_CACHE/profiles`` (default ``~/.cache/epd``), keyed by model, device, dtype and the
engine settings that change a step's cost, so a restart costs nothing; the router then
corrects the model online from the step timings heartbeats carry. A cached profile older than
``$EPD_PROFILE_MAX_AGE_DAYS`` (default 7) is measured again: drivers, libraries and the host's
other tenants change what a step costs, and the online correction starts from it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from bus.step_cost import ENCODE_FEATURES, STEP_FEATURES

log = logging.getLogger("epd.profiler")
PROFILE_VERSION = 4  # 4: decode lookahead and GEMV (and their settings in the key)
WARMUP_STEPS = 3


PREFILL_REPS = 3  # each prefill size is timed this many times; the fastest counts (see _fastest)


def max_age_s() -> float:
    return float(os.environ.get("EPD_PROFILE_MAX_AGE_DAYS", "7")) * 86400


def cache_dir() -> Path:
    return Path(os.environ.get("EPD_CACHE", Path.home() / ".cache" / "epd")) / "profiles"


def fit_nonneg(rows: list[tuple[float, ...]], seconds: list[float], names) -> dict[str, float]:
    """Least squares with every coefficient >= 0 (an active set: drop the negative ones, refit)."""
    x, y = np.asarray(rows, dtype=np.float64), np.asarray(seconds, dtype=np.float64)
    active = [j for j in range(x.shape[1]) if np.any(x[:, j])]
    coef = np.zeros(x.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        if (sol >= 0).all():
            coef[active] = sol
            break
        active = [j for j, c in zip(active, sol) if c > 0] if (sol > 0).any() else active[:1]
        if len(active) == 1:
            coef[active] = max(float(np.linalg.lstsq(x[:, active], y, rcond=None)[0][0]), 0.0)
            break
    return {n: float(c) for n, c in zip(names, coef)}


def _model_fingerprint(model: Path) -> str:
    """The model by content, not path: a model rebuilt elsewhere (the tests' tiny ones) hits the cache."""
    h = hashlib.sha256()
    for p in [model / "config.json", *sorted(model.glob("*.safetensors"))[:8]]:
        if p.exists():
            h.update(f"{p.name}:{p.stat().st_size}".encode())
            with open(p, "rb") as f:
                h.update(f.read(1 << 20))  # the header and the first weights
    return h.hexdigest()


def _key(engine, role_kinds: tuple[str, ...]) -> str:
    cfg, dev = engine.config, engine.device
    device = str(dev)
    if dev.type == "cuda":
        import torch

        device = torch.cuda.get_device_name(dev)
    else:
        import torch

        device = f"cpu-{torch.get_num_threads()}threads"
    parts = [PROFILE_VERSION, _model_fingerprint(Path(cfg.model)), device, str(engine.dtype), cfg.block_size,
             cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.attention_backend, os.environ.get("EPD_ATTENTION", ""),
             role_kinds, cfg.cuda_graphs, engine.lookahead is not None, cfg.decode_gemv]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:24]


def _run(engine, prompts: list[list[int]], max_tokens: int) -> list:
    """Run prompts to ``max_tokens`` tokens; the step samples they produced (warm-up excluded)."""
    from stages.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    engine.step_samples.clear()
    for i, ids in enumerate(prompts):
        engine.add_request(f"__profile-{time.monotonic_ns()}-{i}", {"prompt_token_ids": ids}, params)
    while engine.has_unfinished_requests():
        engine.step()
    return list(engine.step_samples)


def _fastest(measure, reps: int = PREFILL_REPS) -> list:
    """The fastest of ``reps`` runs of ``measure()`` (its rows): one prefill per size is few
    samples, and a step that another process delayed (a shared host) would set the slope
    (seen: a flat 0 per token on a loaded 2-core machine). Fresh prompts each run: no cache hit.
    """
    runs = [measure() for _ in range(reps)]
    return min(runs, key=lambda rows: sum(s for _, s in rows))


def profile_steps(engine) -> tuple[dict[str, float], int]:
    """Fit the step model from a few prompts and decode batches; (coefficients, samples)."""
    rng = np.random.default_rng(0)
    vocab = min(engine.vocab_size, 30000)
    budget = engine.config.max_num_batched_tokens
    limit = max(min(engine.max_model_len - 16, budget), 16)

    special = {getattr(engine.inputs.images, "placeholder_id", None), *engine.eos_token_ids}

    def ids(n):
        return [t if t not in special else 100 for t in rng.integers(100, vocab, n).tolist()]

    _run(engine, [ids(16)], WARMUP_STEPS)  # first calls pay for lazy set-up
    rows: list = []
    lengths = sorted({min(n, limit) for n in (16, 96, 384)})
    for n in lengths:
        rows += _fastest(lambda: _run(engine, [ids(n)], 1))
    # A cached prefix, then 32 new tokens on top of it (a small token budget chunks them).
    base = ids(max(min(256, limit - 32), 16))
    _run(engine, [base], 1)
    rows += _fastest(lambda: _run(engine, [base + ids(32)], 1))
    seqs = engine.config.max_num_seqs
    batches = ((1, min(320, limit)), (min(8, seqs), 48), (min(24, seqs), 16))
    if engine.device.type != "cpu":  # first use of a batch size captures its decode graph: not timed
        for batch, n in batches:
            _run(engine, [ids(n) for _ in range(batch)], 2)
    for batch, n in batches:
        rows += _run(engine, [ids(n) for _ in range(batch)], 5)
    coef = fit_nonneg([f for f, _ in rows], [s for _, s in rows], STEP_FEATURES)
    return coef, len(rows)


def profile_encode(engine) -> tuple[dict[str, float], int]:
    """Fit the encode model from one and two images of a few sizes."""
    from PIL import Image

    def png(w, h, seed):
        rgb = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="PNG")
        return buf.getvalue()

    engine.encode_images([png(32, 32, 99)])  # warm-up
    rows, secs = [], []
    for k, (w, h) in enumerate(((64, 48), (224, 224), (448, 336))):
        for n in (1, 2):
            imgs = [png(w, h, 10 * k + j) for j in range(n)]
            t0 = time.perf_counter()
            out = engine.encode_images(imgs)
            secs.append(time.perf_counter() - t0)
            rows.append((1.0, float(n), float(sum(p.num_tokens for p in out))))
    return fit_nonneg(rows, secs, ENCODE_FEATURES), len(rows)


def _clean(engine) -> None:
    """Leave the engine as it was before the profile: nothing cached, nothing counted."""
    engine.blocks.reset_prefix_cache()
    engine.blocks.prefix_hits = engine.blocks.prefix_queries = 0
    from transfer.content_cache import ContentCache

    engine.runner.encoder_cache = ContentCache(engine.runner.encoder_cache.max_bytes)
    engine.runner.num_images_encoded = 0
    engine.num_generated_tokens = 0
    engine.step_samples.clear()


def profile(engine, role: str, use_cache: bool = True) -> dict:
    """The worker's cost model for ``WorkerInfo.cost_model`` (measured, or from the disk cache)."""
    # A prefill worker builds its vision tower on the first image it must encode itself
    # (stages/engine/roles.py): profiling an encode would build it at start-up for nothing,
    # so its encodes are priced by the router's default model and corrected from their timings.
    has_vision = "vision" in engine.runner.model.parts
    kinds = tuple(k for k, roles in (("step", ("prefill", "decode", "mixed")),
                                     ("encode", ("encode", "prefill", "mixed")))
                  if role in roles and (k != "encode" or (engine.inputs.images is not None and has_vision)))
    path = cache_dir() / f"{_key(engine, kinds)}.json"
    model: dict | None = None
    if use_cache and path.exists() and time.time() - path.stat().st_mtime < max_age_s():
        try:
            model = json.loads(path.read_text())
            model["source"] = "cache"
        except (OSError, ValueError):
            model = None
    if model is None:
        t0 = time.perf_counter()
        model = {"source": "profiled"}
        try:
            if "step" in kinds:
                model["step"], model["step_samples"] = profile_steps(engine)
            if "encode" in kinds:
                model["encode"], model["encode_samples"] = profile_encode(engine)
        finally:
            _clean(engine)
        model["profile_s"] = round(time.perf_counter() - t0, 3)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(model))
            tmp.replace(path)
        except OSError as e:
            log.warning("could not cache the cost profile: %s", e)
        log.info("cost profile (%s) in %.2f s: %s", ",".join(kinds), model["profile_s"], model)
    cfg = engine.config
    model.update(token_budget=cfg.max_num_batched_tokens, max_num_seqs=cfg.max_num_seqs,
                 kv_capacity_tokens=engine.runner.num_blocks * cfg.block_size)
    return model
