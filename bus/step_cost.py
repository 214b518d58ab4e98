"""What an engine step costs, as features a linear model can price (``stages.profiler`` fits it,
the router evaluates it: both sides import this module).

One model prices every step, prefill chunks and decodes together:

    seconds = base + new_tokens * c1 + attn_kilopairs * c2 + decode_seqs * c3 + decode_ctx_ktokens * c4

``new_tokens`` are the prompt (or recomputed) tokens the step computes; ``attn_kilopairs`` the
query-key pairs their attention visits (n * (cached + n / 2) per chunk, in thousands: the
quadratic part of a long prefill, and what cached tokens still cost); ``decode_seqs`` the
sequences drawing one token; ``decode_ctx_ktokens`` the context those read (thousands). No torch.
"""

from __future__ import annotations

STEP_FEATURES = ("base", "new_tokens", "attn_kilopairs", "decode_seqs", "decode_ctx_ktokens")
ENCODE_FEATURES = ("base", "images", "image_tokens")


def step_features(scheduled) -> tuple[float, ...]:
    """Features of one step from the scheduler's ``ScheduledSeq`` list (before it runs)."""
    new = attn = dseqs = dctx = 0.0
    for s in scheduled:
        n, done = s.num_new_tokens, s.seq.num_computed_tokens
        if n == 1 and done > 0:  # one token on top of a computed context: a decode
            dseqs += 1
            dctx += done + 1
        else:
            new += n
            attn += n * (done + n / 2)
    return (1.0, new, attn / 1e3, dseqs, dctx / 1e3)


def prefill_features(new_tokens: int, cached_tokens: int = 0) -> tuple[float, ...]:
    """Features of a prefill step computing ``new_tokens`` on top of ``cached_tokens``."""
    return (1.0, float(new_tokens), new_tokens * (cached_tokens + new_tokens / 2) / 1e3, 0.0, 0.0)


def decode_features(batch: int, context_tokens: int) -> tuple[float, ...]:
    return (1.0, 0.0, 0.0, float(batch), context_tokens / 1e3)


def encode_features(images: int, image_tokens: int) -> tuple[float, ...]:
    return (1.0, float(images), float(image_tokens))


def predict(coef: dict[str, float], features, names=STEP_FEATURES) -> float:
    return sum(coef.get(k, 0.0) * x for k, x in zip(names, features))
