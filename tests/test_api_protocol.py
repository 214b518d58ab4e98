"""Units of the HTTP layer: request parsing/validation, image checks, response shapes."""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import zlib

import pytest
from PIL import Image

from bus.sampling_params import SamplingParams
from router.backend import ApiDelta, ApiError
from router.images import ImageResolver, check_image, decode_data_url
from router.limits import ApiLimits
from router.openai_protocol import ParsedRequest, parse_chat, parse_completion
from router.openai_responses import ResponseBuilder, dumps, sse_event

MODELS = ["tiny-vlm"]
LIMITS = ApiLimits()


def png_bytes(width: int = 8, height: int = 6, color=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
            + chunk(b"IEND", b""))


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_part(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(data)}}


def chat(body: dict, limits: ApiLimits = LIMITS) -> ParsedRequest:
    body = {"model": "tiny-vlm", "messages": [{"role": "user", "content": "hi"}], **body}
    return asyncio.run(parse_chat(body, MODELS, limits, ImageResolver(limits), "rid", 1.0))


def completion(body: dict, limits: ApiLimits = LIMITS) -> ParsedRequest:
    return parse_completion({"model": "tiny-vlm", "prompt": "hi", **body}, MODELS, limits, "rid")


def error_of(fn, *args) -> ApiError:
    with pytest.raises(ApiError) as info:
        fn(*args)
    return info.value


# ---- chat parsing ----------------------------------------------------------------------------

def test_chat_messages_and_images_in_order():
    red, blue = png_bytes(color=(255, 0, 0)), png_bytes(4, 4, (0, 0, 255))
    parsed = chat({"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "compare"}, image_part(red),
                                     {"type": "image", "image": data_url(blue)}]},
        {"role": "assistant", "content": None},
        {"role": "developer", "content": "x", "name": "dev"}]})
    req = parsed.api
    assert req.kind == "chat" and req.request_id == "rid" and req.arrival_time == 1.0
    assert req.messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "compare"}, {"type": "image"},
                                     {"type": "image"}]},
        {"role": "assistant", "content": ""},
        {"role": "system", "content": "x", "name": "dev"}]
    assert req.images == [red, blue]
    assert req.prompt is None and req.prompt_token_ids is None and req.add_generation_prompt


def test_chat_sampling_goes_through_sampling_params():
    parsed = chat({"temperature": 0.5, "top_p": 0.9, "top_k": 5, "seed": 7, "stop": "x",
                   "max_completion_tokens": 9, "max_tokens": 100, "logprobs": True,
                   "top_logprobs": 3, "ignore_eos": True, "stop_token_ids": [2],
                   "min_tokens": 1, "repetition_penalty": 1.1, "presence_penalty": None})
    expected = SamplingParams(temperature=0.5, top_p=0.9, top_k=5, seed=7, stop="x",
                              max_tokens=9, logprobs=3, ignore_eos=True, stop_token_ids=[2],
                              min_tokens=1, repetition_penalty=1.1).to_dict()
    assert parsed.api.sampling == expected
    assert chat({}).api.sampling["max_tokens"] is None  # chat: until done
    assert chat({"logprobs": True}).api.sampling["logprobs"] == 0
    assert chat({"logprobs": False}).api.sampling["logprobs"] is None


def test_max_tokens_cap_clamps():
    capped = ApiLimits(max_tokens_cap=50)
    assert chat({}, capped).api.sampling["max_tokens"] == 50
    assert chat({"max_tokens": 500}, capped).api.sampling["max_tokens"] == 50
    assert chat({"max_tokens": 5}, capped).api.sampling["max_tokens"] == 5


