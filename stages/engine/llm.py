"""Offline API with vLLM's call shapes: ``LLM(model).generate(prompts, params)`` and ``.chat``."""

from __future__ import annotations

import itertools
from typing import Sequence as Seq

from stages.engine.config import EngineConfig
from stages.engine.llm_engine import LLMEngine
from stages.engine.outputs import RequestOutput
from stages.engine.sampling_params import SamplingParams


class LLM:
    """Load ``model`` (a local HF-format directory) and generate in batches.

    Engine arguments are those of :class:`EngineConfig` (dtype, device,
    load_format, block_size, num_kv_blocks, max_num_seqs, ...).
    """

    def __init__(self, model: str, **engine_args):
        self.engine = LLMEngine(EngineConfig.from_kwargs(model, **engine_args))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in prompt order.

        A prompt is a str, a list of token ids, or a dict with ``prompt`` or
        ``prompt_token_ids`` and optionally ``multi_modal_data={"image": [...]}``.
        A request that is invalid raises before any request is queued.
        """
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        if not isinstance(params, SamplingParams):
            if len(params) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        else:
            params = [params] * len(prompts)
        ids = [f"offline-{next(self._ids)}" for _ in prompts]
        added = []
        try:
            for rid, prompt, p in zip(ids, prompts, params):
                self.engine.add_request(rid, prompt, p)
                added.append(rid)
        except Exception:
            for rid in added:
                self.engine.abort_request(rid)
            raise
        return self._run(ids)

    def chat(self, messages, sampling_params: SamplingParams | None = None,
             add_generation_prompt: bool = True, chat_template: str | None = None) -> list[RequestOutput]:
        """OpenAI-style messages (one conversation or a list of them) -> outputs.

        Content parts of type ``image_url`` (data URLs or local paths) or
        ``image`` (a PIL image under ``"image"``) become the prompt's images.
        """
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self.engine.inputs.render_chat(conv, add_generation_prompt, chat_template) for conv in convs]
        return self.generate(prompts, sampling_params)

    def _run(self, ids: list[str]) -> list[RequestOutput]:
        final: dict[str, RequestOutput] = {}
        pending = set(ids)
        while pending:
            for out in self.engine.step():
                if out.finished:
                    final[out.request_id] = out
                    pending.discard(out.request_id)
            if pending and not self.engine.has_unfinished_requests():
                raise RuntimeError(f"engine stopped with {len(pending)} requests unfinished")
        return [final[i] for i in ids]
