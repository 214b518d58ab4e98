"""The engine loop: admit requests, schedule a step, run it, sample, detokenize, stop.

``add_request`` checks everything a request could get wrong before it
touches the scheduler, so a bad request fails alone with a precise
``ValueError`` while the others carry on.
"""

from __future__ import annotations

import logging
import time
from collections import deque

import torch

from bus.step_cost import step_features
from stages.engine.block_manager import BlockManager
from stages.engine.config import EngineConfig
from stages.engine.detokenizer import IncrementalDetokenizer, find_stop_string, stop_string_holdback
from stages.engine.handoff import Handoff
from stages.engine.input_processor import InputProcessor
from stages.engine.lookahead import DecodeLookahead
from stages.engine.model_runner import ModelRunner
from stages.engine.outputs import CompletionOutput, Logprob, RequestOutput
from stages.engine.sampler import SampleRequest, Sampler, advance_generator, make_generator
from stages.engine.sampling_params import SamplingParams
from stages.engine.scheduler import Scheduler
from stages.engine.request_state import RequestState
from stages.engine.sequence import Sequence
from stages.models.loader import load_hf_config, resolve_device, resolve_dtype
from stages.models.registry import model_class

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        from transformers import AutoTokenizer

        self.config = config
        self.hf_config = load_hf_config(config.model)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        torch.manual_seed(config.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(config.model, local_files_only=True)
        cls = model_class(self.hf_config.model_type)
        support = cls.image_support(config.model, self.hf_config) if cls.is_multimodal else None
        self.inputs = InputProcessor(self.tokenizer, support, config.max_images_per_prompt)
        self.runner = ModelRunner(config, self.hf_config, self.device, self.dtype)
        self.max_model_len = self.context_len()
        text_cfg = getattr(self.hf_config, "text_config", None) or self.hf_config
        self.vocab_size = text_cfg.vocab_size
        self.blocks = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.enable_chunked_prefill)
        self.eos_token_ids = self._eos_ids()
        self.sampler = Sampler(self.eos_token_ids)
        self.requests: dict[str, RequestState] = {}
        self.handoffs: dict[str, RequestState] = {}  # prefilled, holding KV blocks for a decode worker
        self.num_generated_tokens = 0
        self.idle = False  # the last step scheduled nothing (e.g. every block parked for a handoff)
        # (step features, seconds) of recent steps: the worker's cost profile and its heartbeats read them.
        self.step_samples: deque[tuple[tuple[float, ...], float]] = deque(maxlen=256)
        async_decode = config.async_decode if config.async_decode is not None else self.device.type == "cuda"
        self.lookahead = DecodeLookahead(self) if async_decode else None

    def context_len(self) -> int:
        """The longest sequence: the model's, or less if the KV pool holds fewer tokens (an
        encode worker has no pool and runs no sequence: the model's)."""
        text_cfg = getattr(self.hf_config, "text_config", None) or self.hf_config
        model_len = self.config.max_model_len or text_cfg.max_position_embeddings
        pool_tokens = self.runner.num_blocks * self.config.block_size
        if self.runner.num_blocks and pool_tokens < model_len:
            log.warning("KV pool holds %d tokens: max_model_len lowered from %d", pool_tokens, model_len)
            model_len = pool_tokens
        return model_len

    def switch_role(self, role: str) -> dict:
        """Hold what ``role`` needs and free the rest, in place (same files or same random weights):
        model parts built or dropped, the KV pool allocated or freed. Call it from the engine
        thread with no request running; a switch to encode also needs no prefilled request
        waiting for its decode worker. Returns the new memory: parts, weights_bytes, kv_bytes,
        num_blocks, role, switch_s."""
        from stages.engine.roles import switch_role

        if self.lookahead is not None:
            self.lookahead.drain()  # a step queued ahead for rows that finished meanwhile
        return switch_role(self, role)

    def _eos_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        gen = self.config.model + "/generation_config.json"
        try:
            from transformers import GenerationConfig

            eos = GenerationConfig.from_pretrained(self.config.model, local_files_only=True).eos_token_id
            ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        except OSError:
            log.info("no %s; eos from the tokenizer only", gen)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return frozenset(ids)

    # ---- admission ----------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int] | dict, params: SamplingParams | None = None,
                    images: list | None = None, prefill_only: bool = False) -> None:
        """Queue a request; raises ValueError (and queues nothing) if it cannot be served.

        ``prefill_only``: stop after the first token and hold the KV blocks for
        :meth:`export_handoff` (the prefill stage of a disaggregated deployment).
        """
        self.submit(self.prepare_request(request_id, prompt, params, images, prefill_only))

    def prepare_request(self, request_id: str, prompt: str | list[int] | dict, params: SamplingParams | None = None,
                        images: list | None = None, prefill_only: bool = False,
                        resume: tuple[list[int], int, float | None] | None = None,
                        prompt_name: str = "prompt") -> RequestState:
        """Validate and tokenize a request without queueing it (``submit`` queues it).

        Between the two a worker may look for the prompt's prefix elsewhere in the cluster.
        ``resume`` = (tokens already produced, characters of them already sent, their cumulative
        logprob) continues a request whose worker died: the scheduler recomputes prompt + tokens
        like a preempted sequence, penalties and stop strings see every token, and a seeded
        generator is first moved past the draws those tokens took.
        """
        params = params or SamplingParams()
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        split = self.inputs.split(prompt, images)
        text, token_ids, images = split.text, split.token_ids, split.images
        if not token_ids:
            raise ValueError("the prompt is empty")
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is out of range [0, {self.vocab_size})")
        processed = self.inputs.process(token_ids, images)
        n = len(processed.token_ids)
        self._check_context(n, params.max_tokens, prompt_name)
        max_tokens = self.max_model_len - n if params.max_tokens is None else params.max_tokens
        seq = Sequence(request_id, processed.token_ids, params, images=processed.images,
                       mrope_positions=processed.mrope_positions, mrope_delta=processed.mrope_delta,
                       prompt=text, arrival_time=time.monotonic(), eos_token_ids=self.eos_token_ids,
                       max_tokens=max_tokens)
        gen = make_generator(params, self.device)
        detok = IncrementalDetokenizer(self.tokenizer, processed.token_ids, params.skip_special_tokens,
                                       params.spaces_between_special_tokens)
        req = RequestState(seq, detok, gen)
        req.prefill_only = prefill_only
        if resume is not None and resume[0]:
            tokens, sent_text_len, cumulative = resume
            if prefill_only:
                raise ValueError("a resumed request runs to its end, not up to its first token")
            if n + len(tokens) >= self.max_model_len:
                raise ValueError(f"a resumed request holds {n + len(tokens)} tokens; the context is "
                                 f"{self.max_model_len}")
            seq.output_token_ids = list(tokens)
            advance_generator(gen, len(tokens), self.vocab_size, self.device)
            req.text = detok.add(seq.output_token_ids)  # replay: the text the first worker had
            req.sent_text_len, req.sent_tokens = sent_text_len, len(tokens)
            if cumulative is not None and req.logprobs is not None:
                req.cumulative_logprob = cumulative
        return req

    def _check_context(self, n: int, max_tokens: int | None, prompt_name: str) -> None:
        """vLLM's (and OpenAI's) error for a request that does not fit the context: no silent
        clamping of ``max_tokens``; without one, the prompt must leave room for a token.
        ``prompt_name`` is what the client sent ("messages" for a chat), images included."""
        limit = self.max_model_len
        head = f"This model's maximum context length is {limit} tokens. However, you requested"
        if max_tokens is None and n >= limit:
            raise ValueError(f"{head} {n} tokens in the {prompt_name}, which leaves no room for the "
                             f"completion. Please reduce the length of the {prompt_name}.")
        if max_tokens is not None and n + max_tokens > limit:
            raise ValueError(f"{head} {n + max_tokens} tokens ({n} in the {prompt_name}, {max_tokens} in "
                             f"the completion). Please reduce the length of the {prompt_name} or completion.")

    def submit(self, req: RequestState, prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> int:
        """Queue a prepared request; ``prefix`` = (KV, token ids) of its first blocks, computed
        by another worker. The prefix is checked (tokens, shape) and used only when it covers
        more than this pool already holds; returns the tokens taken from it (0 if not used).
        """
        seq = req.seq
        if seq.request_id in self.requests:
            raise ValueError(f"request id {seq.request_id!r} is already in use")
        used = 0
        if prefix is not None:
            used = self._attach_prefix(seq, *prefix)
        self.requests[seq.request_id] = req
        self.scheduler.add(seq)
        return used

    def _attach_prefix(self, seq: Sequence, kv: torch.Tensor, tokens: torch.Tensor) -> int:
        n = int(tokens.numel())
        bs = self.config.block_size
        if n == 0 or n % bs or n >= seq.num_tokens or n <= self.blocks.cached_run(seq) * bs:
            return 0
        if tokens.tolist() != seq.prompt_token_ids[:n] or tuple(kv.shape) != self.runner.kv_shape(n):
            log.warning("request %s: a fetched prefix does not match its prompt (%s tokens, kv %s); "
                        "computing it instead", seq.request_id, n, tuple(kv.shape))
            return 0
        seq.pending_kv = kv
        seq.num_computed_tokens = seq.num_cached_tokens = n
        return n

    def prefix_probe(self, req: RequestState) -> tuple[list[int], int]:
        """The prompt's full-block hashes and how many leading blocks this pool holds."""
        if not self.config.enable_prefix_caching:
            return [], 0
        return self.blocks.prefix_hashes(req.seq), self.blocks.cached_run(req.seq)

    def export_prefix(self, hashes: list[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Copy out the KV and token ids of the longest leading run of ``hashes`` held here.

        Safe to call from another thread while the engine steps, so that an asking worker need
        not wait for a step boundary: a block evicted (and maybe rewritten) while it was read is
        caught by re-checking its hash after the read, a seqlock of sorts. On a GPU the read is
        queued on the stream the engine writes on, so writes launched after the check land
        after it.
        """
        bm = self.blocks
        blocks = bm.blocks_of(hashes)
        tokens = [bm.block_tokens[b] for b in blocks]
        if not blocks or any(t is None for t in tokens):
            return None
        kv = self.runner.read_blocks(blocks)
        n = 0
        while n < len(blocks) and bm.block_hash[blocks[n]] == hashes[n]:
            n += 1
        if n == 0:
            return None
        return kv[:, :, :n * bm.block_size].contiguous(), torch.tensor([t for ts in tokens[:n] for t in ts], dtype=torch.int64)

    def abort_request(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is not None and not req.seq.is_finished:
            self.scheduler.finish(req.seq, "abort")
        held = self.handoffs.pop(request_id, None)
        if held is not None:
            self.blocks.free(held.seq)

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # ---- disaggregation: prefill hands over, decode takes over (stages/engine/disagg.py) -------
    def export_handoff(self, request_id: str) -> Handoff:
        """Package a prefilled request (``prefill_done``) for a decode worker and free its blocks."""
        from stages.engine.disagg import export_handoff

        return export_handoff(self, request_id)

    def add_prefilled(self, h: Handoff) -> None:
        """Continue a request prefilled elsewhere; its KV is written into our blocks on admission."""
        from stages.engine.disagg import add_prefilled

        add_prefilled(self, h)

    # ---- one step -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        ahead = self.lookahead
        if ahead is not None and ahead.pending is not None:
            outputs = ahead.finish()  # a step queued before the last one's tokens were read
            if outputs or ahead.pending is not None:
                return outputs
        sched = self.scheduler.schedule()
        self.idle = not sched.scheduled  # nothing can run until a call changes the state
        if not sched.scheduled:
            return []
        t0, features = time.perf_counter(), step_features(sched.scheduled)
        logits, seqs = self.runner.execute(sched.scheduled, sched.kv_loads)
        for s in sched.scheduled:
            s.seq.num_computed_tokens += s.num_new_tokens
            self.blocks.cache_full_blocks(s.seq)
        if not seqs:
            self.step_samples.append((features, time.perf_counter() - t0))
            return []
        reqs = [self.requests[s.request_id] for s in seqs]
        rows = [SampleRequest(r.seq.params, r.seq.prompt_token_ids, r.seq.output_token_ids, r.generator)
                for r in reqs]
        tokens = ahead.after_step(sched, logits, reqs) if ahead is not None else None
        if tokens is None:
            result = self.sampler(logits, rows)
            tokens, lps = result.token_ids, result.logprobs
        else:
            lps = [None] * len(tokens)
        outputs = []
        for req, token, lp in zip(reqs, tokens, lps):
            outputs.append(self._append_token(req, token, lp))
        if ahead is not None and ahead.pending is not None and all(r.seq.is_finished for r in ahead.pending.reqs):
            ahead.drain()
        self.step_samples.append((features, time.perf_counter() - t0))  # tokens are on the host by now
        return outputs

    def _append_token(self, req: RequestState, token: int, lp) -> RequestOutput:
        seq, p = req.seq, req.seq.params
        seq.output_token_ids.append(token)
        self.num_generated_tokens += 1
        if lp is not None and req.logprobs is not None:
            # vLLM's shape: the sampled token first, then the top ones by rank.
            entry = {token: Logprob(lp.sampled_logprob, lp.sampled_rank, self._piece(token))}
            for rank, (tid, val) in enumerate(zip(lp.top_ids, lp.top_logprobs), 1):
                entry.setdefault(tid, Logprob(val, rank, self._piece(tid)))
            req.logprobs.append(entry)
            req.cumulative_logprob += lp.sampled_logprob
        n_out = len(seq.output_token_ids)
        may_stop = n_out >= p.min_tokens
        if may_stop and not p.ignore_eos and token in seq.eos_token_ids:
            self.scheduler.finish(seq, "stop", None)  # the eos token's text is not part of the answer
        elif may_stop and token in p.stop_token_ids:
            self.scheduler.finish(seq, "stop", token)
        else:
            req.text += req.detok.add([token])
            if may_stop and p.stop:
                hit = find_stop_string(req.text, len(req.text) - req.sent_text_len, p.stop,
                                       p.include_stop_str_in_output)
                if hit is not None:
                    req.text = req.text[:hit[1]]
                    self.scheduler.finish(seq, "stop", hit[0])
        if not seq.is_finished and (n_out >= seq.max_tokens or seq.num_tokens >= self.max_model_len):
            self.scheduler.finish(seq, "length")
        if seq.is_finished and not isinstance(seq.stop_reason, str):
            # Release an incomplete character held back (a stop string has already cut the text).
            req.text += req.detok.flush()
        if req.prefill_only and not seq.is_finished:
            # Prefill stage: stop here, keep the KV blocks until a decode worker takes them.
            self.scheduler.finish(seq, None, keep_blocks=True)
            out = self._output(req)
            out.prefill_done = True
            self.handoffs[seq.request_id] = req
            return out
        return self._output(req)

    def _piece(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _output(self, req: RequestState) -> RequestOutput:
        seq = req.seq
        visible = len(req.text)
        if not seq.is_finished and seq.params.stop:
            # Withhold a tail that may still grow into a stop string (streaming never shows it).
            visible -= stop_string_holdback(req.text, seq.params.stop)
        visible = max(visible, req.sent_text_len)
        delta_text = req.text[req.sent_text_len:visible]
        delta_ids = seq.output_token_ids[req.sent_tokens:]
        req.sent_text_len, req.sent_tokens = visible, len(seq.output_token_ids)
        comp = CompletionOutput(0, req.text, list(seq.output_token_ids),
                                req.cumulative_logprob if req.logprobs is not None else None,
                                req.logprobs, seq.finish_reason, seq.stop_reason)
        if seq.is_finished:
            self.requests.pop(seq.request_id, None)
        return RequestOutput(seq.request_id, seq.prompt, seq.prompt_token_ids, [comp], seq.is_finished,
                             seq.num_cached_tokens, delta_text, delta_ids)

    # ---- encode stage -------------------------------------------------------------------------
    def encode_images(self, sources: list) -> list:
        """Decode, preprocess and encode images (the encode stage); cache hits are not re-encoded.

        Returns one ``PreparedImage`` per source, embedding included.
        """
        from stages.engine.input_processor import PreparedImage

        items = [self.inputs.prepare_image(src) for src in sources]
        todo = {i.content_hash: i for i in items if i.content_hash not in self.runner.encoder_cache}
        if todo:
            self.runner.encode(list(todo.values()))
        return [PreparedImage(i.content_hash, i.length, i.inputs.get("grid_thw"), self.runner.image_embedding(i))
                for i in items]
