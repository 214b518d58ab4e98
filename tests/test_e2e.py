"""End to end: real processes for each shipped config, real clients, tokens equal transformers'.

Each config is brought up once (router + workers as processes, as ``epd-serve``
does) and fed 16 concurrent chat requests with 0-3 images through aiohttp,
the official ``openai`` package (streaming and not) and the ZeroMQ SDK.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from tests.e2e_util import CONFIGS, chat_body, chat_cases, reference, reference_prompt, start

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cases(test_images, llava_dir):
    cs = chat_cases(test_images)
    return [(text, imgs, reference(llava_dir, text, imgs)) for text, imgs in cs]


@pytest.fixture(scope="module")
def prompt_lens(cases, llava_dir):
    """transformers' prompt length per case (bos and expanded images included)."""
    return [len(reference_prompt(llava_dir, text, imgs)) for text, imgs, _ in cases]


@pytest.fixture(scope="module", params=CONFIGS)
def deployment(request, llava_dir, tmp_path_factory):
    dep = start(request.param, llava_dir, tmp_path_factory.mktemp(f"logs-{request.param}"))
    yield dep
    dep.stop()
    assert all(p.poll() is not None for p in dep.procs.values())


async def _post(session, url, body):
    async with session.post(url, json=body) as r:
        return r.status, await r.json()


async def _stream(session, url, body):
    ids, text, finish = [], "", None
    async with session.post(url, json=body) as r:
        assert r.status == 200, await r.text()
        async for raw in r.content:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            for ch in chunk["choices"]:
                ids += ch.get("token_ids") or []
                text += ch["delta"].get("content") or ""
                finish = ch.get("finish_reason") or finish
    return ids, text, finish


def test_aiohttp_concurrent(deployment, cases, prompt_lens):
    url = f"{deployment.url}/v1/chat/completions"

    async def run():
        async with aiohttp.ClientSession() as s:
            tasks = []
            for i, (text, imgs, _) in enumerate(cases):
                body = chat_body(deployment.name, text, imgs, return_token_ids=True, stream=i % 2 == 1)
                tasks.append(_stream(s, url, body) if i % 2 else _post(s, url, body))
            return await asyncio.gather(*tasks)

    results = asyncio.run(run())
    for i, (res, (_, _, ref)) in enumerate(zip(results, cases)):
        if i % 2:
            ids, _, finish = res
        else:
            status, body = res
            assert status == 200, body
            ids, finish = body["choices"][0]["token_ids"], body["choices"][0]["finish_reason"]
            assert body["usage"]["prompt_tokens"] == prompt_lens[i], f"request {i}"
        assert ids == ref, f"request {i}"
        assert finish in ("stop", "length")


def test_openai_package(deployment, cases, prompt_lens, llava_dir):
    import openai

    from tests.hf_reference import load_hf

    tok = load_hf(llava_dir)[1]
    client = openai.AsyncOpenAI(base_url=f"{deployment.url}/v1", api_key="none", max_retries=0)

    async def one(i, text, imgs):
        body = chat_body(deployment.name, text, imgs)
        kw = dict(model=body["model"], messages=body["messages"], max_tokens=body["max_tokens"], temperature=0,
                  extra_body={"return_token_ids": True})
        if i % 2:
            stream = await client.chat.completions.create(stream=True, **kw)
            pieces, ids = [], []
            async for c in stream:
                if c.choices:
                    pieces.append(c.choices[0].delta.content or "")
                    ids += (c.choices[0].model_extra or {}).get("token_ids") or []
            return "".join(pieces), ids, None
        resp = await client.chat.completions.create(**kw)
        # return_token_ids puts token_ids on every choice: the package keeps it as an extra field.
        return resp.choices[0].message.content, resp.choices[0].model_extra["token_ids"], resp.usage.prompt_tokens

    async def run():
        return await asyncio.gather(*(one(i, t, im) for i, (t, im, _) in enumerate(cases)))

    for i, ((text, ids, n_prompt), (_, _, ref)) in enumerate(zip(asyncio.run(run()), cases)):
        assert text == tok.decode(ref, skip_special_tokens=True), f"request {i}"
        assert ids == ref, f"request {i}"
        if i % 2 == 0:  # the streams did not ask for usage
            assert n_prompt == prompt_lens[i], f"request {i}"