@pytest.mark.parametrize("body, param, text", [
    ({"model": 5}, "model", "model must be"),
    ({"model": 3}, "model", "model must be"),
    ({"messages": None}, "messages", "messages must be a non-empty list"),
    ({"messages": []}, "messages", "messages must be a non-empty list"),
    ({"messages": ["hi"]}, "messages[0]", "must be a message object"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "one of"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "is required"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "a string or a list"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]},
     "messages[0].content[0]", "unsupported content part type 'audio'"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]},
     "messages[0].content[0].text", "must be a string"),
    ({"max_tokens": 0}, "max_tokens", "max_tokens must be at least 1, got 0"),
    ({"max_tokens": -3}, "max_tokens", "at least 1"),
    ({"max_completion_tokens": 0}, "max_completion_tokens", "at least 1"),
    ({"max_tokens": "5"}, "max_tokens", "an integer"),
    ({"temperature": "hot"}, "temperature", "temperature must be a number, got 'hot'"),
    ({"temperature": -1}, "temperature", "temperature must be >= 0"),
    ({"top_p": 0}, "top_p", "top_p must be in (0, 1]"),
    ({"n": 0}, "n", "n must be an integer in [1, 64]"),
    ({"stop": 3}, "stop", "stop must be"),
    ({"seed": 1.5}, "seed", "seed must be an integer"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens", "min_tokens must be <= max_tokens"),
    ({"logprobs": 1}, "logprobs", "logprobs must be a boolean"),
    ({"top_logprobs": 2}, "top_logprobs", "requires logprobs: true"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "in [0, 20]"),
    ({"stream": "yes"}, "stream", "stream must be a boolean"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed when stream"),
    ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage",
     "a boolean"),
    ({"tools": [{"type": "function"}]}, "tools", "not supported"),
    ({"add_generation_prompt": "no"}, "add_generation_prompt", "a boolean"),
])
def test_chat_validation_errors(body, param, text):
    err = error_of(chat, body)
    assert (err.status, err.param, err.type) == (400, param, "invalid_request_error")
    assert text in err.message


def test_unknown_model_is_404():
    err = error_of(chat, {"model": "gpt-9"})
    assert (err.status, err.code, err.param) == (404, "model_not_found", "model")
    assert "gpt-9" in err.message


def test_stream_options():
    assert chat({"stream": True, "stream_options": {"include_usage": True}}).include_usage
    assert not chat({"stream": True}).include_usage


# What the wire (msgpack) cannot carry, or what is not text, is the client's fault: a 400 naming
# the field, never a 500 from deeper down.
_HUGE = 10 ** 30


@pytest.mark.parametrize("parse, body, param, text", [
    (chat, {"max_tokens": _HUGE}, "max_tokens", "64-bit"),
    (chat, {"max_completion_tokens": 2 ** 63}, "max_completion_tokens", "64-bit"),
    (chat, {"min_tokens": _HUGE}, "min_tokens", "64-bit"),
    (chat, {"top_k": _HUGE}, "top_k", "64-bit"),
    (chat, {"stop_token_ids": [1, _HUGE]}, "stop_token_ids", "64-bit"),
    (completion, {"max_tokens": _HUGE}, "max_tokens", "64-bit"),
    (completion, {"prompt": [1, _HUGE]}, "prompt", "64-bit"),
    (completion, {"prompt": [[_HUGE]]}, "prompt", "64-bit"),
    (completion, {"prompt": "a\ud800b"}, "prompt", "lone surrogate"),
    (completion, {"stop": ["ok", "\udfff"]}, "stop[1]", "lone surrogate"),
    (chat, {"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content",
     "lone surrogate"),
    (chat, {"messages": [{"role": "user", "content": [{"type": "text", "text": "x\udc00"}]}]},
     "messages[0].content[0].text", "lone surrogate"),
    (chat, {"messages": [{"role": "user", "content": "x", "name": "\ud800"}]},
     "messages[0].name", "lone surrogate"),
    (chat, {"user": "\ud800"}, "user", "lone surrogate"),
    (chat, {"stream": 0}, "stream", "a boolean"),
    (chat, {"stream": ""}, "stream", "a boolean"),
    (completion, {"stream": []}, "stream", "a boolean"),
])
def test_values_the_wire_cannot_carry_are_400(parse, body, param, text):
    err = error_of(parse, body)
    assert (err.status, err.param, err.type) == (400, param, "invalid_request_error")
    assert text in err.message


def test_dumps_never_fails_on_text():
    assert dumps({"error": {"message": "bad \ud800 \u00e9"}}) == '{"error":{"message":"bad ? \u00e9"}}'.encode()


def test_large_but_valid_numbers_pass():
    assert chat({"max_tokens": 2 ** 63 - 1}).api.sampling["max_tokens"] == 2 ** 63 - 1
    assert chat({"seed": 2 ** 64 - 1}).api.sampling["seed"] == 2 ** 64 - 1  # torch's range
    assert chat({"messages": [{"role": "user", "content": "\U0001f600 \u00e9"}]}).api.messages[0][
        "content"] == "\U0001f600 \u00e9"


# ---- images ----------------------------------------------------------------------------------

def image_error(part: dict, limits: ApiLimits = LIMITS) -> ApiError:
    content = [{"type": "text", "text": "look"}, part]
    return error_of(chat, {"messages": [{"role": "user", "content": content}]}, limits)


def test_invalid_base64_names_the_part():
    err = image_error({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}})
    assert (err.status, err.param) == (400, "messages[0].content[1]")
    assert "messages[0].content[1]" in err.message and "not valid base64" in err.message


