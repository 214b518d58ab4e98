"""Turns one step's logits into next tokens, with vLLM v1 semantics.

Per row, in order: penalties (repetition over prompt+output, frequency/presence over
output), min_tokens masking of eos/stop ids, then either argmax (greedy rows) or
temperature -> min_p -> top_k -> top_p -> a draw. Logprobs are always taken from the
raw logits, before any of this, as vLLM v1 does by default.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from stages.engine.sampling_params import SamplingParams

_NEG_INF = float("-inf")


@dataclass
class TokenLogprobs:
    sampled_logprob: float
    sampled_rank: int  # 1-based rank of the sampled token under the raw distribution
    top_ids: list[int]  # params.logprobs most likely ids, most likely first
    top_logprobs: list[float]


@dataclass
class SampleRequest:
    """One row of the batch. `generator` is None for unseeded requests (shared RNG)."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    generator: torch.Generator | None = None


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]  # None where the row's params.logprobs is None


def make_generator(params: SamplingParams, device: torch.device | str) -> torch.Generator | None:
    """The per-request generator for a seeded request; create once, reuse every step.

    It must live on the device the logits live on; the same seed gives different
    streams on CPU and CUDA.
    """
    if params.seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed)
    return generator


def advance_generator(generator: torch.Generator | None, draws: int, vocab: int,
                      device: torch.device | str) -> None:
    """Move a seeded generator past ``draws`` tokens, consuming what `_draw` consumes per token
    (one U[0, 1) float32 row of ``vocab``), so a request rebuilt elsewhere from its tokens draws
    what its first worker would have drawn next."""
    if generator is None or draws <= 0:
        return
    row = torch.empty(vocab, dtype=torch.float32, device=device)
    for _ in range(draws):
        row.uniform_(generator=generator)


