"""Disaggregation on the engine's side: a prefill worker packages a prefilled request
(``export_handoff``), a decode worker continues it (``add_prefilled``).

A request is rebuilt from what travels (prompt ids, the tokens produced, sampling parameters,
the text already sent, a seeded generator's state, the KV and image embeddings), so the decode
worker's stream continues exactly where the prefill worker's stopped.
"""

from __future__ import annotations

import time

import torch

from stages.engine.detokenizer import IncrementalDetokenizer
from stages.engine.handoff import Handoff, HandoffImage
from stages.engine.request_state import RequestState
from stages.engine.sampler import make_generator
from stages.engine.sampling_params import SamplingParams
from stages.engine.sequence import ImageItem, Sequence


def export_handoff(engine, request_id: str) -> Handoff:
    """Package a prefilled request (``prefill_done``) for a decode worker and free its blocks."""
    req = engine.handoffs.pop(request_id)
    seq = req.seq
    try:
        kv = engine.runner.read_kv(seq, seq.num_computed_tokens)
        embeds = [engine.runner.image_embedding(img) for img in seq.images]
    finally:
        engine.blocks.free(seq)
    gen = req.generator.get_state().numpy().tobytes() if req.generator is not None else None
    images = [HandoffImage(i.content_hash, i.offset, i.length, i.inputs.get("grid_thw")) for i in seq.images]
    return Handoff(request_id, list(seq.prompt_token_ids), list(seq.output_token_ids),
                   seq.params.to_dict(), seq.prompt, images, req.sent_text_len, seq.num_cached_tokens,
                   req.cumulative_logprob if req.logprobs is not None else None, gen, kv, embeds)

def add_prefilled(engine, h: Handoff) -> None:
    """Continue a request prefilled elsewhere; its KV is written into our blocks on admission."""
    if h.request_id in engine.requests:
        raise ValueError(f"request id {h.request_id!r} is already in use")
    params = SamplingParams.from_dict(h.params)
    items = [ImageItem(i.content_hash, i.offset, i.length,
                       {"grid_thw": tuple(i.grid_thw)} if i.grid_thw else {}, emb)
             for i, emb in zip(h.images, h.image_embeddings)]
    n = len(h.prompt_token_ids)
    if n + len(h.output_token_ids) > engine.max_model_len:
        raise ValueError(f"the request holds {n} tokens; this worker's context is {engine.max_model_len}")
    positions, delta = None, 0
    support = engine.inputs.images
    if support is not None:
        mrope = support.mrope_positions(h.prompt_token_ids, items)
        if mrope is not None:
            positions, delta = mrope
    room = engine.max_model_len - n
    seq = Sequence(h.request_id, list(h.prompt_token_ids), params, images=items, mrope_positions=positions,
                   mrope_delta=delta, prompt=h.prompt, arrival_time=time.monotonic(),
                   eos_token_ids=engine.eos_token_ids,
                   max_tokens=room if params.max_tokens is None else min(params.max_tokens, room))
    seq.output_token_ids = list(h.output_token_ids)
    seq.num_computed_tokens = n
    seq.num_cached_tokens = h.num_cached_tokens
    seq.pending_kv = h.kv
    gen = make_generator(params, engine.device)
    if gen is not None and h.generator_state is not None:
        gen.set_state(torch.frombuffer(bytearray(h.generator_state), dtype=torch.uint8))
    detok = IncrementalDetokenizer(engine.tokenizer, seq.prompt_token_ids, params.skip_special_tokens,
                                   params.spaces_between_special_tokens)
    req = RequestState(seq, detok, gen)
    req.text = detok.add(seq.output_token_ids)  # replay: the same text the prefill worker saw
    req.sent_text_len, req.sent_tokens = h.sent_text_len, len(seq.output_token_ids)
    if h.cumulative_logprob is not None and req.logprobs is not None:
        req.cumulative_logprob = h.cumulative_logprob
    engine.requests[h.request_id] = req
    engine.scheduler.add(seq)
