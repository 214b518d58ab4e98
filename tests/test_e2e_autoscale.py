"""The autoscaler with real processes: 2e1p1d (tiny LLaVA), autoscale on with short intervals.

Long greedy answers pile predicted decode work on decode-0 while both encoders idle: the
controller must move one encoder to decode (once: the cool-down outlasts the test), through the
live switch, with no request lost and every answer equal to transformers' greedy tokens.
"""

from __future__ import annotations

import asyncio
import re
import time

import aiohttp
import pytest

from router.serve import ROOT, Deployment, load_config
from tests.e2e_util import _conversation, chat_body

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

KEY = "autoscale-key"
N = 12
MAX_TOKENS = 400
AUTOSCALE = {"interval_s": 0.25, "cooldown_s": 600, "persist": 2, "margin": 0.1, "min_backlog_s": 0.2}


@pytest.fixture(scope="module")
def dep(llava_dir, tmp_path_factory):
    cfg = load_config(ROOT / "configs" / "2e1p1d.yaml")
    cfg["router"]["admin_key"] = KEY
    cfg["router"]["autoscale"] = AUTOSCALE
    d = Deployment(cfg, llava_dir, log_dir=tmp_path_factory.mktemp("logs-autoscale"))
    d.start(timeout=240)
    yield d
    d.stop()


def _get(url: str, path: str, auth: bool = False):
    async def get():
        async with aiohttp.ClientSession() as s:
            async with s.get(url + path, headers={"Authorization": f"Bearer {KEY}"} if auth else {}) as r:
                return await (r.json() if path.startswith("/admin") else r.text())
    return asyncio.run(get())


def _roles(url: str) -> dict[str, str]:
    return {w["worker_id"]: w["role"] for w in _get(url, "/admin/workers", auth=True)["workers"]}


def test_decode_heavy_load_moves_an_encoder_to_decode(dep, llava_dir, test_images):
    from tests.hf_reference import hf_chat

    cases = [(f"Tell me a long story #{i}", [test_images[i % len(test_images)]] if i % 3 == 0 else [])
             for i in range(N)]
    assert _roles(dep.url) == {"encode-0": "encode", "encode-1": "encode", "prefill-0": "prefill",
                               "decode-0": "decode"}

    async def run():
        async with aiohttp.ClientSession() as s:
            async def one(text, imgs):
                body = chat_body("tiny-llava", text, imgs, max_tokens=MAX_TOKENS, return_token_ids=True)
                async with s.post(f"{dep.url}/v1/chat/completions", json=body) as r:
                    assert r.status == 200, await r.text()
                    return (await r.json())["choices"][0]["token_ids"]
            return await asyncio.gather(*(one(t, i) for t, i in cases))

    t0 = time.monotonic()
    got = asyncio.run(run())
    took = time.monotonic() - t0
    metrics = _get(dep.url, "/metrics")
    moves = {(a, b): float(v) for a, b, v in re.findall(
        r'^epd:autoscale_decisions_total\{from="(\w+)",reason="\w+",to="(\w+)"\} (\S+)$', metrics, re.M)}
    assert moves == {("encode", "decode"): 1.0}, (moves, took)
    deadline = time.monotonic() + 60
    while (roles := _roles(dep.url)) and sorted(roles.values()).count("decode") < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sorted(roles.values()) == ["decode", "decode", "encode", "prefill"], roles
    assert 'epd:role_switches_total{from="encode",to="decode"} 1.0' in _get(dep.url, "/metrics")
    for (text, imgs), ids in zip(cases, got):  # nothing lost or changed by the move
        assert ids == hf_chat(llava_dir, _conversation(text, imgs), imgs, MAX_TOKENS)[1], text
