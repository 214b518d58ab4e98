"""The API beside vLLM's, against a running 1e1p1d deployment of the tiny LLaVA, with real clients:
/tokenize, /detokenize, /version, ``model`` left out, /v1/models' root and max_model_len, n > 1."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request

import aiohttp
import openai
import pytest

from tests.e2e_util import chat_body, start

pytestmark = pytest.mark.e2e
TEXT = "Describe the colours of this picture"


@pytest.fixture(scope="module")
def dep(llava_dir, tmp_path_factory):
    d = start("1e1p1d", llava_dir, tmp_path_factory.mktemp("logs"))
    yield d
    d.stop()


@pytest.fixture(scope="module")
def client(dep):
    return openai.OpenAI(base_url=dep.url + "/v1", api_key="none", max_retries=0)


def call(dep, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    async def go():
        async with aiohttp.ClientSession() as s:
            async with s.request(method, dep.url + path, json=body) as r:
                return r.status, await r.json()
    return asyncio.run(go())


def sse(dep, body: dict) -> list[dict]:
    """The parsed SSE events of a streaming request (without [DONE])."""
    async def go():
        events = []
        async with aiohttp.ClientSession() as s:
            async with s.post(dep.url + "/v1/chat/completions", json=body) as r:
                assert r.status == 200, await r.text()
                async for line in r.content:
                    line = line.decode().strip()
                    if line.startswith("data: ") and line != "data: [DONE]":
                        events.append(json.loads(line[6:]))
        return events
    return asyncio.run(go())


def test_version(dep):
    status, body = call(dep, "GET", "/version")
    assert status == 200 and re.fullmatch(r"\d+\.\d+\.\d+.*", body["version"])


def test_models_name_root_and_context(dep, client, llava_dir):
    from transformers import AutoConfig

    ctx = AutoConfig.from_pretrained(llava_dir).text_config.max_position_embeddings
    entry = client.models.list().data[0]
    assert entry.id == dep.name
    assert entry.root == llava_dir and entry.max_model_len == ctx
    assert client.models.retrieve(dep.name).root == llava_dir


def test_tokenize_prompt_matches_the_tokenizer(dep, llava_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llava_dir)
    status, body = call(dep, "POST", "/tokenize", {"prompt": "Once upon a time"})
    assert status == 200, body
    assert body["tokens"] == tok("Once upon a time").input_ids and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == call(dep, "GET", "/v1/models")[1]["data"][0]["max_model_len"]
    status, plain = call(dep, "POST", "/tokenize", {"model": dep.name, "prompt": "Once upon a time",
                                                   "add_special_tokens": False})
    assert plain["tokens"] == tok("Once upon a time", add_special_tokens=False).input_ids
    status, back = call(dep, "POST", "/detokenize", {"tokens": plain["tokens"]})
    assert status == 200 and back == {"prompt": "Once upon a time"}


def test_tokenize_chat_counts_what_the_request_runs(dep, client, llava_dir, test_images):
    """Images expanded: the count is the chat's usage.prompt_tokens and transformers' prompt ids."""
    from transformers import AutoProcessor

    imgs = test_images[:2]
    body = chat_body(dep.name, TEXT, imgs)
    status, tok = call(dep, "POST", "/tokenize", {"messages": body["messages"]})
    assert status == 200, tok
    out = client.chat.completions.create(**body)
    assert tok["count"] == out.usage.prompt_tokens == len(tok["tokens"])
    conv = [{"role": "user", "content": [{"type": "image"} for _ in imgs] + [{"type": "text", "text": TEXT}]}]
    proc = AutoProcessor.from_pretrained(llava_dir)
    ref = proc.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert tok["tokens"] == proc(text=ref, images=imgs).input_ids[0]
    # add_generation_prompt reaches the template
    _, bare = call(dep, "POST", "/tokenize", {"messages": body["messages"], "add_generation_prompt": False})
    assert bare["count"] < tok["count"]


@pytest.mark.parametrize("body, status, param", [
    ({}, 400, "prompt"),
    ({"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, 400, "prompt"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": "x", "add_special_tokens": "yes"}, 400, "add_special_tokens"),
    ({"prompt": "x", "model": "nope"}, 404, "model"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url",
                                                 "image_url": {"url": "data:image/png;base64,AAAA"}}]}]},
     400, "messages[0].content[0]"),
])
def test_tokenize_errors(dep, body, status, param):
    got, err = call(dep, "POST", "/tokenize", body)
    assert got == status and err["error"]["param"] == param, err


def test_detokenize_errors(dep):
    status, err = call(dep, "POST", "/detokenize", {"tokens": [1, -2]})
    assert status == 400 and err["error"]["param"] == "tokens"
    status, err = call(dep, "POST", "/detokenize", {"tokens": [10 ** 9]})
    assert status == 400 and "out of range" in err["error"]["message"]


def test_model_may_be_left_out(dep, client):
    body = chat_body(dep.name, "Hello", [])
    status, out = call(dep, "POST", "/v1/chat/completions", {k: v for k, v in body.items() if k != "model"})
    assert status == 200 and out["model"] == dep.name
    ref = client.chat.completions.create(**body)
    assert out["choices"][0]["message"]["content"] == ref.choices[0].message.content
    status, out = call(dep, "POST", "/v1/completions", {"prompt": "Hello", "max_tokens": 3})
    assert status == 200 and out["usage"]["completion_tokens"] == 3


def test_n_samples_are_seeded_requests(dep, client, test_images):
    """n=3 with a seed: choice i is what one request with seed+i gives (vLLM's children);
    usage counts the prompt once and sums the completions."""
    body = chat_body(dep.name, TEXT, test_images[:1], temperature=1.0, seed=11, return_token_ids=True)
    status, out = call(dep, "POST", "/v1/chat/completions", {**body, "n": 3})
    assert status == 200, out
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    singles = [call(dep, "POST", "/v1/chat/completions", {**body, "seed": 11 + i})[1] for i in range(3)]
    for choice, one in zip(out["choices"], singles):
        assert choice["token_ids"] == one["choices"][0]["token_ids"]
        assert choice["message"]["content"] == one["choices"][0]["message"]["content"]
    assert len({tuple(c["token_ids"]) for c in out["choices"]}) > 1  # different seeds, different samples
    usage = out["usage"]
    assert usage["prompt_tokens"] == singles[0]["usage"]["prompt_tokens"]
    assert usage["completion_tokens"] == sum(len(c["token_ids"]) for c in out["choices"])
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_n_samples_stream_interleaved_by_index(dep, client):
    body = chat_body(dep.name, TEXT, [], temperature=1.0, seed=3, max_tokens=8)
    events = sse(dep, {**body, "n": 2, "stream": True, "stream_options": {"include_usage": True}})
    chunks, usage = events[:-1], events[-1]
    order = [c["choices"][0]["index"] for c in chunks]
    assert set(order) == {0, 1}
    texts = {i: "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                        if c["choices"][0]["index"] == i) for i in (0, 1)}
    for i in (0, 1):
        first = next(c for c in chunks if c["choices"][0]["index"] == i)
        assert first["choices"][0]["delta"]["role"] == "assistant"  # each choice's first chunk
        finals = [c for c in chunks if c["choices"][0]["index"] == i and c["choices"][0]["finish_reason"]]
        assert len(finals) == 1
    whole = call(dep, "POST", "/v1/chat/completions", {**body, "n": 2})[1]
    assert [texts[0], texts[1]] == [c["message"]["content"] for c in whole["choices"]]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == whole["usage"]["completion_tokens"]
    # The openai client reads the same stream.
    seen = set()
    for chunk in client.chat.completions.create(**body, n=2, stream=True):
        seen.update(c.index for c in chunk.choices)
    assert seen == {0, 1}


def test_n_samples_share_the_prompt_kv(dep, client):
    """The samples are separate requests with one prompt: the prompt's blocks are computed once."""
    def hits() -> float:
        text = call_text(dep, "/metrics")
        return sum(float(v) for v in re.findall(r'^epd:prefix_cache_hit_tokens_total\{[^}]*role="prefill"[^}]*\} '
                                                r'([0-9.e+]+)$', text, re.M))

    prompt = "A long story about the sea and a lighthouse keeper " * 8  # many full blocks
    before = hits()
    out = client.completions.create(model=dep.name, prompt=prompt, n=4, max_tokens=2, temperature=1.0, seed=1)
    assert len(out.choices) == 4 and out.usage.prompt_tokens > 64
    deadline = time.monotonic() + 5  # heartbeats carry the counters
    while hits() - before < 3 * 64 and time.monotonic() < deadline:
        time.sleep(0.25)
    assert hits() - before >= 3 * 64, f"prefix-cache hits went from {before} to {hits()}"


def call_text(dep, path: str) -> str:
    async def go():
        async with aiohttp.ClientSession() as s:
            async with s.get(dep.url + path) as r:
                return await r.text()
    return asyncio.run(go())


def test_epd_bench_needs_no_tokenizer(dep, capsys):
    """epd-bench takes the model name and its directory from /v1/models."""
    from perf.epd_bench.cli import main

    out = dep.log_dir / "bench.json"
    assert main(["--base-url", dep.url, "--num-prompts", "2", "--input-len", "8", "--output-len", "2",
                 "--no-progress", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["model"] == dep.name and res["runs"][0]["summary"]["completed"] == 2


def test_sdk_refuses_n(dep):
    from bus.client import Client, ClientRequestError

    c = Client(dep.client_addr, model=dep.name, timeout=30)
    try:
        with pytest.raises(ClientRequestError, match="n > 1"):
            c.generate(prompt="hi", max_tokens=2, n=2)
    finally:
        c.close()


# ---- the HTTP layer alone (a scripted backend): aborts, errors and the key with n > 1 ----------

@pytest.fixture(scope="module")
def scripted():
    from router.api import make_app
    from tests.test_api_http import LIMITS, ScriptBackend, Server

    backend = ScriptBackend()
    srv = Server(make_app(backend, LIMITS, api_key="k"))
    yield srv, backend
    srv.stop()


def _post(url: str, body: dict, key: str | None = "k"):
    async def go():
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with aiohttp.ClientSession() as s:
            async with s.post(url, json=body, headers=headers) as r:
                return r.status, await r.text()
    return asyncio.run(go())


def test_n_samples_against_a_scripted_backend(scripted):
    srv, backend = scripted
    status, text = _post(srv.url + "/v1/completions", {"model": "tiny-vlm", "prompt": "hi", "n": 2})
    out = json.loads(text)
    assert status == 200 and [c["index"] for c in out["choices"]] == [0, 1]
    assert out["usage"] == {"prompt_tokens": 11, "completion_tokens": 8, "total_tokens": 19,
                            "prompt_tokens_details": {"cached_tokens": 4}}
    rid = out["id"].removeprefix("cmpl-")
    assert {f"{rid}-0", f"{rid}-1"} <= set(backend.requests)
    # One sample failing mid-stream ends the stream with one error event, then [DONE].
    status, text = _post(srv.url + "/v1/chat/completions", {"model": "tiny-vlm", "n": 2, "stream": True,
                                                           "messages": [{"role": "user", "content": "error-mid"}]})
    events = [ln[6:] for ln in text.splitlines() if ln.startswith("data: ")]
    assert status == 200 and events[-1] == "[DONE]"
    assert [json.loads(e).get("error", {}).get("message") for e in events[:-1]].count("decode worker died") == 1


def test_n_samples_aborted_together_when_the_client_leaves(scripted):
    srv, backend = scripted

    async def go():
        async with aiohttp.ClientSession(headers={"Authorization": "Bearer k"}) as s:
            async with s.post(srv.url + "/v1/chat/completions", json={
                    "model": "tiny-vlm", "n": 3, "stream": True,
                    "messages": [{"role": "user", "content": "slow"}]}) as r:
                seen = set()
                async for line in r.content:
                    if line.startswith(b"data: {"):
                        seen.add(json.loads(line[6:])["choices"][0]["index"])
                    if len(seen) == 3:
                        return json.loads(line[6:])["id"].removeprefix("chatcmpl-")

    rid = asyncio.run(go())
    deadline = time.monotonic() + 5
    while len([a for a in backend.aborts if a.startswith(rid)]) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(a for a in backend.aborts if a.startswith(rid)) == [f"{rid}-{i}" for i in range(3)]


def test_api_key_guards_v1_only(scripted):
    srv, _ = scripted
    body = {"model": "tiny-vlm", "prompt": "hi"}
    assert _post(srv.url + "/v1/completions", body, key=None)[0] == 401
    status, text = _post(srv.url + "/v1/completions", body, key="wrong")
    assert status == 401 and json.loads(text)["error"]["code"] == "invalid_api_key"
    assert _post(srv.url + "/v1/completions", body)[0] == 200
    for path in ("/health", "/version", "/metrics"):  # open, as in vLLM
        with urllib.request.urlopen(srv.url + path) as r:
            assert r.status == 200


def test_sdk_client_says_why_nothing_answers():
    """A wrong SDK address is a clear TimeoutError naming the address, not a silent wait."""
    from bus.client import AsyncClient, Client
    from router.serve import free_port

    address = f"tcp://127.0.0.1:{free_port()}"
    c = Client(address, model="m", timeout=0.3)
    try:
        with pytest.raises(TimeoutError, match=f"no answer from a router at {address}.*--sdk-port"):
            c.generate(prompt="hi", max_tokens=1)
        with pytest.raises(TimeoutError, match="epd-serve"):
            c.health()
    finally:
        c.close()

    async def go():
        ac = AsyncClient(address, model="m", timeout=0.3)
        try:
            with pytest.raises(TimeoutError, match=address):
                await ac.generate(prompt="hi", max_tokens=1)
        finally:
            ac.close()
    asyncio.run(go())