def test_data_url_tolerates_wrapping_and_missing_padding():
    data = png_bytes()
    encoded = base64.b64encode(data).decode().rstrip("=")
    wrapped = "\n".join(encoded[i:i + 60] for i in range(0, len(encoded), 60))
    assert decode_data_url(f"data:image/png;base64,{wrapped}", 0, "p") == data
    assert "base64-encoded" in error_of(decode_data_url, "data:image/png,abc", 0, "p").message


def test_not_an_image():
    err = image_error(image_part(b"hello, I am text"))
    assert err.status == 400 and err.param == "messages[0].content[1]"
    assert err.message.startswith("image 0 could not be decoded: ")


def test_decompression_bomb_refused():
    # 50000x50000 trips PIL's own bomb guard, 5000x5000 only ours (16.7 Mpx); both 400.
    for size in (50000, 5000):
        err = image_error(image_part(png_header_only(size, size)))
        assert err.status == 400 and "image 0 could not be decoded" in err.message
    check_image(png_bytes(), LIMITS, 0, "p")  # a small real image passes
    with pytest.raises(ApiError, match="more than the limit of 100"):
        check_image(png_bytes(20, 20), ApiLimits(max_image_pixels=100), 0, "p")


def test_too_many_images():
    parts = [image_part(png_bytes())] * 3
    err = error_of(chat, {"messages": [{"role": "user", "content": parts}]},
                   ApiLimits(max_images_per_request=2))
    assert (err.status, err.param) == (400, "messages") and "at most 2 images" in err.message


def test_remote_urls_refused_when_off_and_other_schemes_never_fetched():
    err = image_error({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}})
    assert err.status == 400 and "remote image URLs are disabled on this server" in err.message
    for url in ("file:///etc/passwd", "ftp://example.com/a.png"):
        err = image_error({"type": "image_url", "image_url": url},
                          ApiLimits(remote_images="any"))
        assert "unsupported image URL scheme" in err.message


def test_limits():
    lim = ApiLimits(remote_images="allowlist", allowed_domains=("Example.com",))
    assert lim.domain_allowed("example.com") and lim.domain_allowed("img.example.com")
    assert not lim.domain_allowed("badexample.com") and not lim.domain_allowed("example.org")
    with pytest.raises(ValueError):
        ApiLimits(remote_images="sometimes")
    with pytest.raises(ValueError):
        ApiLimits(remote_images="allowlist")


# ---- completions parsing ---------------------------------------------------------------------

def test_completion_prompts():
    assert completion({}).api.prompt == "hi"
    assert completion({}).api.sampling["max_tokens"] == 16
    assert completion({"prompt": [1, 2, 3]}).api.prompt_token_ids == [1, 2, 3]
    assert completion({"prompt": ["one"]}).api.prompt == "one"
    assert completion({"prompt": [[4, 5]]}).api.prompt_token_ids == [4, 5]
    assert completion({"logprobs": 2}).api.sampling["logprobs"] == 2
    for batch in (["a", "b"], [[1], [2]]):
        err = error_of(completion, {"prompt": batch})
        assert (err.status, err.param) == (400, "prompt")
        assert "batched prompts are not supported" in err.message
    for bad in (None, [], [-1], 5, [1.5], [True]):
        assert error_of(completion, {"prompt": bad}).param == "prompt"
    assert error_of(completion, {"logprobs": 30}).param == "logprobs"
    assert error_of(completion, {"echo": True}).param == "echo"


