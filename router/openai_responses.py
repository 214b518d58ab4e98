"""``ApiDelta``s -> OpenAI response bodies and SSE chunks (chat and completions, ``n`` samples,
logprobs, usage), and the JSON / SSE encoding the API writes them with. Requests are parsed
in ``router.openai_protocol``.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

from router.backend import ApiDelta
from router.openai_protocol import ParsedRequest

_MIN_LOGPROB = -9999.0  # vLLM's stand-in for -inf: JSON has no infinities


def _logprob(value: float) -> float:
    return max(value, _MIN_LOGPROB) if math.isfinite(value) else _MIN_LOGPROB


class ResponseBuilder:
    """Builds one request's response body, or its SSE chunks one delta at a time.

    With ``n > 1`` each sample is a choice with its ``index``; usage counts the prompt once and
    sums the samples' completion tokens (vLLM's convention)."""

    def __init__(self, parsed: ParsedRequest, created: int | None = None):
        req = parsed.api
        self.chat = req.kind == "chat"
        self.include_usage = parsed.include_usage
        self.want_logprobs = req.sampling.get("logprobs") is not None
        self.top_n = req.sampling.get("logprobs") or 0  # workers may send more; the client asked for these
        self.token_ids = parsed.return_token_ids
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + req.request_id
        self.model = req.model
        self.created = int(time.time()) if created is None else created
        self._sent_role: set[int] = set()  # choices whose first chunk went out
        self._text_offset: dict[int, int] = {}  # completions' text_offset runs across a choice's chunks

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _logprobs(self, entries: list[dict] | None, index: int = 0) -> dict | None:
        if not self.want_logprobs:
            return None
        entries = entries or []
        if self.chat:
            def one(e: dict) -> dict:
                return {"token": e["token"], "logprob": _logprob(e["logprob"]),
                        "bytes": list(e["token"].encode("utf-8"))}
            return {"content": [{**one(e), "top_logprobs": [one(t) for t in e.get("top", [])[:self.top_n]]}
                                for e in entries]}
        offsets = []
        offset = self._text_offset.get(index, 0)
        for e in entries:
            offsets.append(offset)
            offset += len(e["token"])
        self._text_offset[index] = offset
        return {"tokens": [e["token"] for e in entries],
                "token_logprobs": [_logprob(e["logprob"]) for e in entries],
                "top_logprobs": [{t["token"]: _logprob(t["logprob"]) for t in e.get("top", [])[:self.top_n]}
                                 for e in entries],
                "text_offset": offsets}

    @staticmethod
    def usage(last: ApiDelta | list[ApiDelta]) -> dict:
        """Usage from each sample's last delta: the prompt once, the completions summed."""
        lasts = last if isinstance(last, list) else [last]
        prompt, completion = lasts[0].prompt_tokens, sum(d.completion_tokens for d in lasts)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": lasts[0].cached_tokens}}

    def chunk(self, delta: ApiDelta, index: int = 0) -> dict | None:
        """The SSE chunk for one delta of choice ``index``; None when it carries nothing to show."""
        if not (delta.text or delta.logprobs or delta.finish_reason or (self.token_ids and delta.token_ids)):
            return None
        choice: dict[str, Any] = {"index": index}
        if self.chat:
            choice["delta"] = {"content": delta.text} if delta.text else {}
            if index not in self._sent_role:  # a choice's first chunk says who speaks
                choice["delta"] = {"role": "assistant", "content": delta.text}
                self._sent_role.add(index)
        else:
            choice["text"] = delta.text
        choice["logprobs"] = self._logprobs(delta.logprobs, index)
        choice["finish_reason"] = delta.finish_reason
        if self.token_ids:
            choice["token_ids"] = list(delta.token_ids)
        out = {**self._head("chat.completion.chunk" if self.chat else "text_completion"),
               "choices": [choice]}
        if self.include_usage:
            out["usage"] = None  # OpenAI: null on every chunk but the usage one
        return out

    def usage_chunk(self, last: ApiDelta | list[ApiDelta]) -> dict:
        """The chunk after the last one when stream_options.include_usage is set
        (``last``: each sample's last delta)."""
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"),
                "choices": [], "usage": self.usage(last)}

    def response(self, deltas: list[ApiDelta]) -> dict:
        """The non-streaming body for all of a request's deltas (usually one)."""
        return self.response_n([deltas])

    def response_n(self, samples: list[list[ApiDelta]]) -> dict:
        """The non-streaming body of ``n`` samples: each one's deltas, in choice order."""
        choices = []
        for index, deltas in enumerate(samples):
            text = "".join(d.text for d in deltas)
            entries = [e for d in deltas for e in (d.logprobs or [])]
            choice: dict[str, Any] = {"index": index}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            choice["logprobs"] = self._logprobs(entries, index)
            choice["finish_reason"] = deltas[-1].finish_reason
            if self.token_ids:
                choice["token_ids"] = [t for d in deltas for t in d.token_ids]
            choices.append(choice)
        return {**self._head("chat.completion" if self.chat else "text_completion"),
                "choices": choices, "usage": self.usage([d[-1] for d in samples])}


def dumps(obj: Any) -> bytes:
    """Compact JSON; NaN/inf are refused rather than sent as invalid JSON. A lone surrogate
    (only an error message that quotes the client could hold one) becomes "?"."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"),
                      allow_nan=False).encode("utf-8", "replace")


def sse_event(obj: Any) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
