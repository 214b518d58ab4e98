"""Decode one step ahead: the GPU runs step N+1 while the host turns step N's tokens into outputs.

Without it, a decode step is strictly serial: the GPU computes, the host waits for the sampled
tokens, appends them, checks stops, detokenizes, schedules and builds the next step's inputs,
and only then does the GPU get work again (~0.6 ms idle per step at batch 1 on an H200, 12% of
a 7B step). Here, once step N's logits exist, step N+1 is queued before the host reads step
N's tokens: its input ids are step N's sampled ids, still on the device, and its rows are step N's
sequences one token further. The host then reads step N's tokens (copied out before step N+1
was queued, so the read does not wait for it) and does its bookkeeping while the GPU works.

It runs only where the result cannot differ from the serial engine's:
- a pure-decode step whose every row the sampler draws on the device alone: no logprobs,
  penalties or min_tokens masking (which read the host's token lists). Greedy rows take the
  argmax; seeded rows draw from their own generator in the same order as the serial engine, so
  their tokens are the same too; unseeded rows draw from the device's shared generator, whose
  stream (unseeded, never reproducible) also feeds the extra draw of a row that stopped;
- nothing is waiting to be admitted (a new request would join the next step in the serial
  engine; the lookahead stops and the scheduler takes over again);
- rows sure to finish by length with step N's token are left out of step N+1; rows that stop
  on EOS or a stop string, or are aborted, are dropped when step N+1's tokens are read: their
  extra token is discarded, never appended or sent.
Blocks for the extra token are allocated outside the scheduler; if the pool is short the
lookahead simply does not run (the scheduler preempts as usual on its next step). A row's
extra KV write into a block freed meanwhile is harmless: the stream runs it before any later
step that could reuse the block, and the block's slot is past every hashed (full) block.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from bus.step_cost import step_features
from stages.engine.sampler import SampleRequest
from stages.engine.scheduler import ScheduledSeq


class TokenMailbox:
    """Device token ids copied to the host without waiting for work queued after them:
    two pinned buffers used in turn (step N's is read while step N+1's is being filled)."""

    def __init__(self, device: torch.device, rows: int):
        self.device = device
        pin = device.type == "cuda"
        self.bufs = [torch.empty(rows, dtype=torch.long, pin_memory=pin) for _ in range(2)]
        self.turn = 0

    def post(self, tokens: torch.Tensor):
        """Queue the copy of ``tokens`` [b]; returns a ticket for :meth:`read`."""
        buf = self.bufs[self.turn][:tokens.shape[0]]
        self.turn ^= 1
        if self.device.type != "cuda":
            buf.copy_(tokens)
            return buf, None
        buf.copy_(tokens, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return buf, event

    @staticmethod
    def read(ticket) -> list[int]:
        buf, event = ticket
        if event is not None:
            event.synchronize()
        return buf.tolist()


@dataclass
class _InFlight:
    reqs: list  # the engine's _Request objects, in the step's row order
    tokens: torch.Tensor  # [b] on the device: the next step's input ids
    ticket: tuple  # their host copy
    features: tuple[float, ...]
    t0: float


def samples_on_device(seq) -> bool:
    """Whether the sampler needs nothing from the host for this row, this step and the next:
    no logprobs to return, no penalties or min_tokens masking over its token lists
    (min_tokens counts the outputs before this step's token)."""
    p = seq.params
    return (p.logprobs is None and p.repetition_penalty == 1.0 and p.frequency_penalty == 0.0
            and p.presence_penalty == 0.0 and len(seq.output_token_ids) >= p.min_tokens)


def _rows(reqs: list) -> list[SampleRequest]:
    return [SampleRequest(r.seq.params, r.seq.prompt_token_ids, r.seq.output_token_ids, r.generator) for r in reqs]


class DecodeLookahead:
    def __init__(self, engine):
        self.engine = engine
        self.mailbox = TokenMailbox(engine.device, engine.config.max_num_seqs)
        self.pending: _InFlight | None = None
        self.num_steps = 0  # steps run ahead (for tests and metrics)

    # ---- which rows may go one step ahead ------------------------------------------------
    def _rows_ahead(self, reqs: list) -> list[int] | None:
        """Indices of ``reqs`` to run one step ahead, or None when the lookahead must not run.
        Called with step N computed and its token not yet appended."""
        eng = self.engine
        if eng.scheduler.waiting:
            return None
        rows = []
        for i, req in enumerate(reqs):
            seq = req.seq
            if req.prefill_only or not samples_on_device(seq):
                return None
            # With step N's token appended: does the sequence end by length? Then no step N+1.
            if len(seq.output_token_ids) + 1 >= seq.max_tokens or seq.num_tokens + 1 >= eng.max_model_len:
                continue
            rows.append(i)
        if not rows:
            return None
        for i in rows:  # room for the extra token (num_computed_tokens covers step N already)
            if not eng.blocks.allocate(reqs[i].seq, 1):
                return None
        return rows

    # ---- launch ------------------------------------------------------------------------------
    def after_step(self, sched, logits: torch.Tensor, reqs: list) -> list[int] | None:
        """Called by the engine after a step with ``logits`` for ``reqs``: if the lookahead may
        run, queue the next step and return this step's tokens (else None: sample as usual)."""
        if any(s.num_new_tokens != 1 for s in sched.scheduled) or sched.kv_loads:
            return None
        if len(reqs) != len(sched.scheduled):
            return None
        rows = self._rows_ahead(reqs)
        if rows is None:
            return None
        tokens = self.engine.sampler.sample(logits, _rows(reqs))
        ticket = self.mailbox.post(tokens)
        ids = tokens if len(rows) == len(reqs) else tokens[torch.tensor(rows, device=tokens.device)]
        self._launch([reqs[i] for i in rows], ids)
        return self.mailbox.read(ticket)

    def _launch(self, reqs: list, ids: torch.Tensor) -> None:
        t0 = time.perf_counter()
        seqs = [r.seq for r in reqs]
        features = step_features([ScheduledSeq(s, 1) for s in seqs])
        logits = self.engine.runner.execute_decode(seqs, ids)
        tokens = self.engine.sampler.sample(logits, _rows(reqs))
        self.pending = _InFlight(reqs, tokens, self.mailbox.post(tokens), features, t0)
        self.num_steps += 1

    # ---- collect -----------------------------------------------------------------------------
    def finish(self) -> list:
        """Outputs of the step run ahead; queues the one after it first when it may run."""
        eng, run = self.engine, self.pending
        self.pending = None
        alive = [(i, r) for i, r in enumerate(run.reqs)
                 if not r.seq.is_finished and eng.requests.get(r.seq.request_id) is r]
        for _, r in alive:
            r.seq.num_computed_tokens += 1
            eng.blocks.cache_full_blocks(r.seq)
        if alive:
            live = [r for _, r in alive]
            rows = self._rows_ahead(live)
            if rows is not None:
                idx = [alive[j][0] for j in rows]
                ids = run.tokens if len(idx) == len(run.reqs) else run.tokens[
                    torch.tensor(idx, device=run.tokens.device)]
                self._launch([live[j] for j in rows], ids)
        tokens = self.mailbox.read(run.ticket)
        outputs = [eng._append_token(r, tokens[i], None) for i, r in alive]
        eng.step_samples.append((run.features, time.perf_counter() - run.t0))
        if self.pending is not None and all(r.seq.is_finished for r in self.pending.reqs):
            self.drain()
        return outputs

    def drain(self) -> None:
        """Wait for a step run ahead whose rows all finished meanwhile, and drop it."""
        if self.pending is not None:
            self.mailbox.read(self.pending.ticket)
            self.pending = None
