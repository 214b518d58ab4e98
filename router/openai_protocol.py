"""OpenAI request bodies -> `ApiRequest` (responses are built in `router.openai_responses`).

Validation errors are `ApiError(400, ..., param=<field path>)`; sampling fields go
through `SamplingParams`, whose messages name the field and the allowed range.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from bus.sampling_params import MAX_LOGPROBS, SamplingParams
from router.backend import ApiError, ApiRequest
from router.images import ImageResolver
from router.json_body import check_json_tree
from router.limits import ApiLimits

# Passed to SamplingParams as given (null means "default"); it checks types and ranges.
# `n` is not among them: the HTTP layer runs n samples as n requests of one sample each.
_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                    "frequency_penalty", "repetition_penalty", "min_tokens", "stop",
                    "stop_token_ids", "ignore_eos", "include_stop_str_in_output",
                    "skip_special_tokens", "spaces_between_special_tokens")
_ROLES = ("system", "developer", "user", "assistant", "tool")
_COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's legacy default; chat defaults to "until done"
# Token counts and ids travel as msgpack integers: 64 bits.
_INT64_MAX = 2**63 - 1
# Parallel samples per request: each is a request of its own on the workers.
MAX_N = 64


@dataclass
class ParsedRequest:
    """A validated request plus the response options that stay in the HTTP layer."""

    api: ApiRequest
    include_usage: bool = False
    # vLLM's extension: each choice also carries the generated token ids.
    return_token_ids: bool = False
    n: int = 1  # parallel samples, run as n requests sharing the prompt (and its cached KV)


def sample_requests(parsed: ParsedRequest) -> list[ApiRequest]:
    """The requests the backend runs for ``parsed``: itself, or one per sample when ``n > 1``
    (ids ``<id>-<i>``; a seed moves by the sample's index, as vLLM's child requests do)."""
    req = parsed.api
    if parsed.n == 1:
        return [req]
    seed = req.sampling.get("seed")
    return [dataclasses.replace(req, request_id=f"{req.request_id}-{i}",
                                sampling={**req.sampling, "seed": None if seed is None else seed + i})
            for i in range(parsed.n)]


def _short(value: Any) -> str:
    return _clip(repr(value), 80)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _bad(param: str, expected: str, value: Any) -> ApiError:
    return ApiError(400, f"{param} must be {expected}, got {_short(value)}", param=param)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _too_big(param: str, value: int) -> ApiError:
    return ApiError(400, f"{param} must fit in a 64-bit integer (at most {_INT64_MAX}), "
                         f"got {_short(value)}", param=param)


def model_of(body: dict, served_models: list[str]) -> str:
    """The model a request names; it may be left out (or null) when one model is served."""
    model = body.get("model")
    if model is None and len(served_models) == 1:
        return served_models[0]
    if not isinstance(model, str) or not model:
        raise _bad("model", "a model name (string)" + (" (several models are served)" if model is None else ""),
                   model)
    if model not in served_models:
        raise ApiError(404, f"The model `{model}` does not exist. Served models: "
                            f"{', '.join(served_models)}", param="model", code="model_not_found")
    return model


def _common(body: dict, served_models: list[str]) -> tuple[str, bool, bool]:
    """model, stream, include_usage; refuses OpenAI features this server lacks."""
    model = model_of(body, served_models)
    stream = body.get("stream")
    stream = False if stream is None else stream
    if not isinstance(stream, bool):
        raise _bad("stream", "a boolean", stream)
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise ApiError(400, "stream_options is only allowed when stream is true",
                           param="stream_options")
        if not isinstance(options, dict):
            raise _bad("stream_options", "an object", options)
        include_usage = options.get("include_usage") or False
        if not isinstance(include_usage, bool):
            raise _bad("stream_options.include_usage", "a boolean", include_usage)
    unsupported = {"echo": body.get("echo") not in (None, False),
                   "best_of": body.get("best_of") not in (None, 1),
                   "suffix": body.get("suffix") not in (None, ""),
                   "tools": bool(body.get("tools")),
                   "logit_bias": bool(body.get("logit_bias")),
                   "response_format": body.get("response_format") not in (None, {"type": "text"})}
    for name, used in unsupported.items():
        if used:
            raise ApiError(400, f"{name} is not supported by this server", param=name)
    return model, stream, include_usage


def _sampling(body: dict, kind: str, limits: ApiLimits) -> dict:
    kwargs = {k: body[k] for k in _SAMPLING_FIELDS if body.get(k) is not None}
    name = "max_tokens"
    if kind == "chat" and body.get("max_completion_tokens") is not None:
        name = "max_completion_tokens"  # the newer name wins, as in vLLM
    max_tokens = body.get(name)
    if max_tokens is None:
        max_tokens = _COMPLETIONS_DEFAULT_MAX_TOKENS if kind == "completion" else None
    elif not _is_int(max_tokens):
        raise _bad(name, "an integer", max_tokens)
    elif max_tokens < 1:
        raise ApiError(400, f"{name} must be at least 1, got {max_tokens}", param=name)
    if limits.max_tokens_cap is not None:
        max_tokens = min(max_tokens or limits.max_tokens_cap, limits.max_tokens_cap)
    kwargs["max_tokens"] = max_tokens

    logprobs = body.get("logprobs")
    if kind == "chat":
        top = body.get("top_logprobs")
        if logprobs is not None and not isinstance(logprobs, bool):
            raise _bad("logprobs", "a boolean", logprobs)
        if top is not None:
            if not _is_int(top) or not 0 <= top <= MAX_LOGPROBS:
                raise _bad("top_logprobs", f"an integer in [0, {MAX_LOGPROBS}]", top)
            if not logprobs:
                raise ApiError(400, "top_logprobs requires logprobs: true", param="top_logprobs")
        kwargs["logprobs"] = (top or 0) if logprobs else None
    elif logprobs is not None and logprobs is not False:
        kwargs["logprobs"] = logprobs
    try:
        sampling = SamplingParams(**kwargs).to_dict()
    except ValueError as e:
        field = str(e).split(" ", 1)[0]
        raise ApiError(400, _clip(str(e), 1000), param=field if field in body else None) from None
    for field in ("max_tokens", "min_tokens", "top_k"):
        value = sampling[field]
        if value is not None and value > _INT64_MAX:
            raise _too_big(name if field == "max_tokens" else field, value)
    if any(t > _INT64_MAX for t in sampling["stop_token_ids"]):
        raise _too_big("stop_token_ids", max(sampling["stop_token_ids"]))
    return sampling


def _n(body: dict) -> int:
    n = body.get("n")
    if n is None:
        return 1
    if not _is_int(n) or not 1 <= n <= MAX_N:
        raise _bad("n", f"an integer in [1, {MAX_N}]", n)
    return n


def _slo(body: dict) -> dict | None:
    """The optional ``"slo": {"ttft_ms": ..., "tpot_ms": ...}`` (positive numbers; either may be left out)."""
    slo = body.get("slo")
    if slo is None:
        return None
    if not isinstance(slo, dict) or set(slo) - {"ttft_ms", "tpot_ms"}:
        raise _bad("slo", 'an object with "ttft_ms" and/or "tpot_ms"', slo)
    for key, value in slo.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e9:
            raise _bad(f"slo.{key}", "a positive number of milliseconds", value)
    return {k: float(v) for k, v in slo.items()}


def _priority(body: dict) -> int:
    priority = body.get("priority", 0)
    if priority is None:
        return 0
    if not _is_int(priority) or abs(priority) > 1 << 31:
        raise _bad("priority", "an integer", priority)
    return priority


def _content(content: Any, param: str, images: list[tuple[Any, str]]) -> str | list[dict]:
    """Normalised content; appends (image ref, param) for each image part."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(param, "a string or a list of content parts", content)
    parts: list[dict] = []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise _bad(f"{where}.text", "a string", part.get("text"))
            parts.append({"type": "text", "text": part["text"]})
        elif kind in ("image_url", "image"):
            ref = part.get("image_url") if kind == "image_url" else (
                part.get("image") or part.get("url") or part.get("image_url"))
            images.append((ref, where))
            parts.append({"type": "image"})
        elif isinstance(part, dict):
            raise ApiError(400, f"{where}: unsupported content part type {kind!r} "
                                f"(text, image_url)", param=where)
        else:
            raise _bad(where, "a content part object", part)
    return parts


