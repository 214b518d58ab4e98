"""The router's copy of each worker's measured cost model, corrected online.

A worker sends its fitted coefficients in ``WorkerInfo.cost_model`` (``stages.profiler``) and the
timings of its latest steps and encodes in every heartbeat. The router prices work with the
same features (``bus.step_cost``) and keeps, per kind of work (prefill steps, decode-only steps,
encodes), an EWMA of actual / predicted: the model then follows the load, other tenants of the
device, and drift, without refitting.
"""

from __future__ import annotations

import math

from bus.step_cost import (ENCODE_FEATURES, STEP_FEATURES, decode_features, encode_features, predict,
                           prefill_features)

EWMA_ALPHA = 0.2
RATIO_BOUNDS = (0.05, 20.0)
# What a worker that sent no profile is assumed to cost (a small model on a CPU core).
DEFAULT_STEP = {"base": 0.01, "new_tokens": 1e-4, "attn_kilopairs": 1e-3, "decode_seqs": 1e-3,
                "decode_ctx_ktokens": 1e-3}
DEFAULT_ENCODE = {"base": 0.01, "images": 0.0, "image_tokens": 1e-4}


class WorkerCost:
    """One worker incarnation's cost model: coefficients from its profile times a correction."""

    def __init__(self, spec: dict | None):
        spec = dict(spec or {})
        self.spec = spec
        # A profile's missing coefficient is 0; a worker without a profile gets the defaults.
        self.step = dict(spec["step"]) if spec.get("step") else dict(DEFAULT_STEP)
        self.encode = dict(spec["encode"]) if spec.get("encode") else dict(DEFAULT_ENCODE)
        self.budget = max(int(spec.get("token_budget") or 2048), 1)
        self.correction = {"prefill": 1.0, "decode": 1.0, "encode": 1.0}
        self.observed = {"prefill": 0, "decode": 0, "encode": 0}

    # ---- online correction --------------------------------------------------------------------
    def observe(self, row: list[float]) -> None:
        """One timing from a heartbeat: [0, *step features, s] or [1, *encode features, s]."""
        if not row or len(row) < 3:
            return
        if int(row[0]) == 0 and len(row) == len(STEP_FEATURES) + 2:
            feats = row[1:-1]
            kind = "prefill" if feats[1] > 0 else "decode"
            predicted = predict(self.step, feats, STEP_FEATURES)
        elif int(row[0]) == 1 and len(row) == len(ENCODE_FEATURES) + 2:
            kind, predicted = "encode", predict(self.encode, row[1:-1], ENCODE_FEATURES)
        else:
            return
        actual = row[-1]
        if predicted <= 1e-9 or not math.isfinite(actual) or actual < 0:
            return
        ratio = min(max(actual / predicted, RATIO_BOUNDS[0]), RATIO_BOUNDS[1])
        old = self.correction[kind]
        self.correction[kind] = ratio if self.observed[kind] == 0 else old + EWMA_ALPHA * (ratio - old)
        self.observed[kind] += 1

    # ---- prices ---------------------------------------------------------------------------------
    def prefill_s(self, new_tokens: int, cached_tokens: int = 0) -> float:
        """Seconds to prefill ``new_tokens`` on top of ``cached_tokens``, in token-budget chunks."""
        total, done, left = 0.0, cached_tokens, max(new_tokens, 1)
        while left > 0:
            n = min(self.budget, left)
            total += predict(self.step, prefill_features(n, done))
            done, left = done + n, left - n
        return total * self.correction["prefill"]

    def decode_step_s(self, batch: int, context_tokens: int) -> float:
        """Seconds of one decode step of ``batch`` sequences reading ``context_tokens`` in all (the TPOT)."""
        return predict(self.step, decode_features(max(batch, 1), context_tokens)) * self.correction["decode"]

    def encode_s(self, images: int, image_tokens: int) -> float:
        if images <= 0:
            return 0.0
        return predict(self.encode, encode_features(images, image_tokens), ENCODE_FEATURES) * self.correction["encode"]

    def to_dict(self) -> dict:
        return {"step": self.step, "encode": self.encode, "token_budget": self.budget,
                "correction": {k: round(v, 4) for k, v in self.correction.items()},
                "observed": dict(self.observed),
                **{k: v for k, v in self.spec.items() if k in ("source", "profile_s", "kv_capacity_tokens",
                                                               "max_num_seqs", "step_samples", "encode_samples")}}
