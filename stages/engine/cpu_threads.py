"""How many CPU threads one step's torch ops get.

An OpenMP team pays at every parallel op a barrier that waits for its slowest thread. When
the step is small (a few decodes of a small model: ~100 ops of a few microseconds) or when
another process holds the other core (the router, the client, another worker on a 2-core
host), that barrier waits for a descheduled thread and costs more than the op: on this
2-core machine a tiny-LLaVA decode step of 8 sequences took ~10x the CPU time with 2 threads
than with 1 while other processes ran (perf/RESULTS.md). So a step whose arithmetic is below
``min_flops`` runs on one thread, a larger one on the configured count, and the count in
force outside a step is left as it was.
"""

from __future__ import annotations

import contextlib

import torch


def step_flops(params: int, attn_width: int, layers: int, q_lens, ctx_lens) -> float:
    """Multiply-adds x2 of one forward: the weights once per token, attention over each
    token's context (q.k and p.v: 4 x context x heads x head_dim per token and layer)."""
    # Plain Python: for the few sequences of a step it is cheaper than building numpy arrays.
    pairs = sum(q * c for q, c in zip(q_lens, ctx_lens))
    return 2.0 * params * sum(q_lens) + 4.0 * attn_width * layers * pairs


class StepThreads:
    """Picks the thread count per step (CPU only; elsewhere a no-op)."""

    def __init__(self, device: torch.device, min_flops: float):
        # The count configured when the engine is built (the worker's --threads) is the most a
        # step gets; it is read here because the engine thread's own OpenMP setting may differ.
        self.max_threads = torch.get_num_threads() if device.type == "cpu" else 1
        self.min_flops = min_flops

    @contextlib.contextmanager
    def run(self, flops: float):
        """Run the body on 1 thread if ``flops`` is below the bar, else on ``max_threads``."""
        want = self.max_threads if flops >= self.min_flops else 1
        before = torch.get_num_threads() if self.max_threads > 1 else want
        if want == before:
            yield
            return
        torch.set_num_threads(want)
        try:
            yield
        finally:
            torch.set_num_threads(before)
