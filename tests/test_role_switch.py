"""Live role switching with real processes: ``POST /admin/workers/{id}/role`` under load.

2e1p1d (encode-0, encode-1, prefill-0, decode-0) with an admin key. Eight greedy streams run
undisturbed once (the reference); then, for each switch, the same eight run again and the switch
is asked for once every stream has produced a few tokens: every stream must complete with exactly
the reference tokens and text (nothing lost, duplicated or changed), the worker must then be
listed in its new role with the new epoch, and new requests must equal transformers' tokens.

The default suite runs encode-1 -> decode (the issue's case) and the refusals (400 / 401 / 404 /
409). The slow cycle takes the deployment through every other direction and back to where it
began: decode-0 -> prefill (its decodes handed over at once: a drain deadline of 0), prefill-0 ->
encode, prefill-0 -> prefill, decode-0 -> decode, encode-1 -> encode.
"""

from __future__ import annotations

import asyncio
import json
import re
import time

import aiohttp
import pytest

from router.serve import ROOT, Deployment, load_config
from bus.client import AsyncClient, Client, ClientRequestError
from tests.e2e_util import chat_body, read_chat_stream, reference

pytestmark = pytest.mark.e2e

KEY = "switch-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
N_STREAMS = 8
MAX_TOKENS = 512
SWITCH_AFTER = 4  # tokens every stream has streamed when the switch is asked for


@pytest.fixture(scope="module")
def dep(llava_dir, tmp_path_factory):
    cfg = load_config(ROOT / "configs" / "2e1p1d.yaml")
    cfg["router"]["admin_key"] = KEY
    d = Deployment(cfg, llava_dir, log_dir=tmp_path_factory.mktemp("logs-role-switch"))
    d.start(timeout=240)
    yield d
    d.stop()


@pytest.fixture(scope="module")
def bodies(test_images):
    texts = ["Tell me about rivers", "Describe the picture", "Count to a hundred", "Why is the sky blue",
             "A story about a cat", "List the colours", "Explain the tides", "What is in the image"]
    return [chat_body("tiny-llava", f"{texts[i]} #{i}", [test_images[i % len(test_images)]] if i % 4 else [],
                      stream=True, max_tokens=MAX_TOKENS, ignore_eos=True, return_token_ids=True,
                      stream_options={"include_usage": True}) for i in range(N_STREAMS)]


@pytest.fixture(scope="module")
def undisturbed(dep, bodies):
    got = asyncio.run(_run(dep.url, bodies))[:-1]
    assert all(g["error"] is None and len(g["ids"]) == MAX_TOKENS for g in got), got
    return got


_stream = read_chat_stream


async def _run(url: str, bodies: list[dict], switch: tuple | None = None) -> list[dict]:
    """Every body as a stream; ``switch`` = (worker, body, SDK address or None) is asked for once
    each has SWITCH_AFTER tokens, and its answer is the last item."""
    progress = [0] * len(bodies)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as s:
        tasks = [asyncio.create_task(_stream(s, url, b, progress, i)) for i, b in enumerate(bodies)]
        answer = None
        if switch is not None:
            while min(progress) < SWITCH_AFTER and not all(t.done() for t in tasks):
                await asyncio.sleep(0.01)
            ended = [(i, t.result()) for i, t in enumerate(tasks) if t.done()]
            assert not ended, f"streams ended before the switch (make them longer?): {progress} {ended}"
            async with s.get(f"{url}/admin/workers", headers=AUTH) as r:
                held = {w["worker_id"]: w["in_flight"] for w in (await r.json())["workers"]}[switch[0]]
            answer = await _post_role(s, url, switch[0], switch[1], sdk=switch[2])
            answer = (answer[0], {**answer[1], "held_before": held})  # its requests when asked
            # Asked again: refused, whether the first is still under way or (a fast switch) done
            # already (then the worker has that role). Any other role could start a second switch.
            assert (await _post_role(s, url, switch[0], {"role": switch[1]["role"]}, sdk=switch[2]))[0] == 409
        return [*(await asyncio.gather(*tasks)), answer]


async def _post_role(s, url: str, worker: str, body, headers=AUTH, sdk: str | None = None) -> tuple[int, dict]:
    """Over HTTP, or over the ZeroMQ SDK at address ``sdk``: (status, answer)."""
    if sdk is not None:
        c = AsyncClient(sdk, admin_key=KEY, timeout=30)
        try:
            return 202, await c.switch_role(worker, body["role"], body.get("drain_s"))
        except ClientRequestError as e:
            return e.status, {"error": {"message": e.message}}
        finally:
            c.close()
    data = body if isinstance(body, str) else json.dumps(body)
    async with s.post(f"{url}/admin/workers/{worker}/role", data=data, headers=headers) as r:
        return r.status, await r.json()


