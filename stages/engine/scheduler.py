"""Continuous batching with chunked prefill, a token budget and preemption by recompute.

Each step spends at most ``max_num_batched_tokens``: running sequences first
(one token for a decode, a chunk for an unfinished prefill), then waiting
ones, oldest first. When the KV pool runs dry the newest running sequence
is preempted: its blocks are freed and it goes back to the front of the
queue to be recomputed from its prompt and the tokens it already produced
(the prefix cache usually gives most of them back).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from stages.engine.block_manager import BlockManager
from stages.engine.sequence import Sequence, SeqStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the known tokens, so a token is drawn."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    # Sequences admitted with KV computed elsewhere: the runner writes it into their blocks first.
    kv_loads: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 enable_chunked_prefill: bool = True):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.token_budget = max_num_batched_tokens
        self.chunked = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.token_budget
        scheduled_ids: set[int] = set()

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.blocks.allocate(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                out.scheduled.append(ScheduledSeq(seq, n))
                scheduled_ids.add(id(seq))
                budget -= n
                i += 1
                continue
            break  # seq preempted itself: nothing after it in running is left either

        if not out.preempted:
            while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
                seq = self.waiting[0]
                if seq.pending_kv is not None:
                    pass  # its prompt's KV arrives with it (num_computed_tokens already set)
                elif not seq.block_table:
                    cached = self.blocks.match_prefix(seq)
                    seq.num_computed_tokens = cached
                    if seq.num_preemptions == 0:
                        seq.num_cached_tokens = cached
                n = seq.num_tokens - seq.num_computed_tokens
                if n > budget and not self.chunked:
                    break
                n = min(n, budget)
                if not self.blocks.allocate(seq, n):
                    # Hand the matched prefix back: a waiting sequence must not sit on blocks.
                    self.blocks.free(seq)
                    if seq.pending_kv is None:
                        seq.num_computed_tokens = 0
                    break
                if seq.pending_kv is not None:
                    out.kv_loads.append(seq)
                self.waiting.popleft()
                seq.status = SeqStatus.RUNNING
                self.running.append(seq)
                out.scheduled.append(ScheduledSeq(seq, n))
                budget -= n
        return out

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str | None, stop_reason=None, keep_blocks: bool = False) -> None:
        """Release ``seq`` wherever it is (running, waiting) and mark it finished.

        ``keep_blocks`` leaves its KV blocks allocated (a prefill handing over
        to a decode worker); the caller frees them later.
        """
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if not keep_blocks:
            self.blocks.free(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason, seq.stop_reason = reason, stop_reason
