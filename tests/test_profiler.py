"""The worker's start-up cost profile: the fit, the disk cache, and an engine left as it was."""

from __future__ import annotations

import os

import numpy as np
import pytest

from bus.step_cost import STEP_FEATURES, predict, prefill_features
from stages.profiler import fit_nonneg


def test_fit_recovers_coefficients_and_keeps_them_non_negative():
    rng = np.random.default_rng(0)
    x = [(1.0, *rng.uniform(0, 100, 4)) for _ in range(40)]
    true = {"base": 0.01, "new_tokens": 2e-4, "attn_kilopairs": 0.0, "decode_seqs": 1e-3, "decode_ctx_ktokens": 5e-3}
    y = [predict(true, r) for r in x]
    got = fit_nonneg(x, y, STEP_FEATURES)
    assert got == pytest.approx(true, abs=1e-9)
    # Noise that would drive a coefficient below zero leaves it at zero.
    y2 = [v - 1e-4 * r[2] for v, r in zip(y, x)]
    assert min(fit_nonneg(x, y2, STEP_FEATURES).values()) >= 0


def test_profile_is_cached_and_leaves_no_trace(llava_dir, tmp_path, monkeypatch):
    from stages.engine.config import EngineConfig
    from stages.engine.llm_engine import LLMEngine
    from stages.profiler import profile

    monkeypatch.setenv("EPD_CACHE", str(tmp_path))
    eng = LLMEngine(EngineConfig(model=llava_dir, device="cpu", kv_cache_memory_gb=0.1))
    first = profile(eng, "prefill")
    assert first["source"] == "profiled" and set(first["step"]) == set(STEP_FEATURES)
    assert first["encode"]["image_tokens"] >= 0 and first["kv_capacity_tokens"] > 0
    step = first["step"]
    assert predict(step, prefill_features(1024)) > predict(step, prefill_features(16))
    # Nothing of the profile stays: no cached blocks or embeddings, no counts.
    assert eng.blocks.num_used_blocks == 0 and not eng.blocks.cached and eng.blocks.prefix_queries == 0
    assert eng.runner.num_images_encoded == 0 and len(eng.runner.encoder_cache) == 0
    assert not eng.step_samples and not eng.has_unfinished_requests()
    again = profile(eng, "prefill")
    assert again["source"] == "cache" and again["step"] == step
    assert len(list((tmp_path / "profiles").glob("*.json"))) == 1
    assert profile(eng, "decode")["source"] == "profiled" and "encode" not in profile(eng, "decode")
    # A profile older than EPD_PROFILE_MAX_AGE_DAYS is measured again (and cached anew).
    old = min(p.stat().st_mtime for p in (tmp_path / "profiles").glob("*.json")) - 8 * 86400
    for cached in (tmp_path / "profiles").glob("*.json"):
        os.utime(cached, (old, old))
    assert profile(eng, "prefill")["source"] == "profiled"
    assert profile(eng, "prefill")["source"] == "cache"