def _messages(body: dict) -> tuple[list[dict], list[tuple[Any, str]]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "a non-empty list of messages", messages)
    out: list[dict] = []
    images: list[tuple[Any, str]] = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise _bad(where, "a message object", msg)
        role = msg.get("role")
        if role not in _ROLES:
            raise _bad(f"{where}.role", f"one of {', '.join(_ROLES)}", role)
        content = msg.get("content")
        if content is None and role != "assistant":  # assistant turns may be content-less
            raise ApiError(400, f"{where}.content is required", param=f"{where}.content")
        norm = {"role": "system" if role == "developer" else role,
                "content": "" if content is None else _content(content, f"{where}.content", images)}
        for key in ("name", "tool_call_id"):
            if isinstance(msg.get(key), str):
                norm[key] = msg[key]
        out.append(norm)
    return out, images


async def parse_chat(body: dict, served_models: list[str], limits: ApiLimits,
                     resolver: ImageResolver, request_id: str,
                     arrival_time: float = 0.0) -> ParsedRequest:
    """Validate a /v1/chat/completions body; fetch and check its images (in order)."""
    check_json_tree(body)
    model, stream, include_usage = _common(body, served_models)
    messages, refs = _messages(body)
    sampling = _sampling(body, "chat", limits)
    agp = body.get("add_generation_prompt", True)
    if not isinstance(agp, bool):
        raise _bad("add_generation_prompt", "a boolean", agp)
    if len(refs) > limits.max_images_per_request:
        raise ApiError(400, f"at most {limits.max_images_per_request} images per request, "
                            f"got {len(refs)}", param="messages")
    # Counted before anything is fetched or decoded.
    images = [await resolver.resolve(ref, i, where) for i, (ref, where) in enumerate(refs)]
    req = ApiRequest(request_id=request_id, model=model, kind="chat", messages=messages,
                     prompt=None, prompt_token_ids=None, images=images, sampling=sampling,
                     stream=stream, add_generation_prompt=agp, arrival_time=arrival_time,
                     slo=_slo(body), priority=_priority(body))
    return ParsedRequest(req, include_usage, _flag(body, "return_token_ids"), _n(body))


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise _bad(name, "a boolean", value)
    return value