def _on(device: torch.device, values, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A small host list as a tensor on ``device`` without waiting for the device's queue:
    ``torch.tensor(..., device="cuda")`` synchronizes the stream, which would stall the host
    behind a decode step queued ahead (``stages/engine/lookahead.py``). A non-blocking copy
    from pageable memory is staged at once, so the host list may go right away."""
    t = torch.tensor(values, dtype=dtype)
    return t if device.type == "cpu" else t.to(device, non_blocking=True)


def _index(rows: Sequence[int], device: torch.device) -> torch.Tensor:
    return _on(device, rows, torch.long)


def _token_counts(seqs_per_row: list[tuple[Sequence[int], ...]], vocab: int,
                  device: torch.device) -> torch.Tensor:
    """[rows, vocab] float32 occurrence counts; ids >= vocab are ignored."""
    # One spare column absorbs out-of-range ids so a single index_put_ handles every row.
    counts = torch.zeros(len(seqs_per_row), vocab + 1, device=device)
    parts = [torch.as_tensor(s, dtype=torch.long) for seqs in seqs_per_row for s in seqs]
    lengths = [sum(len(s) for s in seqs) for seqs in seqs_per_row]
    if sum(lengths):
        ids = torch.cat(parts).to(device).clamp_(0, vocab)
        row = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(device)
        counts.index_put_((row, ids), torch.ones((), device=device), accumulate=True)
    return counts[:, :vocab]


def apply_penalties(logits: torch.Tensor, rows: Sequence[SampleRequest]) -> None:
    """In place, row i of `logits` belonging to rows[i].

    Repetition penalty (HF/vLLM): for ids seen in prompt or output, positive logits are
    divided and the others multiplied. Then `logits -= frequency * count` and
    `logits -= presence * (count > 0)` over output ids only.
    """
    vocab, device = logits.shape[1], logits.device
    rep = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
    if rep:
        seen = _token_counts([(rows[i].prompt_token_ids, rows[i].output_token_ids) for i in rep],
                             vocab, device) > 0
        penalty = _on(device, [rows[i].params.repetition_penalty for i in rep])
        penalty = penalty.unsqueeze(1)
        idx = _index(rep, device)
        sub = logits[idx]
        logits[idx] = torch.where(seen, torch.where(sub > 0, sub / penalty, sub * penalty), sub)
    fp = [i for i, r in enumerate(rows)
          if r.params.frequency_penalty != 0.0 or r.params.presence_penalty != 0.0]
    if fp:
        counts = _token_counts([(rows[i].output_token_ids,) for i in fp], vocab, device)
        freq = _on(device, [rows[i].params.frequency_penalty for i in fp])
        pres = _on(device, [rows[i].params.presence_penalty for i in fp])
        idx = _index(fp, device)
        sub = logits[idx]
        sub -= freq.unsqueeze(1) * counts
        sub -= pres.unsqueeze(1) * (counts > 0)
        logits[idx] = sub


def apply_min_p(logits: torch.Tensor, min_p: Sequence[float]) -> torch.Tensor:
    """Drop ids whose probability is below min_p * (top probability); in place."""
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * _on(logits.device, list(min_p)).unsqueeze(1)
    return logits.masked_fill_(probs < threshold, _NEG_INF)


def apply_top_k(logits: torch.Tensor, top_k: Sequence[int]) -> torch.Tensor:
    """Keep the top_k[i] largest logits of row i (ties with the k-th kept); in place.

    Every top_k[i] must be >= 1. Cheaper than a full sort when top_p is off.
    """
    ks = [min(k, logits.shape[1]) for k in top_k]
    k = _on(logits.device, ks)
    values = logits.topk(max(ks), dim=-1).values  # max from the list: no device sync
    threshold = values.gather(1, (k - 1).unsqueeze(1))
    return logits.masked_fill_(logits < threshold, _NEG_INF)


def apply_top_k_top_p(logits: torch.Tensor, top_k: Sequence[int],
                      top_p: Sequence[float]) -> torch.Tensor:
    """top_k (0 = off) then top_p (1.0 = off) over the renormalised survivors.

    Same surviving sets as HF's TopKLogitsWarper followed by TopPLogitsWarper: the
    smallest-probability ids whose cumulative mass is <= 1 - top_p are dropped, and
    the most likely id always survives. Returns a new tensor.
    """
    vocab, device = logits.shape[1], logits.device
    ordered, order = logits.sort(dim=-1)  # ascending
    k = _on(device, [min(k, vocab) if k > 0 else vocab for k in top_k])
    kth = ordered.gather(1, (vocab - k).unsqueeze(1))
    ordered.masked_fill_(ordered < kth, _NEG_INF)
    # 1 - p computed in double, then rounded, as HF's python-float comparison does.
    mass_to_drop = _on(device, [1.0 - p for p in top_p]).unsqueeze(1)
    drop = ordered.softmax(dim=-1).cumsum_(dim=-1) <= mass_to_drop
    drop[:, -1] = False
    ordered.masked_fill_(drop, _NEG_INF)
    return ordered.scatter(1, order, ordered)


def _needs_processing(row: SampleRequest) -> bool:
    p = row.params
    return (p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0
            or len(row.output_token_ids) < p.min_tokens)


class Sampler:
    """Samples one token per row of a [B, V] logits tensor; never modifies the input.

    `eos_token_ids` are the model's end-of-sequence ids; with a row's stop_token_ids they
    are masked while the row has fewer than min_tokens outputs (whatever ignore_eos says,
    as in vLLM). Stopping on them is the engine's job, not the sampler's.
    """

    def __init__(self, eos_token_ids: Iterable[int] = ()):
        self.eos_token_ids = frozenset(eos_token_ids)

    def __call__(self, logits: torch.Tensor, rows: list[SampleRequest]) -> SampleResult:
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits {tuple(logits.shape)} do not match {len(rows)} rows")
        want_logprobs = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        tokens = self.sample(logits, rows)
        return SampleResult(tokens.tolist(), _logprobs(logits, rows, want_logprobs, tokens))

    def sample(self, logits: torch.Tensor, rows: list[SampleRequest]) -> torch.Tensor:
        """The sampled ids [B] on the logits' device, without waiting for them."""
        batch = len(rows)
        greedy = [i for i, r in enumerate(rows) if r.params.greedy]
        processed = [_needs_processing(r) for r in rows]
        if len(greedy) == batch and not any(processed):
            return logits.argmax(dim=-1)

        tokens = torch.empty(batch, dtype=torch.long, device=logits.device)
        if greedy:
            x = self._prepare(logits, greedy, rows, writable=any(processed[i] for i in greedy))
            tokens[_index(greedy, logits.device)] = x.argmax(dim=-1)
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        if sampled:
            x = self._prepare(logits, sampled, rows, writable=any(processed[i] for i in sampled))
            tokens[_index(sampled, logits.device)] = _draw(x, [rows[i] for i in sampled],
                                                           owned=x is not logits)
        return tokens

    def _prepare(self, logits: torch.Tensor, idx: list[int], rows: list[SampleRequest],
                 writable: bool) -> torch.Tensor:
        """float32 logits of rows `idx` after penalties and min_tokens masking."""
        if len(idx) == logits.shape[0]:
            x = logits.to(torch.float32, copy=writable)
        else:
            x = logits[_index(idx, logits.device)].float()
        if not writable:
            return x
        group = [rows[i] for i in idx]
        apply_penalties(x, group)
        self._mask_min_tokens(x, group)
        return x

    def _mask_min_tokens(self, x: torch.Tensor, rows: list[SampleRequest]) -> None:
        row_idx: list[int] = []
        tok_idx: list[int] = []
        for i, r in enumerate(rows):
            if len(r.output_token_ids) < r.params.min_tokens:
                for t in self.eos_token_ids.union(r.params.stop_token_ids):
                    if t < x.shape[1]:
                        row_idx.append(i)
                        tok_idx.append(t)
        if row_idx:
            x[_index(row_idx, x.device), _index(tok_idx, x.device)] = _NEG_INF


def _filter_rows(x: torch.Tensor, idx: list[int],
                 fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply `fn` to the rows `idx` of x only (gather/scatter unless that is every row)."""
    if len(idx) == x.shape[0]:
        return fn(x)
    index = _index(idx, x.device)
    x[index] = fn(x[index])
    return x


def _draw(x: torch.Tensor, rows: list[SampleRequest], owned: bool) -> torch.Tensor:
    """Temperature, min_p, top_k, top_p, then one draw per row; an `owned` x is consumed."""
    temperature = _on(x.device, [r.params.temperature for r in rows]).unsqueeze(1)
    x = x.div_(temperature) if owned else x.div(temperature)
    params = [r.params for r in rows]
    min_p_rows = [i for i, p in enumerate(params) if p.min_p > 0]
    if min_p_rows:
        x = _filter_rows(x, min_p_rows, lambda t: apply_min_p(t, [params[i].min_p for i in min_p_rows]))
    k_only = [i for i, p in enumerate(params) if p.top_k > 0 and p.top_p >= 1.0]
    if k_only:
        x = _filter_rows(x, k_only, lambda t: apply_top_k(t, [params[i].top_k for i in k_only]))
    with_p = [i for i, p in enumerate(params) if p.top_p < 1.0]
    if with_p:
        x = _filter_rows(x, with_p, lambda t: apply_top_k_top_p(
            t, [params[i].top_k for i in with_p], [params[i].top_p for i in with_p]))
    probs = x.softmax(dim=-1)

    # Exponential race: argmax(p / q) with q ~ Exp(1) is a draw from p. Each seeded row
    # draws from its own generator, so its tokens do not depend on the rest of the batch.
    # q = -log(u) with u ~ U[0, 1): several times faster than exponential_() on CPU.
    u = torch.empty_like(probs)
    unseeded = [i for i, r in enumerate(rows) if r.generator is None]
    if len(unseeded) == len(rows):
        u.uniform_()
    else:
        if unseeded:
            u[_index(unseeded, u.device)] = torch.rand(len(unseeded), u.shape[1], device=u.device)
        for i, r in enumerate(rows):
            if r.generator is not None:
                u[i].uniform_(generator=r.generator)
    q = u.log_().neg_()
    # A zero q (u rounded to 1) would make 0/0 = NaN, which argmax would pick.
    q.clamp_(min=torch.finfo(q.dtype).tiny)
    return probs.div_(q).argmax(dim=-1)


def _logprobs(logits: torch.Tensor, rows: list[SampleRequest], idx: list[int],
              tokens: torch.Tensor) -> list[TokenLogprobs | None]:
    out: list[TokenLogprobs | None] = [None] * len(rows)
    if not idx:
        return out
    index = _index(idx, logits.device)
    raw = logits if len(idx) == logits.shape[0] else logits[index]
    logprobs = torch.log_softmax(raw.float(), dim=-1)
    chosen = logprobs.gather(1, tokens[index].unsqueeze(1))
    ranks = ((logprobs > chosen).sum(dim=-1) + 1).tolist()
    k = max(rows[i].params.logprobs for i in idx)
    top_values, top_ids = logprobs.topk(k, dim=-1)
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    for j, (i, lp) in enumerate(zip(idx, chosen.squeeze(1).tolist())):
        n = rows[i].params.logprobs
        out[i] = TokenLogprobs(lp, ranks[j], top_ids[j][:n], top_values[j][:n])
    return out
