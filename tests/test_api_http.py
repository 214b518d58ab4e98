"""The HTTP layer on a real port, hit by aiohttp and the official `openai` client.

`ScriptBackend` stands in for the router core: it streams a fixed script of deltas
(or echoes completion token ids), and fails on cue. End-to-end tests with real
workers live elsewhere; these pin the HTTP contract.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time

import aiohttp
import openai
import pytest
from aiohttp import web

from router.api import API_METRICS, make_app
from router.backend import ApiDelta, ApiError, ApiRequest
from router.limits import ApiLimits
from tests.test_api_protocol import data_url, image_part, png_bytes, png_header_only

MODEL = "tiny-vlm"
SCRIPT = ["Hello", ",", " world", "!"]  # tokens 100.. of every chat answer


class ScriptBackend:
    """Answers every request with SCRIPT; cue words in the prompt change the behaviour."""

    served_models = [MODEL, "other-model"]

    def __init__(self):
        self.requests: dict[str, ApiRequest] = {}
        self.aborts: list[str] = []
        self.ready = True

    async def generate(self, req: ApiRequest):
        self.requests[req.request_id] = req
        text = req.prompt or ""
        if req.messages:
            content = req.messages[-1]["content"]
            text = content if isinstance(content, str) else " ".join(
                p.get("text", "") for p in content)
        if "error-before" in text:
            raise ApiError(400, "the prompt is longer than the model's context", param="messages")
        if "crash-before" in text:
            raise RuntimeError("backend bug")
        pieces, ids = list(SCRIPT), [100 + i for i in range(len(SCRIPT))]
        if req.prompt_token_ids:
            pieces, ids = [f"<{t}>" for t in req.prompt_token_ids], list(req.prompt_token_ids)
        if "slow" in text:
            pieces, ids = ["tick "] * 500, [7] * 500
        limit = req.sampling["max_tokens"] or len(ids)
        n = min(limit, len(ids))
        top = req.sampling["logprobs"]
        for i in range(n):
            if i == 2 and "error-mid" in text:
                raise ApiError(503, "decode worker died", type="server_error")
            if i == 2 and "crash-mid" in text:
                raise RuntimeError("backend bug mid-stream")
            if "slow" in text:
                await asyncio.sleep(0.02)
            logprobs = None if top is None else [
                {"token_id": ids[i], "token": pieces[i], "logprob": -0.25,
                 "top": [{"token_id": k, "token": f"t{k}", "logprob": -1.0 - k}
                         for k in range(top)]}]
            last = i == n - 1
            yield ApiDelta(text=pieces[i], token_ids=[ids[i]],
                           finish_reason=("length" if n < len(ids) else "stop") if last else None,
                           prompt_tokens=11, completion_tokens=i + 1, cached_tokens=4,
                           logprobs=logprobs)

    async def abort(self, request_id: str) -> None:
        self.aborts.append(request_id)

    def health(self) -> tuple[bool, dict]:
        return self.ready, {"missing_workers": [] if self.ready else ["decode-0"]}


class Server:
    """An app on 127.0.0.1:<free port>, served from its own thread and event loop."""

    def __init__(self, app: web.Application):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runner = web.AppRunner(app)
        self.port = self._call(self._start())
        self.url = f"http://127.0.0.1:{self.port}"

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    async def _start(self) -> int:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        return self.runner.addresses[0][1]

    def stop(self) -> None:
        self._call(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


LIMITS = ApiLimits(max_body_bytes=1024 * 1024)


@pytest.fixture(scope="module")
def backend():
    return ScriptBackend()


@pytest.fixture(scope="module")
def app(backend):
    return make_app(backend, LIMITS)


@pytest.fixture(scope="module")
def server(app):
    srv = Server(app)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=10)


def fetch(method: str, url: str, **kwargs) -> tuple[int, dict, bytes]:
    async def go():
        async with aiohttp.ClientSession() as session:
            async with session.request(method, url, **kwargs) as resp:
                return resp.status, dict(resp.headers), await resp.read()
    return asyncio.run(go())


def post(server: Server, path: str, body=None, **kwargs) -> tuple[int, dict, bytes]:
    if body is not None:
        kwargs["data"] = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return fetch("POST", server.url + path, **kwargs)


def sse_events(raw: bytes) -> list:
    """The decoded `data:` payloads; asserts the framing and the final [DONE]."""
    assert raw.endswith(b"data: [DONE]\n\n")
    frames = raw.split(b"\n\n")
    assert frames[-1] == b"" and frames[-2] == b"data: [DONE]"
    out = []
    for frame in frames[:-2]:
        assert frame.startswith(b"data: ") and b"\n" not in frame
        out.append(json.loads(frame[len(b"data: "):]))
    return out


def chat_body(text: str = "hi", **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], **extra}


def wait_for(predicate, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


# ---- happy paths -----------------------------------------------------------------------------

def test_models_health_and_metrics(server, client, backend):
    status, _, raw = fetch("GET", server.url + "/v1/models")
    body = json.loads(raw)
    assert status == 200 and body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [MODEL, "other-model"]
    assert [m.id for m in client.models.list()] == [MODEL, "other-model"]
    assert client.models.retrieve(MODEL).id == MODEL
    status, _, raw = fetch("GET", server.url + "/health")
    assert status == 200 and json.loads(raw)["status"] == "ok"
    backend.ready = False
    try:
        status, _, raw = fetch("GET", server.url + "/health")
        assert status == 503 and json.loads(raw)["missing_workers"] == ["decode-0"]
    finally:
        backend.ready = True
    status, headers, raw = fetch("GET", server.url + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    for name in ("epd:num_requests_running", "epd:num_requests_waiting",
                 "epd:time_to_first_token_seconds", "epd:e2e_request_latency_seconds"):
        assert name.encode() in raw


def test_chat_openai_client(client, backend):
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                         max_tokens=3, temperature=0.0, seed=3)
    assert out.id.startswith("chatcmpl-") and out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == "Hello, world"
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (11, 3, 14)
    assert out.usage.prompt_tokens_details.cached_tokens == 4
    sampling = backend.requests[out.id.removeprefix("chatcmpl-")].sampling
    assert (sampling["max_tokens"], sampling["seed"], sampling["temperature"]) == (3, 3, 0.0)


def test_chat_stream_openai_client_with_usage(client):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True}, logprobs=True, top_logprobs=2))
    content = [c for c in chunks if c.choices]
    assert content[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in content) == "Hello, world!"
    assert [c.choices[0].finish_reason for c in content] == [None, None, None, "stop"]
    assert all(c.usage is None for c in content)
    assert content[0].choices[0].logprobs.content[0].logprob == -0.25
    assert len(content[0].choices[0].logprobs.content[0].top_logprobs) == 2
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert len({c.id for c in chunks}) == 1


def test_async_openai_completions(server):
    async def go():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        try:
            whole = await client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=5,
                                                    logprobs=1)
            stream = await client.completions.create(model=MODEL, prompt="hi", max_tokens=2,
                                                     stream=True)
            return whole, [c async for c in stream]
        finally:
            await client.close()
    whole, chunks = asyncio.run(go())
    assert whole.id.startswith("cmpl-") and whole.object == "text_completion"
    assert whole.choices[0].text == "<5><6><7>" and whole.choices[0].finish_reason == "stop"
    assert whole.choices[0].logprobs.tokens == ["<5>", "<6>", "<7>"]
    assert whole.choices[0].logprobs.text_offset == [0, 3, 6]
    assert whole.choices[0].logprobs.top_logprobs == [{"t0": -1.0}] * 3
    assert "".join(c.choices[0].text for c in chunks) == "Hello,"
    assert chunks[-1].choices[0].finish_reason == "length"


def test_sse_framing_raw(server):
    status, headers, raw = post(server, "/v1/chat/completions", chat_body(stream=True))
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(raw)
    assert len(events) == len(SCRIPT)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    assert all("usage" not in e for e in events)
    status, _, raw = post(server, "/v1/completions",
                          {"model": MODEL, "prompt": "x", "stream": True,
                           "stream_options": {"include_usage": True}})
    events = sse_events(raw)
    assert events[-1]["choices"] == [] and events[-1]["usage"]["total_tokens"] == 15


def test_images_reach_the_backend_in_order(server, backend):
    red, blue = png_bytes(color=(255, 0, 0)), png_bytes(5, 5, (0, 0, 255))
    content = [image_part(red), {"type": "text", "text": "and"}, image_part(blue)]
    status, _, raw = post(server, "/v1/chat/completions",
                          {"model": MODEL, "messages": [{"role": "user", "content": content}]})
    assert status == 200
    req = backend.requests[json.loads(raw)["id"].removeprefix("chatcmpl-")]
    assert req.images == [red, blue]
    assert req.messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "and"},
                                          {"type": "image"}]


# ---- errors ----------------------------------------------------------------------------------

def images_body(*parts) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": list(parts)}]}


ERROR_CASES = [
    # (path, body, status, param, text in message)
    ("/v1/chat/completions", b"{not json", 400, None, "invalid JSON"),
    ("/v1/chat/completions", b"\xff\xfe", 400, None, "invalid JSON"),
    ("/v1/chat/completions", b"[1, 2]", 400, None, "must be a JSON object"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, 400, "model", ""),
    ("/v1/chat/completions", {"model": MODEL}, 400, "messages", ""),
    ("/v1/chat/completions", chat_body(temperature="x"), 400, "temperature", "must be a number"),
    ("/v1/chat/completions", chat_body(max_tokens=0), 400, "max_tokens", "at least 1"),
    ("/v1/chat/completions", chat_body(max_tokens=-5), 400, "max_tokens", "at least 1"),
    ("/v1/chat/completions", chat_body(n=65), 400, "n", "n must be an integer in [1, 64]"),
    ("/v1/chat/completions", {**chat_body(), "model": "gpt-9"}, 404, "model", "gpt-9"),
    ("/v1/chat/completions",
     images_body({"type": "text", "text": "x"},
                 {"type": "image_url", "image_url": {"url": "data:image/png;base64,!!"}}),
     400, "messages[0].content[1]", "not valid base64"),
    ("/v1/chat/completions", images_body(image_part(b"not an image at all")), 400,
     "messages[0].content[0]", "image 0 could not be decoded"),
    ("/v1/chat/completions", images_body(*[image_part(png_bytes())] * 9), 400, "messages",
     "at most 8 images"),
    ("/v1/chat/completions", images_body(image_part(png_bytes()),
                                         image_part(png_header_only(50000, 50000))),
     400, "messages[0].content[1]", "image 1 could not be decoded"),
    ("/v1/chat/completions",
     images_body({"type": "image_url", "image_url": {"url": "http://example.com/cat.png"}}),
     400, "messages[0].content[0]", "remote image URLs are disabled on this server"),
    ("/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}, 400, "prompt", "batched prompts"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 0}, 400, "max_tokens", ""),
    ("/v1/completions", {"model": MODEL, "prompt": 4}, 400, "prompt", ""),
    # Nesting past the parser's depth is the client's fault, not a RecursionError's 500.
    ("/v1/chat/completions", b"[" * 100000 + b"]" * 100000, 400, None, "nested too deeply"),
    ("/v1/completions", b'{"a": ' * 100000 + b"1" + b"}" * 100000, 400, None, "nested too deeply"),
    ("/v1/completions", b'{"model": "tiny-vlm", "prompt": ' + b"[" * 100000 + b"]" * 100000 + b"}",
     400, None, "nested too deeply"),
    # Deep enough to parse, too deep to be a request: refused before anything recurses on it.
    ("/v1/completions", b'{"model": "tiny-vlm", "prompt": ' + b"[" * 500 + b"]" * 500 + b"}", 400,
     "prompt", "nested too deeply (more than 100 levels)"),
    ("/v1/chat/completions", json.dumps(chat_body(stop=json.loads("[" * 101 + "]" * 101))).encode(),
     400, "stop", "nested too deeply"),
    ("/v1/chat/completions", b'{"model": "tiny-vlm", "messages": [{"role": "user", "content": '
                             b'"\\ud800"}]}', 400, "messages[0].content", "lone surrogate"),
    ("/v1/chat/completions", b'{"model": "\\udfff", "messages": []}', 400, "model", "lone surrogate"),
    ("/v1/completions", b'{"model": "tiny-vlm", "prompt": [1, 1' + b"0" * 30 + b"]}", 400, "prompt",
     "64-bit"),
]


@pytest.mark.parametrize("path, body, status, param, text", ERROR_CASES)
def test_error_bodies(server, path, body, status, param, text):
    got, headers, raw = post(server, path, body)
    assert got == status and headers["Content-Type"].startswith("application/json")
    error = json.loads(raw)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and text in error["message"]
    if status == 404:
        assert error["code"] == "model_not_found"


def test_json_escapes_are_decoded_before_the_unicode_check(server, backend):
    raw = b'{"model": "tiny-vlm", "messages": [{"role": "user", "content": "\\ud83d\\ude00 ok"}]}'
    status, _, out = post(server, "/v1/chat/completions", raw)
    assert status == 200, out
    assert backend.requests[json.loads(out)["id"][9:]].messages[0]["content"] == "\U0001f600 ok"
    # 100 levels is allowed (a body nests about 6 in practice).
    status, _, out = post(server, "/v1/chat/completions",
                          chat_body(user=json.loads("[" * 99 + "]" * 99)))
    assert status == 200, out


def test_openai_client_sees_error_statuses(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       max_tokens=0)
    assert info.value.body["param"] == "max_tokens"


def test_body_over_limit_is_413(server, client):
    big = chat_body("x" * (LIMITS.max_body_bytes + 10))
    status, _, raw = post(server, "/v1/chat/completions", big)
    assert status == 413
    assert "larger than the limit" in json.loads(raw)["error"]["message"]
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(**big)
    assert info.value.status_code == 413


def test_unknown_route_and_method_have_error_bodies(server):
    status, _, raw = fetch("GET", server.url + "/v1/nothing")
    assert status == 404 and json.loads(raw)["error"]["message"] == "Not Found"
    status, _, raw = fetch("GET", server.url + "/v1/chat/completions")
    assert status == 405 and "error" in json.loads(raw)


def test_backend_errors(server, backend):
    # Before any output: the backend's status, streaming or not.
    for stream in (False, True):
        status, _, raw = post(server, "/v1/chat/completions", chat_body("error-before", stream=stream))
        assert status == 400 and "context" in json.loads(raw)["error"]["message"]
        status, _, raw = post(server, "/v1/chat/completions", chat_body("crash-before", stream=stream))
        assert status == 500 and json.loads(raw)["error"]["type"] == "server_error"
    # Mid-stream: an error event, then [DONE].
    status, _, raw = post(server, "/v1/chat/completions", chat_body("error-mid", stream=True))
    events = sse_events(raw)
    assert status == 200 and len(events) == 3
    assert events[-1]["error"]["message"] == "decode worker died"
    status, _, raw = post(server, "/v1/chat/completions", chat_body("crash-mid", stream=True))
    assert sse_events(raw)[-1]["error"]["type"] == "server_error"
    status, _, raw = post(server, "/v1/chat/completions", chat_body("error-mid"))
    assert status == 503 and json.loads(raw)["error"]["type"] == "server_error"


# ---- disconnects -----------------------------------------------------------------------------

def test_disconnect_mid_stream_aborts_once(server, backend):
    async def go() -> str:
        async with aiohttp.ClientSession() as session:
            resp = await session.post(server.url + "/v1/chat/completions",
                                      json=chat_body("slow", stream=True))
            line = await resp.content.readline()
            resp.close()  # drop the connection mid-stream
            return json.loads(line[len(b"data: "):])["id"].removeprefix("chatcmpl-")
    rid = asyncio.run(go())
    assert wait_for(lambda: rid in backend.aborts)
    time.sleep(0.3)
    assert backend.aborts.count(rid) == 1


def test_disconnect_while_waiting_aborts_once(server, backend):
    before = set(backend.requests)

    async def go():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.3)) as session:
            with pytest.raises(asyncio.TimeoutError):
                await session.post(server.url + "/v1/chat/completions", json=chat_body("slow"))
    asyncio.run(go())
    assert wait_for(lambda: set(backend.requests) - before)
    (rid,) = set(backend.requests) - before
    assert wait_for(lambda: rid in backend.aborts)
    time.sleep(0.3)
    assert backend.aborts.count(rid) == 1


def test_remote_images_allowlist():
    """Fetching from an allowed host works; other hosts, redirects out, big or slow
    images are refused. The test app serves the images itself."""
    limits = ApiLimits(remote_images="allowlist", allowed_domains=("localhost",),
                       fetch_timeout_s=0.5, fetch_max_bytes=4096)
    backend = ScriptBackend()
    app = make_app(backend, limits)
    png = png_bytes()

    async def ok(request):
        return web.Response(body=png)

    async def big(request):
        return web.Response(body=png + b"\0" * 8192)

    async def chunked(request):  # no Content-Length: the size shows only while reading
        resp = web.StreamResponse()
        await resp.prepare(request)
        for _ in range(4):
            await resp.write(png + b"\0" * 2048)
        return resp

    async def slow(request):
        await asyncio.sleep(2)
        return web.Response(body=png)

    async def redirect_in(request):
        raise web.HTTPFound("/img/ok.png")

    async def redirect_out(request):
        raise web.HTTPFound(f"http://127.0.0.1:{request.url.port}/img/ok.png")

    for path, handler in (("ok.png", ok), ("big.png", big), ("chunked.png", chunked),
                          ("slow.png", slow),
                          ("in", redirect_in), ("out", redirect_out)):
        app.router.add_get("/img/" + path, handler)
    srv = Server(app)
    out = f"http://127.0.0.1:{srv.port}/img/ok.png"
    try:
        def ask(url):
            return post(srv, "/v1/chat/completions",
                        images_body({"type": "image_url", "image_url": {"url": url}}))
        local = f"http://localhost:{srv.port}"
        status, _, raw = ask(local + "/img/ok.png")
        assert status == 200
        assert backend.requests[json.loads(raw)["id"][9:]].images == [png]
        assert ask(local + "/img/in")[0] == 200  # redirect inside the allowlist
        for url, text in ((out, "not in this server's allowed image domains"),
                          (local + "/img/out", "not in this server's allowed image domains"),
                          (local + "/img/big.png", "more than the limit of 4096 bytes"),
                          (local + "/img/chunked.png", "more than the limit of 4096 bytes"),
                          (local + "/img/slow.png", "timed out"),
                          (local + "/img/missing.png", "HTTP 404"),
                          ("file:///etc/passwd", "unsupported image URL scheme")):
            status, _, raw = ask(url)
            assert status == 400 and text in json.loads(raw)["error"]["message"], (url, raw)
    finally:
        srv.stop()


# ---- after it all ----------------------------------------------------------------------------

def test_normal_requests_still_work_and_were_not_aborted(server, client, backend, app):
    assert post(server, "/v1/chat/completions", b"{")[0] == 400
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert out.choices[0].message.content == "Hello, world!"
    assert out.id.removeprefix("chatcmpl-") not in backend.aborts
    assert len(backend.aborts) == len(set(backend.aborts))  # never twice
    assert set(backend.aborts) <= {rid for rid, req in backend.requests.items()
                                   if req.messages and "slow" in req.messages[-1]["content"]}
    text = app[API_METRICS].render()[0].decode()
    assert 'epd:request_success_total{finished_reason="stop"}' in text
    assert 'epd:request_errors_total{status="400"}' in text
    assert "epd:generation_tokens_total" in text
    assert "epd:num_requests_running 0.0" in text and "epd:num_requests_waiting 0.0" in text


def test_router_does_not_import_torch_or_stages():
    code = ("import sys, router.api; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'stages')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