def _prompt(body: dict) -> tuple[str | None, list[int] | None]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and not all(_is_int(t) for t in prompt):
        if len(prompt) > 1:
            raise ApiError(400, "batched prompts are not supported; send one prompt per "
                                "request", param="prompt")
        prompt = prompt[0]  # [str] or [[ids]]: one prompt wrapped in a batch
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, list) and prompt and all(_is_int(t) and t >= 0 for t in prompt):
        if max(prompt) > _INT64_MAX:
            raise _too_big("prompt", max(prompt))
        return None, list(prompt)
    raise _bad("prompt", "a string or a non-empty list of token ids (integers >= 0)", prompt)


def parse_completion(body: dict, served_models: list[str], limits: ApiLimits,
                     request_id: str, arrival_time: float = 0.0) -> ParsedRequest:
    """Validate a /v1/completions body."""
    check_json_tree(body)
    model, stream, include_usage = _common(body, served_models)
    prompt, prompt_ids = _prompt(body)
    sampling = _sampling(body, "completion", limits)
    req = ApiRequest(request_id=request_id, model=model, kind="completion", messages=None,
                     prompt=prompt, prompt_token_ids=prompt_ids, images=[], sampling=sampling,
                     stream=stream, arrival_time=arrival_time, slo=_slo(body), priority=_priority(body))
    return ParsedRequest(req, include_usage, _flag(body, "return_token_ids"), _n(body))


# ---- /tokenize, /detokenize (vLLM's shapes) ----------------------------------------------

@dataclass
class TokenizeCall:
    """A validated /tokenize body: a chat (``messages``, image parts standing for ``images``)
    or a completion ``prompt``. ``add_special_tokens`` None: as the engine admits the request."""

    model: str
    messages: list[dict] | None
    prompt: str | None
    images: list[bytes]
    add_special_tokens: bool | None
    add_generation_prompt: bool


async def parse_tokenize(body: dict, served_models: list[str], limits: ApiLimits,
                         resolver: ImageResolver) -> TokenizeCall:
    check_json_tree(body)
    model = model_of(body, served_models)
    if ("messages" in body) == ("prompt" in body):
        raise ApiError(400, "give either messages (a chat) or prompt (a completion)", param="prompt")
    special = body.get("add_special_tokens")
    if special is not None and not isinstance(special, bool):
        raise _bad("add_special_tokens", "a boolean", special)
    if body.get("return_token_strs"):
        raise ApiError(400, "return_token_strs is not supported by this server", param="return_token_strs")
    agp = body.get("add_generation_prompt", True)
    if not isinstance(agp, bool):
        raise _bad("add_generation_prompt", "a boolean", agp)
    if "prompt" in body:
        prompt = body["prompt"]
        if not isinstance(prompt, str) or not prompt:
            raise _bad("prompt", "a non-empty string", prompt)
        return TokenizeCall(model, None, prompt, [], special, agp)
    messages, refs = _messages(body)
    if len(refs) > limits.max_images_per_request:
        raise ApiError(400, f"at most {limits.max_images_per_request} images per request, "
                            f"got {len(refs)}", param="messages")
    images = [await resolver.resolve(ref, i, where) for i, (ref, where) in enumerate(refs)]
    return TokenizeCall(model, messages, None, images, special, agp)


def parse_detokenize(body: dict, served_models: list[str]) -> tuple[str, list[int]]:
    """(model, token ids) of a /detokenize body."""
    check_json_tree(body)
    model = model_of(body, served_models)
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(_is_int(t) and 0 <= t <= _INT64_MAX for t in tokens):
        raise _bad("tokens", "a list of token ids (integers >= 0)", tokens)
    return model, tokens