# ---- responses -------------------------------------------------------------------------------

def lp_entry(tid: int, token: str, lp: float, top: int = 1) -> dict:
    return {"token_id": tid, "token": token, "logprob": lp,
            "top": [{"token_id": tid + k, "token": token + str(k), "logprob": lp - k}
                    for k in range(top)]}


def test_chat_response_and_chunks():
    parsed = chat({"stream": True, "stream_options": {"include_usage": True}, "logprobs": True,
                   "top_logprobs": 1})
    b = ResponseBuilder(parsed, created=123)
    d1 = ApiDelta("Hé", [5], None, 7, 1, 2, [lp_entry(5, "Hé", -0.5)])
    d2 = ApiDelta("", [6], None, 7, 2, 2, None)
    d3 = ApiDelta("!", [7], "stop", 7, 3, 2, [lp_entry(7, "!", float("-inf"))])
    c1 = b.chunk(d1)
    assert c1["id"] == "chatcmpl-rid" and c1["object"] == "chat.completion.chunk"
    assert c1["choices"][0]["delta"] == {"role": "assistant", "content": "Hé"}
    assert c1["usage"] is None and c1["created"] == 123
    assert c1["choices"][0]["logprobs"]["content"][0] == {
        "token": "Hé", "logprob": -0.5, "bytes": list("Hé".encode()),
        "top_logprobs": [{"token": "Hé0", "logprob": -0.5, "bytes": list(b"H\xc3\xa90")}]}
    assert b.chunk(d2) is None  # nothing to show (text held back)
    c3 = b.chunk(d3)
    assert c3["choices"][0]["delta"] == {"content": "!"}
    assert c3["choices"][0]["finish_reason"] == "stop"
    assert c3["choices"][0]["logprobs"]["content"][0]["logprob"] == -9999.0
    usage = b.usage_chunk(d3)
    assert usage["choices"] == [] and usage["usage"] == {
        "prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10,
        "prompt_tokens_details": {"cached_tokens": 2}}
    full = ResponseBuilder(chat({"logprobs": True}), created=1).response([d1, d2, d3])
    assert full["object"] == "chat.completion"
    assert full["choices"][0]["message"] == {"role": "assistant", "content": "Hé!"}
    assert full["choices"][0]["finish_reason"] == "stop"
    assert len(full["choices"][0]["logprobs"]["content"]) == 2
    assert full["usage"]["total_tokens"] == 10
    assert sse_event({"a": "é"}) == 'data: {"a":"é"}\n\n'.encode()


def test_completion_response_logprobs():
    b = ResponseBuilder(completion({"logprobs": 2, "stream": True}), created=1)
    c1 = b.chunk(ApiDelta("ab", [1, 2], None, 3, 2, 0, [lp_entry(1, "a", -1.0, 2),
                                                       lp_entry(2, "b", -2.0, 2)]))
    c2 = b.chunk(ApiDelta("c", [3], "length", 3, 3, 0, [lp_entry(3, "c", -3.0, 2)]))
    assert c1["id"] == "cmpl-rid" and c1["object"] == "text_completion" and "usage" not in c1
    assert c1["choices"][0]["text"] == "ab"
    assert c1["choices"][0]["logprobs"] == {"tokens": ["a", "b"], "token_logprobs": [-1.0, -2.0],
                                            "top_logprobs": [{"a0": -1.0, "a1": -2.0},
                                                             {"b0": -2.0, "b1": -3.0}],
                                            "text_offset": [0, 1]}
    assert c2["choices"][0]["logprobs"]["text_offset"] == [2]  # runs across chunks
    plain = ResponseBuilder(completion({}), created=1).response(
        [ApiDelta("xyz", [1, 2, 3], "length", 2, 3)])
    assert plain["choices"][0] == {"index": 0, "text": "xyz", "logprobs": None,
                                   "finish_reason": "length"}
