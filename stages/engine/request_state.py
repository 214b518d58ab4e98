"""Per-request state the engine keeps beside the scheduler's ``Sequence``."""

from __future__ import annotations

from stages.engine.detokenizer import IncrementalDetokenizer
from stages.engine.outputs import Logprob
from stages.engine.sequence import Sequence


class RequestState:
    """Per-request state outside the scheduler's concern: text, logprobs, generator."""

    def __init__(self, seq: Sequence, detok: IncrementalDetokenizer, generator):
        self.seq, self.detok, self.generator = seq, detok, generator
        self.text = ""
        self.prefill_only = False
        self.logprobs: list[dict[int, Logprob]] | None = [] if seq.params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.sent_text_len = 0
        self.sent_tokens = 0