def test_zmq_sdk(deployment, cases, prompt_lens):
    from bus.client import AsyncClient, Client, image_part
    from tests.e2e_util import png_bytes

    def messages(text, imgs):
        return [{"role": "user", "content": [image_part(png_bytes(im)) for im in imgs]
                 + [{"type": "text", "text": text}]}]

    async def run():
        c = AsyncClient(deployment.client_addr, model=deployment.name)
        try:
            ready, _ = await c.health()
            assert ready
            return await asyncio.gather(*(c.generate(messages=messages(t, im), max_tokens=12, temperature=0)
                                          for t, im, _ in cases))
        finally:
            c.close()

    outs = asyncio.run(run())
    assert [o.token_ids for o in outs] == [ref for _, _, ref in cases]
    assert [o.prompt_tokens for o in outs] == prompt_lens
    sync = Client(deployment.client_addr, model=deployment.name)
    try:
        text, imgs, ref = cases[1]
        streamed = [d for d in sync.stream(messages=messages(text, imgs), max_tokens=12, temperature=0)]
        assert sum((d.token_ids for d in streamed), []) == ref
        assert streamed[-1].finish_reason in ("stop", "length")
    finally:
        sync.close()


def _encoded_per_worker(metrics_text: str) -> dict[str, float]:
    import re

    return {w: float(v) for w, v in re.findall(r'^epd:images_encoded_total\{role="encode",worker="([^"]+)"\} (\S+)$',
                                              metrics_text, re.M)}


def test_planned_dispatch(deployment, llava_dir):
    """Every worker shows its measured cost model; the router's prompt counts equal the workers';
    on 2e1p1d four new images are encoded on both encoders in parallel, answer unchanged."""
    import numpy as np
    from PIL import Image
    import time

    async def get(session, path):
        async with session.get(f"{deployment.url}{path}") as r:
            assert r.status == 200
            return await (r.json() if path.startswith("/admin") else r.text())

    async def run():
        async with aiohttp.ClientSession() as s:
            workers = (await get(s, "/admin/workers"))["workers"]
            assert workers and all(w["cost_model"]["source"] in ("profiled", "cache") for w in workers)
            assert all("step" in w["cost_model"] for w in workers if w["role"] != "encode")
            encoders = [w["worker_id"] for w in workers if w["role"] == "encode"]
            if len(encoders) < 2:
                return await get(s, "/metrics")
            # The counters arrive with heartbeats (1 s): wait until the earlier tests' encodes are in.
            before = _encoded_per_worker(await get(s, "/metrics"))
            for _ in range(10):
                await asyncio.sleep(1.2)
                now = _encoded_per_worker(await get(s, "/metrics"))
                if now == before:
                    break
                before = now
            rng = np.random.default_rng(77)
            imgs = [Image.fromarray(rng.integers(0, 255, (50 + 10 * i, 70, 3), dtype=np.uint8)) for i in range(4)]
            text = "Compare the four pictures"
            status, out = await _post(s, f"{deployment.url}/v1/chat/completions",
                                      chat_body(deployment.name, text, imgs, return_token_ids=True))
            assert status == 200, out
            assert out["choices"][0]["token_ids"] == reference(llava_dir, text, imgs)
            deadline = time.monotonic() + 10  # counters arrive with heartbeats
            while True:
                after = _encoded_per_worker(metrics := await get(s, "/metrics"))
                grew = [w for w in encoders if after.get(w, 0) > before.get(w, 0)]
                if len(grew) == len(encoders) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.3)
            assert grew == encoders, (before, after)
            assert sum(after.values()) - sum(before.values()) == 4
            return metrics

    metrics = asyncio.run(run())
    assert "epd:prompt_token_count_mismatch_total 0.0" in metrics
