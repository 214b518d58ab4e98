"""The boundary between the HTTP layer (`router/api.py`) and whatever runs requests.

The HTTP layer parses and validates an OpenAI request into an `ApiRequest`, hands it
to a `Backend`, and turns the `ApiDelta`s it yields into OpenAI responses or SSE chunks.
Everything here is plain Python data: no sockets, no torch.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


@dataclass
class ApiRequest:
    """One validated request.

    `messages` keep OpenAI's shape ({"role", "content", optional "name"/"tool_call_id"});
    `content` is a str or a list of {"type": "text", "text": str} and {"type": "image"}
    parts, the i-th image part standing for `images[i]`. `sampling` is
    `SamplingParams(...).to_dict()` and already passed its validation.
    """

    request_id: str
    model: str
    kind: str                           # "chat" | "completion"
    messages: list[dict] | None         # chat only; image parts replaced by {"type": "image"}
    prompt: str | None                  # completions: text prompt
    prompt_token_ids: list[int] | None  # completions: token-id prompt
    images: list[bytes]                 # encoded image files, in order, already checked to decode
    sampling: dict                      # SamplingParams(...).to_dict(), validated
    stream: bool
    add_generation_prompt: bool = True
    arrival_time: float = 0.0           # time.time() when the HTTP request arrived
    slo: dict | None = None             # {"ttft_ms", "tpot_ms"} over the router's defaults
    priority: int = 0                   # higher first (carried; dispatch does not reorder yet)


@dataclass
class ApiDelta:
    """One step of output; the whole answer when the backend does not stream.

    `text`, `token_ids` and `logprobs` are what is new since the previous delta;
    `completion_tokens` is cumulative. The last delta has `finish_reason` set.
    `logprobs` has one entry per new token: {"token_id": int, "token": str,
    "logprob": float, "top": [{"token_id": int, "token": str, "logprob": float}, ...]}.
    """

    text: str
    token_ids: list[int]
    finish_reason: str | None           # "stop" | "length" | "abort" | None
    prompt_tokens: int
    completion_tokens: int              # cumulative
    cached_tokens: int = 0
    logprobs: list[dict] | None = None


class ApiError(Exception):
    """An error the client should see as an OpenAI error body with HTTP `status`.

    Use type "invalid_request_error" for 4xx, "server_error" (or another explicit
    type) for 5xx; `param` names the offending field, e.g. "messages[0].content[1]".
    """

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers  # extra HTTP headers, e.g. Retry-After on a 429

    def to_dict(self) -> dict[str, Any]:
        """The OpenAI error body: {"error": {"message", "type", "param", "code"}}."""
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}

    def __repr__(self) -> str:
        return f"ApiError({self.status}, {self.message!r}, param={self.param!r})"


@runtime_checkable
class Backend(Protocol):
    """What the HTTP layer needs from the router core.

    Contract:
    - `generate` yields deltas until one carries a `finish_reason`, then stops. It may
      raise `ApiError` before its first delta (the client gets that HTTP status) or
      later (a streaming client gets an SSE error event; a non-streaming one the
      status). Any other exception becomes a 500. When `generate` raises, the backend
      has already cleaned the request up: the HTTP layer does not call `abort`.
    - `abort(request_id)` is called exactly once when the HTTP layer walks away from a
      request that has not finished (client disconnect, handler cancelled). The
      iterator is closed (`aclose`, if it has one) before `abort` is awaited. It must
      tolerate a request that finished meanwhile.
    - `health()` is cheap and synchronous: (ready, details as a JSON-able dict).

    Optional (the API answers 501 without them; `RouterCore` has them, `router/tokenize_calls.py`):
    `async tokenize(messages, prompt, images, add_special_tokens, add_generation_prompt) -> ids`,
    `async detokenize(ids) -> str`, `model_card() -> {"root", "max_model_len"}`.
    """

    served_models: list[str]

    def generate(self, req: ApiRequest) -> AsyncIterator[ApiDelta]: ...

    async def abort(self, request_id: str) -> None: ...

    def health(self) -> tuple[bool, dict]: ...
