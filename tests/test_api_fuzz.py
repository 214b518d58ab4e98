"""Bad bodies against a real deployment (aggregated: one mixed worker, the cheapest).

First the context limit: `max_tokens` past the model's context is a 400 with vLLM's text on
both endpoints, streaming or not, and through the ZeroMQ SDK. Then a seeded fuzz: hundreds
of malformed or mistyped bodies, each of which must get a 4xx with an OpenAI error body, never
a 5xx; afterwards the server is healthy and answers a greedy request token for token as it did
before.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import random
import re
import urllib.request
from pathlib import Path

import aiohttp
import pytest

from tests.e2e_util import data_url, png_bytes, start

pytestmark = pytest.mark.e2e

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
SEED, NUM_CASES = 10, 600


@pytest.fixture(scope="module")
def dep(llava_dir, tmp_path_factory):
    d = start("aggregated", llava_dir, tmp_path_factory.mktemp("logs-fuzz"))
    yield d
    d.stop()


@pytest.fixture(scope="module")
def context(llava_dir) -> int:
    cfg = json.loads((Path(llava_dir) / "config.json").read_text())
    return (cfg.get("text_config") or cfg)["max_position_embeddings"]


def _post(dep, path: str, body, content_type: str | None = "application/json"):
    async def go():
        async with aiohttp.ClientSession() as s:
            return await _send(s, dep.url + path, body, content_type)
    return asyncio.run(go())


async def _send(session, url: str, body, content_type: str | None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {} if content_type is None else {"Content-Type": content_type}
    async with session.post(url, data=data, headers=headers) as r:
        return r.status, r.headers.get("Content-Type", ""), await r.read()


def _error(raw: bytes) -> dict:
    """The OpenAI error object of a response body; asserts its shape."""
    body = json.loads(raw)
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    return err


# ---- the context limit ----------------------------------------------------------------------

def _too_long(n: int, p: int, c: int, noun: str) -> str:
    return (f"This model's maximum context length is {n} tokens. However, you requested {p + c} "
            f"tokens ({p} in the {noun}, {c} in the completion). Please reduce the length of the "
            f"{noun} or completion.")


def _chat(dep, text: str, **extra) -> dict:
    return {"model": dep.name, "messages": [{"role": "user", "content": text}], "temperature": 0,
            **extra}


def _prompt_tokens(dep, body: dict, path: str = CHAT) -> int:
    status, _, raw = _post(dep, path, {**body, "max_tokens": 1})
    assert status == 200, raw
    return json.loads(raw)["usage"]["prompt_tokens"]


def test_max_tokens_past_the_context_is_400(dep, context):
    n = context
    # Completions with token ids: the prompt is exactly as long as the list.
    ids = [5] * (n - 3)
    for stream in (False, True):
        body = {"model": dep.name, "prompt": ids, "max_tokens": 4, "temperature": 0, "stream": stream}
        status, ctype, raw = _post(dep, COMPLETIONS, body)
        assert status == 400 and ctype.startswith("application/json"), raw  # before any SSE
        err = _error(raw)
        assert err["message"] == _too_long(n, n - 3, 4, "prompt")
        assert err["type"] == "invalid_request_error"
    status, _, raw = _post(dep, COMPLETIONS, {"model": dep.name, "prompt": ids, "max_tokens": 3,
                                              "temperature": 0, "ignore_eos": True})
    assert status == 200, raw  # exactly fills the context
    assert json.loads(raw)["usage"]["completion_tokens"] == 3
    status, _, raw = _post(dep, COMPLETIONS, {"model": dep.name, "prompt": "hello there",
                                              "max_tokens": 10 ** 9})
    p = _prompt_tokens(dep, {"model": dep.name, "prompt": "hello there"}, COMPLETIONS)
    assert status == 400 and _error(raw)["message"] == _too_long(n, p, 10 ** 9, "prompt")

    # Chat: the same, counted over the rendered messages.
    body = _chat(dep, "hello there")
    p = _prompt_tokens(dep, body)
    for extra in ({"max_tokens": 10 ** 9}, {"max_tokens": 10 ** 9, "stream": True},
                  {"max_completion_tokens": n - p + 1}):
        status, ctype, raw = _post(dep, CHAT, {**body, **extra})
        assert status == 400 and ctype.startswith("application/json"), (extra, raw)
        c = extra.get("max_tokens") or extra["max_completion_tokens"]
        assert _error(raw)["message"] == _too_long(n, p, c, "messages")


def test_without_max_tokens_a_chat_runs_to_the_end_of_the_context(dep, context):
    n = context
    a, b = (_prompt_tokens(dep, _chat(dep, "cat " * k)) for k in (100, 200))
    k = 100 + (n - 4 - a) * 100 // (b - a)  # about 4 tokens short of the context
    body = _chat(dep, "cat " * k, ignore_eos=True)
    p = _prompt_tokens(dep, body)
    assert n - 40 < p < n, p
    status, _, raw = _post(dep, CHAT, body)
    assert status == 200, raw
    out = json.loads(raw)
    assert out["usage"]["completion_tokens"] == n - p and out["choices"][0]["finish_reason"] == "length"
    # A prompt that alone fills the context has nothing to say about the completion's length.
    long_body = _chat(dep, "cat " * (k + 100))
    status, _, raw = _post(dep, CHAT, long_body)
    assert status == 400, raw
    m = re.fullmatch(r"This model's maximum context length is (\d+) tokens\. However, you requested "
                     r"(\d+) tokens in the messages, which leaves no room for the completion\. "
                     r"Please reduce the length of the messages\.", _error(raw)["message"])
    assert m is not None, raw
    assert int(m[1]) == n and int(m[2]) >= n
    status, _, raw = _post(dep, CHAT, {**long_body, "max_tokens": 5})
    assert status == 400 and _error(raw)["message"] == _too_long(n, int(m[2]), 5, "messages")


def test_the_sdk_gets_the_same_error(dep, context):
    import openai

    from bus.client import Client, ClientRequestError

    ids = [7] * (context - 1)
    expected = _too_long(context, context - 1, 2, "prompt")
    c = Client(dep.client_addr, model=dep.name, timeout=60)
    try:
        with pytest.raises(ClientRequestError) as info:
            c.generate(prompt_token_ids=ids, max_tokens=2)
        assert (info.value.status, info.value.type, info.value.message) == (
            400, "invalid_request_error", expected)
        assert expected in str(info.value)
        with pytest.raises(ClientRequestError) as info:
            list(c.stream(messages=[{"role": "user", "content": "hi"}], max_tokens=10 ** 9))
        assert info.value.status == 400 and "in the messages" in info.value.message
        for bad in ({"max_tokens": "5"}, {"temperature": math.nan}, {"stream": 0},
                    {"max_tokens": 2 ** 63}, {"stop": [""]}, {"logprobs": 30}):
            with pytest.raises(ClientRequestError) as info:
                c.generate(prompt="hi", **bad)
            assert info.value.status == 400, bad
        assert c.generate(prompt="hi", max_tokens=2).completion_tokens == 2  # still serving
    finally:
        c.close()
    client = openai.OpenAI(base_url=dep.url + "/v1", api_key="x", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=dep.name, prompt=ids, max_tokens=2)
    assert err.value.body["message"] == expected


# ---- the fuzz ---------------------------------------------------------------------------------

# Each value is wrong for its field whatever the rest of the body says. Raw JSON text (bytes)
# stands for what json.dumps cannot write: NaN, infinities, overlong numbers, lone surrogates.
_NUM = ["\"1\"", "[]", "{}", "true", "NaN", "Infinity", "-Infinity", "1e999", "null"]
_INT = _NUM[:-1] + ["1.5", "1e30", str(10 ** 30), str(2 ** 64), "1" + "0" * 5000]
_BOOL = ["1", "0", "\"true\"", "\"\"", "[]", "{}", "NaN", "\"\\ud800\""]
_BAD_SAMPLING = {
    "temperature": _NUM[:-1] + ["-1", "-0.5"],
    "top_p": _NUM[:-1] + ["0", "-1", "1.5"],
    "top_k": _INT + ["-2", "-100"],
    "min_p": _NUM[:-1] + ["-0.1", "2"],
    "seed": _INT[:-3] + [str(2 ** 64), str(-(2 ** 63) - 1)],
    "presence_penalty": _NUM[:-1] + ["3", "-2.5"],
    "frequency_penalty": _NUM[:-1] + ["2.01", "-7"],
    "repetition_penalty": _NUM[:-1] + ["0", "-1"],
    "n": _INT + ["0", "65", "1.0"],
    "max_tokens": _INT + ["0", "-1", str(10 ** 9), str(2 ** 63 - 1)],
    "min_tokens": _INT + ["-1", "100"],  # the base asks for at most 4 tokens
    "stop": ["3", "[3]", "\"\"", "[\"\"]", "{}", "[[]]", "[null]", "true", "[\"\\udfff\"]"],
    "stop_token_ids": ["3", "[-1]", "[\"a\"]", "[1.5]", "[" + str(10 ** 30) + "]", "\"x\"", "[[1]]",
                       "[true]"],
    "ignore_eos": _BOOL, "skip_special_tokens": _BOOL, "include_stop_str_in_output": _BOOL,
    "spaces_between_special_tokens": _BOOL, "stream": _BOOL, "return_token_ids": _BOOL,
    "model": ["3", "\"\"", "[]", "{}", "true", "\"no-such-model\"", "\"\\u00e9\\u6f22\"",
              "\"\\ud800\"", "\"tiny-llava\\u0000\""],
}
_BAD_CHAT = {
    "messages": ["null", "\"hi\"", "[]", "{}", "[null]", "[\"hi\"]", "[[]]", "[{}]",
                 "[{\"role\": \"user\"}]", "[{\"content\": \"x\"}]", "[{\"role\": \"bot\", \"content\": \"x\"}]",
                 "[{\"role\": 5, \"content\": \"x\"}]", "[{\"role\": \"user\", \"content\": 5}]",
                 "[{\"role\": \"user\", \"content\": {\"text\": \"x\"}}]",
                 "[{\"role\": \"user\", \"content\": [5]}]",
                 "[{\"role\": \"user\", \"content\": [{\"type\": \"audio\"}]}]",
                 "[{\"role\": \"user\", \"content\": [{\"type\": \"text\"}]}]",
                 "[{\"role\": \"user\", \"content\": [{\"type\": \"text\", \"text\": 7}]}]",
                 "[{\"role\": \"user\", \"content\": \"\\udc00 x\"}]",
                 "[{\"role\": \"user\", \"content\": \"ok\", \"name\": \"\\ud800\"}]"],
    "max_completion_tokens": _INT + ["0", str(10 ** 9)],
    "logprobs": ["1", "\"yes\"", "[]", "NaN"],
    "top_logprobs": ["3", "-1", "21", "\"x\"", "1.5"],  # without logprobs: true, or out of range
    "add_generation_prompt": _BOOL,
    "stream_options": ["{\"include_usage\": true}", "[]", "\"x\"", "5"],  # stream is false
    "tools": ["[{\"type\": \"function\"}]"],
}
_BAD_COMPLETION = {
    "prompt": ["null", "5", "[]", "[-1]", "[1.5]", "[true]", "[\"a\", \"b\"]", "[[1], [2]]", "{}",
               "[[]]", "[" + str(10 ** 30) + "]", "\"\\ud800\"", "[[-3]]", "[1000000000]", "[null]",
               "[\"x\", 1]", "\"\"", "[\"\"]"],
    "logprobs": ["-1", "21", "true", "\"x\"", "1.5", "NaN"],
    "echo": ["true"],
}
_CONTENT_TYPES = ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                  "application/octet-stream", None, "application/json; charset=utf-16", "image/png"]


def _bad_images(rng: random.Random, png: bytes) -> list:
    """Content lists with at least one broken image part."""
    bomb = base64.b64encode(_png_header(60000, 60000)).decode()
    broken = [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!"}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," +
                                            base64.b64encode(b"not an image").decode()}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + bomb}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," +
                                            base64.b64encode(png[:len(png) // 2]).decode()}},
        {"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/cat.png"}},
        {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}},
        {"type": "image_url", "image_url": {"url": 5}},
        {"type": "image_url", "image_url": {"url": ""}},
        {"type": "image_url", "image_url": []},
        {"type": "image_url", "image_url": None},
        {"type": "image_url"},
        {"type": "image_url", "image_url": {"url": "data:;base64,"}},
        {"type": "image_url", "image_url": {"url": "data:text/plain,hello"}},
    ]
    good = {"type": "image_url", "image_url": {"url": "data:image/png;base64," +
                                               base64.b64encode(png).decode()}}
    if rng.random() < 0.1:
        return [good] * 9 + [{"type": "text", "text": "too many"}]  # the limit is 8
    parts = [good] * rng.randint(0, 2) + [rng.choice(broken)] + [good] * rng.randint(0, 1)
    return parts + [{"type": "text", "text": "look"}]


def _png_header(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _with_fields(base: dict, fields: dict[str, str]) -> bytes:
    """`base` as JSON with `fields` set to raw JSON values (which json.dumps may not write)."""
    rest = {k: v for k, v in base.items() if k not in fields}
    head = json.dumps(rest)[:-1]
    tail = "".join(f", {json.dumps(k)}: {v}" for k, v in fields.items())
    return (head + tail + "}").encode()


def _random_text(rng: random.Random, n: int) -> str:
    pools = ["abc xyz", "\u00e9\u00fc\u00df", "\u6f22\u5b57\u304b\u306a", "\U0001f600\U0001f680",
             "\u200b\u202e\ufeff", "\\\"{}[]:,", "\x00\x01\x1f"]
    return "".join(rng.choice(rng.choice(pools)) for _ in range(n))


def fuzz_cases(rng: random.Random, model: str, png: bytes) -> list[tuple[str, bytes, str | None]]:
    """(path, body, content type) triples, every one of which the server must refuse."""
    text = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "temperature": 0}
    comp = {"model": model, "prompt": "hi", "max_tokens": 4, "temperature": 0}
    out: list[tuple[str, bytes, str | None]] = []
    while len(out) < NUM_CASES:
        path, base, own = rng.choice(((CHAT, text, _BAD_CHAT), (COMPLETIONS, comp, _BAD_COMPLETION)))
        kind = rng.random()
        ctype = "application/json"
        if kind < 0.45:  # one to three fields mistyped or out of range
            table = {**_BAD_SAMPLING, **own}
            names = rng.sample(sorted(table), rng.randint(1, 3))
            body = _with_fields(base, {k: rng.choice(table[k]) for k in names})
        elif kind < 0.55 and path == CHAT:  # broken image parts
            b = {**base, "messages": [{"role": "user", "content": _bad_images(rng, png)}]}
            body = json.dumps(b).encode()
        elif kind < 0.65:  # truncated JSON
            full = json.dumps({**base, "note": _random_text(rng, 8)}).encode()
            body = full[:rng.randrange(len(full))]
        elif kind < 0.72:  # nesting, at the top or inside a field
            depth = rng.choice([2000, 10000, 100000, 300000])
            opener, closer = rng.choice([("[", "]"), ('{"a":', "}")])
            nested = opener * depth + ("1" if opener != "[" else "") + closer * depth
            field = rng.choice([None, "messages", "prompt", "stop", "max_tokens"])
            body = (nested if field is None else _with_fields(base, {field: nested}).decode()).encode()
        elif kind < 0.80:  # not an object at the top
            top = rng.choice(["1", "-0", "\"hi\"", "null", "true", "[]", "[1, 2]", "1e999", "NaN",
                              json.dumps([base]), json.dumps(_random_text(rng, 12))])
            body = top.encode()
        elif kind < 0.88:  # bytes that are not JSON (or not UTF-8), or nothing at all
            body = rng.choice([b"", b" ", rng.randbytes(rng.randint(1, 64)),
                               b'{"model": "\xff\xfe"}', json.dumps(base).encode() + b" x",
                               json.dumps(base).encode() * 2, b"model=x&prompt=y",
                               json.dumps(base).encode("utf-16")])
            if body.strip() and _parses(body):
                continue
        elif kind < 0.94:  # unicode where a name is expected: no such model, role or part type
            b = json.loads(json.dumps(base))
            which = rng.choice(["model", "role", "type"] if path == CHAT else ["model"])
            junk = _random_text(rng, rng.randint(1, 10))
            if which == "model":
                b["model"] = junk
            elif which == "role":
                b["messages"][0]["role"] = junk
            else:
                b["messages"][0]["content"] = [{"type": junk, "text": "x"}]
            body = json.dumps(b, ensure_ascii=rng.random() < 0.5).encode()
        else:  # a broken body under a wrong content type
            table = {**_BAD_SAMPLING, **own}
            name = rng.choice(sorted(table))
            body = rng.choice([_with_fields(base, {name: rng.choice(table[name])}),
                               json.dumps(base).encode()[:-1]])
            ctype = rng.choice(_CONTENT_TYPES)
        out.append((path, body, ctype))
    return out


def _parses(body: bytes) -> bool:
    try:
        return isinstance(json.loads(body), dict)
    except (ValueError, RecursionError):
        return False


def test_fuzzed_bodies_get_4xx_and_the_server_stays_exact(dep, test_images):
    png = png_bytes(test_images[0])
    probes = [
        (CHAT, {"model": dep.name, "temperature": 0, "max_tokens": 8, "return_token_ids": True,
                "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": data_url(test_images[0])}},
                    {"type": "text", "text": "What is in this picture?"}]}]}),
        (COMPLETIONS, {"model": dep.name, "temperature": 0, "max_tokens": 8, "return_token_ids": True,
                       "prompt": "Once upon a time"}),
    ]

    def answers() -> list[list[int]]:
        out = []
        for path, body in probes:
            status, _, raw = _post(dep, path, body)
            assert status == 200, raw
            out.append(json.loads(raw)["choices"][0]["token_ids"])
        return out

    before = answers()
    assert all(len(ids) > 0 for ids in before)
    cases = fuzz_cases(random.Random(SEED), dep.name, png)
    assert len(cases) >= 500

    async def run():
        sem = asyncio.Semaphore(8)
        async with aiohttp.ClientSession() as s:
            async def one(path, body, ctype):
                async with sem:
                    return await _send(s, dep.url + path, body, ctype)
            return await asyncio.gather(*(one(*c) for c in cases))

    results = asyncio.run(run())
    bad = []
    for i, ((path, body, ctype), (status, rtype, raw)) in enumerate(zip(cases, results)):
        ok = 400 <= status < 500 and rtype.startswith("application/json")
        if ok:
            try:
                _error(raw)
            except (AssertionError, ValueError):
                ok = False
        if not ok:
            bad.append(f"#{i} {path} {ctype} {body[:160]!r} -> {status} {raw[:200]!r}")
    assert not bad, f"{len(bad)} of {len(cases)} answers were not 4xx OpenAI errors:\n" + "\n".join(bad[:20])

    with urllib.request.urlopen(dep.url + "/health", timeout=10) as r:
        assert r.status == 200
    with urllib.request.urlopen(dep.url + "/metrics", timeout=10) as r:
        assert not re.search(r'^epd:request_errors_total\{status="5\d\d"\}', r.read().decode(), re.M)
    assert answers() == before
