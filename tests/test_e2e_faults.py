"""Bad input, disconnects and a dead worker against a real 1e1p1d deployment.

Each case gets a precise error (or a clean end of stream) and every other
request carries on; a client that leaves gives its KV blocks back.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import urllib.request

import aiohttp
import pytest

from tests.e2e_util import chat_body, data_url, kv_blocks_used, reference, reference_prompt, start

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def dep(llava_dir, tmp_path_factory):
    # Nothing supervises this deployment: a request waits only 4 s for a dead role to return.
    d = start("1e1p1d", llava_dir, tmp_path_factory.mktemp("logs-faults"), extra_router_args=["--worker-wait", "4"])
    yield d
    d.stop()


def _metrics(dep) -> str:
    with urllib.request.urlopen(f"{dep.url}/metrics", timeout=5) as r:
        return r.read().decode()


async def _raw(session, url, data, content_type="application/json"):
    async with session.post(url, data=data, headers={"Content-Type": content_type}) as r:
        return r.status, await r.json()


def test_bad_requests_get_precise_errors(dep, test_images, llava_dir):
    url = f"{dep.url}/v1/chat/completions"
    good = chat_body(dep.name, "What is this?", [test_images[0]])
    png_garbage = "data:image/png;base64," + base64.b64encode(b"definitely not a png").decode()

    def with_image(url_value):
        b = json.loads(json.dumps(good))
        b["messages"][0]["content"][0]["image_url"]["url"] = url_value
        return b

    cases = [
        (b"{not json", 400, "JSON"),
        (json.dumps({"model": dep.name}), 400, "messages"),
        (json.dumps({**good, "model": "nope"}), 404, "nope"),
        (json.dumps({**good, "max_tokens": 0}), 400, "max_tokens"),
        (json.dumps({**good, "temperature": "hot"}), 400, "temperature"),
        (json.dumps(with_image("data:image/png;base64,@@@@")), 400, "base64"),
        (json.dumps(with_image(png_garbage)), 400, "decode"),
        (json.dumps(with_image("https://example.com/cat.png")), 400, "remote"),
        (json.dumps(chat_body(dep.name, "many", [test_images[0]] * 9)), 400, "images"),
        (json.dumps(chat_body(dep.name, "word " * 3000, [])), 400, "context"),
    ]

    async def run():
        async with aiohttp.ClientSession() as s:
            bad = await asyncio.gather(*(_raw(s, url, data) for data, _, _ in cases))
            async with s.post(url, json={**good, "return_token_ids": True}) as r:
                return bad, r.status, await r.json()

    bad, status, body = asyncio.run(run())
    for (data, want, needle), (got, err) in zip(cases, bad):
        assert got == want, (data[:80], err)
        assert needle.lower() in err["error"]["message"].lower(), err
        assert err["error"]["type"]
    # ...and the good request after them is answered exactly.
    assert status == 200, body
    assert body["choices"][0]["token_ids"] == reference(llava_dir, "What is this?", [test_images[0]])
    assert body["usage"]["prompt_tokens"] == len(reference_prompt(llava_dir, "What is this?", [test_images[0]]))


def test_client_disconnect_frees_kv(dep, test_images):
    url = f"{dep.url}/v1/chat/completions"
    baseline = kv_blocks_used(_metrics(dep))

    async def leave_early():
        async with aiohttp.ClientSession() as s:
            body = chat_body(dep.name, "Tell me everything", [test_images[1]], stream=True, max_tokens=1500,
                             ignore_eos=True)
            async with s.post(url, json=body) as r:
                assert r.status == 200
                seen = 0
                async for raw in r.content:
                    if raw.startswith(b"data: "):
                        seen += 1
                    if seen >= 3:
                        break  # leave mid-stream: the connection closes with the session

    asyncio.run(leave_early())
    time.sleep(2.5)  # a heartbeat or two
    deadline = time.monotonic() + 20
    used = None
    while time.monotonic() < deadline:
        used = kv_blocks_used(_metrics(dep))
        if used <= baseline:
            break
        time.sleep(0.5)
    assert used is not None and used <= baseline, f"KV blocks in use stayed at {used} (baseline {baseline})"
    # ...and the server still answers.
    with urllib.request.urlopen(urllib.request.Request(
            url, data=json.dumps(chat_body(dep.name, "still there?", [])).encode(),
            headers={"Content-Type": "application/json"}), timeout=30) as r:
        assert r.status == 200


def test_a_restarted_worker_rejoins(dep, test_images, llava_dir):
    """A stage restarts alone: the router takes its new incarnation and requests flow again."""
    before = dep.health()[1]["workers"]["prefill-0"]["incarnation"]
    dep.restart("prefill-0")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ok, detail = dep.health()
        now = detail.get("workers", {}).get("prefill-0", {})
        if ok and now.get("alive") and now.get("incarnation") != before:
            break
        time.sleep(0.5)
    else:
        pytest.fail("the restarted prefill worker did not register again")
    body = chat_body(dep.name, "after the restart", [test_images[3]], return_token_ids=True)
    req = urllib.request.Request(f"{dep.url}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        got = json.loads(r.read())["choices"][0]["token_ids"]
    assert got == reference(llava_dir, "after the restart", [test_images[3]])


def test_dead_decode_worker_fails_its_requests_cleanly(dep, test_images):
    """Runs last in this module: it kills the decode worker, and nothing starts it again.

    The stream waits the router's --worker-wait for a decode worker, then ends with an error
    naming the role (with epd-serve the worker comes back and the stream resumes:
    tests/test_resilience.py)."""
    url = f"{dep.url}/v1/chat/completions"

    async def run():
        async with aiohttp.ClientSession() as s:
            body = chat_body(dep.name, "a long answer", [test_images[2]], stream=True, max_tokens=1500,
                             ignore_eos=True)
            events = []
            async with s.post(url, json=body) as r:
                assert r.status == 200
                t0 = None
                async for raw in r.content:
                    line = raw.decode().strip()
                    if not line.startswith("data: "):
                        continue
                    events.append(line[6:])
                    if len(events) == 3:
                        t0 = time.monotonic()
                        await asyncio.get_running_loop().run_in_executor(None, dep.kill, "decode-0")
                return events, time.monotonic() - t0
    events, waited = asyncio.run(run())
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])
    assert "error" in err and "decode" in err["error"]["message"]
    assert waited < 15  # the worker wait, not a hang
    # A new request now fails fast with 503: no decode worker is left.
    req = urllib.request.Request(url, data=json.dumps(chat_body(dep.name, "hi", [])).encode(),
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 503
