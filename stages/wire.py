"""Engine objects <-> bus messages, in one place."""

from __future__ import annotations

from bus import messages as m
from stages.engine.handoff import Handoff
from stages.engine.outputs import RequestOutput


def output_to_delta(out: RequestOutput, tokenizer) -> m.TokenDelta:
    comp = out.outputs[0]
    logprobs = None
    if comp.logprobs is not None and out.delta_token_ids:
        logprobs = []
        for tid, entry in zip(out.delta_token_ids, comp.logprobs[-len(out.delta_token_ids):]):
            chosen = entry[tid]
            # Every entry by rank; the sampled token may sit past the requested top-k (the API slices).
            ranked = sorted(entry.items(), key=lambda kv: kv[1].rank or 0)
            logprobs.append(m.TokenLogprob(tid, chosen.decoded_token or "", chosen.logprob,
                                           [m.TopLogprob(t, lp.decoded_token or "", lp.logprob)
                                            for t, lp in ranked]))
    stop = comp.stop_reason
    return m.TokenDelta(out.request_id, out.delta_text, list(out.delta_token_ids), comp.finish_reason,
                        None if stop is None else str(stop), len(out.prompt_token_ids), len(comp.token_ids),
                        out.num_cached_tokens, logprobs)


def handoff_header(h: Handoff) -> m.HandoffHeader:
    return m.HandoffHeader(h.prompt_token_ids, h.output_token_ids, h.params, h.prompt,
                           [m.HandoffImage(i.content_hash, i.offset, i.length,
                                           list(i.grid_thw) if i.grid_thw else None) for i in h.images],
                           h.sent_text_len, h.num_cached_tokens, h.cumulative_logprob, h.generator_state)