def _admin(url: str, path: str = "/admin/workers"):
    async def get():
        async with aiohttp.ClientSession() as s, s.get(f"{url}{path}", headers=AUTH) as r:
            assert r.status == 200
            return await (r.json() if path.startswith("/admin") else r.text())
    return asyncio.run(get())


def _wait_role(url: str, worker: str, role: str, epoch: int, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        w = {w["worker_id"]: w for w in _admin(url)["workers"]}[worker]
        if w["role"] == role and w["role_state"] == "active" and w["epoch"] == epoch:
            return w
        time.sleep(0.1)
    raise AssertionError(f"{worker} not an active {role} worker of epoch {epoch}: {w}")


def _switches(url: str, old: str, new: str) -> float:
    m = re.search(rf'^epd:role_switches_total{{from="{old}",to="{new}"}} (\S+)$', _admin(url, "/metrics"), re.M)
    return float(m.group(1)) if m else 0.0


def _recoveries(url: str) -> float:
    return sum(float(v) for v in re.findall(r'^epd:request_recoveries_total{[^}]*} (\S+)$', _admin(url, "/metrics"),
                                            re.M))


def _switch_under_load(dep, bodies, undisturbed, worker: str, role: str, drain_s: float | None = None,
                       sdk: bool = False) -> float:
    """Switch ``worker`` to ``role`` with the streams in flight; returns the switch's seconds."""
    before = {w["worker_id"]: w for w in _admin(dep.url)["workers"]}[worker]
    moved = _recoveries(dep.url)
    body = {"role": role, **({"drain_s": drain_s} if drain_s is not None else {})}
    t0 = time.monotonic()
    *got, (status, answer) = asyncio.run(_run(dep.url, bodies, (worker, body, dep.client_addr if sdk else None)))
    assert status == 202, answer
    assert answer["epoch"] == before["epoch"] + 1 and answer["from"] == before["role"] and answer["role"] == role
    for i, (g, w) in enumerate(zip(got, undisturbed)):
        assert g["error"] is None, (i, g["error"])
        assert g["ids"] == w["ids"] and g["text"] == w["text"], f"stream {i} differs from the undisturbed run"
        assert g["usage"]["completion_tokens"] == MAX_TOKENS, g["usage"]  # each token counted once
    after = _wait_role(dep.url, worker, role, answer["epoch"])
    assert after["incarnation"] == before["incarnation"]  # the same process: no restart
    _admin(dep.url, "/health")  # 200: the roles it expects moved with the worker
    assert after["cost_model"]["source"] in ("profiled", "cache")  # measured for the new role
    assert _switches(dep.url, before["role"], role) >= 1
    if drain_s == 0 and answer["held_before"]:  # its decodes were handed over at once: the
        assert _recoveries(dep.url) > moved        # recovery path moved them (the plan may have
        # put every stream on the other decoder: then nothing was the switched worker's to hand over)
    return time.monotonic() - t0


def _serves_exact(dep, llava_dir, test_images) -> None:
    """New requests (with and without images) equal transformers' greedy tokens."""
    cases = [("What is in this picture?", [test_images[0]]), ("Hello there", []),
             ("Compare these", [test_images[1], test_images[2]])]

    async def run():
        async with aiohttp.ClientSession() as s:
            async def one(text, imgs):
                async with s.post(f"{dep.url}/v1/chat/completions",
                                  json=chat_body("tiny-llava", text, imgs, return_token_ids=True)) as r:
                    assert r.status == 200, await r.text()
                    return (await r.json())["choices"][0]["token_ids"]
            return await asyncio.gather(*(one(t, i) for t, i in cases))

    for (text, imgs), got in zip(cases, asyncio.run(run())):
        assert got == reference(llava_dir, text, imgs), text


def test_refusals(dep):
    """400 bad role or body, 401 without the admin key, 404 unknown worker, 409 the last decode
    worker / its own role; nothing refused changes a worker."""
    async def run():
        async with aiohttp.ClientSession() as s:
            url = dep.url
            assert (await _post_role(s, url, "decode-0", {"role": "prefill"}, headers={}))[0] == 401
            assert (await _post_role(s, url, "decode-0", {"role": "prefill"},
                                     headers={"Authorization": "Bearer wrong"}))[0] == 401
            assert (await _post_role(s, url, "nobody-7", {"role": "decode"}))[0] == 404
            for bad in ({"role": "mixed"}, {"role": "boss"}, {"role": 3}, {}, "not json", "[1]",
                        {"role": "decode", "drain_s": -1}):
                status, out = await _post_role(s, url, "encode-0", bad)
                assert status == 400, (bad, out)
            status, out = await _post_role(s, url, "decode-0", {"role": "encode"})
            assert status == 409 and "last live decode" in out["error"]["message"], out
            assert (await _post_role(s, url, "prefill-0", {"role": "decode"}))[0] == 409  # the last prefill
            assert (await _post_role(s, url, "encode-0", {"role": "encode"}))[0] == 409  # already one

    asyncio.run(run())
    # The same over the ZeroMQ SDK, behind the same key.
    c = Client(dep.client_addr, timeout=30)
    for call, status in ((lambda: c.workers(), 401), (lambda: c.switch_role("decode-0", "prefill"), 401)):
        with pytest.raises(ClientRequestError) as e:
            call()
        assert e.value.status == status
    c.admin_key = KEY
    assert {w["worker_id"] for w in c.workers()["workers"]} == {"encode-0", "encode-1", "prefill-0", "decode-0"}
    for args, status in ((("nobody-7", "decode"), 404), (("encode-0", "boss"), 400), (("decode-0", "encode"), 409)):
        with pytest.raises(ClientRequestError) as e:
            c.switch_role(*args)
        assert e.value.status == status, args
    c.close()
    assert all(w["role_state"] == "active" and w["epoch"] == 0 for w in _admin(dep.url)["workers"])


def test_encode_to_decode_under_load(dep, bodies, undisturbed, llava_dir, test_images):
    """The issue's case: encode-1 becomes a decode worker with 8 greedy streams in flight."""
    took = _switch_under_load(dep, bodies, undisturbed, "encode-1", "decode")
    print(f"encode-1 -> decode under load: {took:.2f} s (streams included)")
    roles = {w["worker_id"]: w["role"] for w in _admin(dep.url)["workers"]}
    assert roles == {"encode-0": "encode", "encode-1": "decode", "prefill-0": "prefill", "decode-0": "decode"}
    _serves_exact(dep, llava_dir, test_images)


# Every other direction, in an order that always leaves each role a live worker, ending where
# 2e1p1d began. decode-0 -> prefill hands its long decodes to encode-1 (a decoder since the test
# above) at once (a drain deadline of 0): the recovery path, no token lost or duplicated.
# prefill-0 -> prefill is asked for over the ZeroMQ SDK.
CYCLE = [("decode-0", "prefill", 0), ("prefill-0", "encode", None), ("prefill-0", "prefill", None),
         ("decode-0", "decode", None), ("encode-1", "encode", None)]


@pytest.mark.slow
@pytest.mark.parametrize("worker,role,drain_s", CYCLE, ids=[f"{w}-to-{r}" for w, r, _ in CYCLE])
def test_every_direction_under_load(dep, bodies, undisturbed, llava_dir, test_images, worker, role, drain_s):
    roles = {w["worker_id"]: w["role"] for w in _admin(dep.url)["workers"]}
    if roles["encode-1"] != "decode" and worker != "encode-1":
        test_encode_to_decode_under_load(dep, bodies, undisturbed, llava_dir, test_images)  # run alone (-k)
    took = _switch_under_load(dep, bodies, undisturbed, worker, role, drain_s,
                              sdk=(worker, role) == ("prefill-0", "prefill"))
    print(f"{worker} -> {role} under load: {took:.2f} s (streams included)")
    _serves_exact(dep, llava_dir, test_images)


@pytest.mark.slow
def test_switch_storm(dep, llava_dir):
    """encode-1 flips between encode and decode at random moments while requests with new images
    (encodes in flight, embeddings still to be pulled) keep coming: every answer equals
    transformers', none is lost."""
    import random

    import numpy as np
    from PIL import Image

    rng, pick = np.random.default_rng(5), random.Random(5)
    flips = 0

    async def round_(k: int):
        nonlocal flips
        cases = [(f"Look #{k}.{i}", [Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 56, 3), dtype=np.uint8))
                                      for _ in range(1 + i % 2)]) for i in range(6)]
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
            async def one(text, imgs):
                async with s.post(f"{dep.url}/v1/chat/completions",
                                  json=chat_body("tiny-llava", text, imgs, return_token_ids=True)) as r:
                    assert r.status == 200, await r.text()
                    return (await r.json())["choices"][0]["token_ids"]
            tasks = [asyncio.create_task(one(t, i)) for t, i in cases]
            await asyncio.sleep(pick.uniform(0, 0.3))
            role = {w["worker_id"]: w["role"] for w in (await (await s.get(f"{dep.url}/admin/workers",
                                                                          headers=AUTH)).json())["workers"]}
            status, out = await _post_role(s, dep.url, "encode-1",
                                           {"role": "decode" if role["encode-1"] == "encode" else "encode"})
            assert status in (202, 409), out
            flips += status == 202
            return cases, await asyncio.gather(*tasks)

    for k in range(6):
        cases, got = asyncio.run(round_(k))
        for (text, imgs), ids in zip(cases, got):
            assert ids == reference(llava_dir, text, imgs), text
    assert flips >= 3
    roles = {w["worker_id"]: w for w in _admin(dep.url)["workers"]}
    if roles["encode-1"]["role"] != "encode":  # leave 2e1p1d as it was for any test after this one
        _wait_role(dep.url, "encode-1", roles["encode-1"].get("switching_to") or roles["encode-1"]["role"],
                   roles["encode-1"]["epoch"] + (roles["encode-1"]["role_state"] != "active"))
