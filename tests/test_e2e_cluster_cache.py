"""The cluster cache end to end: 2 encode, 2 prefill, 1 decode worker as real processes.

- The same image in many requests, spread over both encode workers, is
  encoded once in the whole cluster (``epd:images_encoded_total``).
- A prefill worker takes a shared prompt prefix's KV from the worker holding
  it instead of computing it (``epd:kv_prefix_blocks_fetched_total``).
- An encode worker wedged (SIGSTOP) while holding an embedding: the prefill
  worker's pull times out within ``pull_timeout_s`` and it encodes the image
  itself; answers stay token-exact and other requests carry on.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
import urllib.request

import aiohttp
import pytest

from router.serve import ROOT, Deployment, load_config
from tests.e2e_util import MAX_TOKENS, chat_body, reference

pytestmark = pytest.mark.e2e

PULL_TIMEOUT_S = 2.0
SHARED = "Read the following notes with care, then answer the question at the end in a few words. " * 4


@pytest.fixture(scope="module")
def dep(llava_dir, tmp_path_factory):
    cfg = load_config(ROOT / "configs" / "2e1p1d.yaml")
    cfg["workers"] = [{"role": "encode", "count": 2}, {"role": "prefill", "count": 2},
                      {"role": "decode", "count": 1}]
    cfg["router"] = {**cfg.get("router", {}), "policy": "round_robin", "heartbeat_timeout": 4.0}
    cfg["transfer"] = {**cfg.get("transfer", {}), "pull_timeout_s": PULL_TIMEOUT_S}
    d = Deployment(cfg, llava_dir, log_dir=tmp_path_factory.mktemp("logs-cluster-cache"))
    d.start(timeout=240)
    yield d
    for p in d.procs.values():  # a worker a test stopped must not outlive the module
        try:
            os.kill(p.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    d.stop()


def _metric(dep, name: str) -> dict[str, float]:
    """worker -> value of an ``epd:`` gauge labelled by worker (read after a heartbeat)."""
    with urllib.request.urlopen(f"{dep.url}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for labels, value in re.findall(rf"^{re.escape(name)}\{{([^}}]*)\}} ([0-9.e+-]+)$", text, re.M):
        worker = re.search(r'worker="([^"]+)"', labels) or re.search(r'event="([^"]+)"', labels)
        out[worker.group(1)] = float(value)
    return out


async def _chat(session, dep, text, imgs):
    async with session.post(f"{dep.url}/v1/chat/completions",
                            json=chat_body("tiny-llava", text, imgs, return_token_ids=True)) as r:
        body = await r.json()
        assert r.status == 200, body
        return body["choices"][0]["token_ids"]


def _run(coro):
    return asyncio.run(coro)


def _settle():
    time.sleep(1.3)  # one heartbeat carries the counters to the router


def test_same_image_is_encoded_once_across_encoders(dep, llava_dir, test_images):
    img = test_images[2]
    texts = [f"What is in this picture? #{i}" for i in range(10)]

    async def run():
        async with aiohttp.ClientSession() as s:
            first = await asyncio.gather(*(_chat(s, dep, t, [img]) for t in texts[:6]))  # concurrently
            rest = [await _chat(s, dep, t, [img]) for t in texts[6:]]  # then one by one
            return first + rest

    got = _run(run())
    for text, ids in zip(texts, got):
        assert ids == reference(llava_dir, text, [img])[:MAX_TOKENS]
    _settle()
    encoded = _metric(dep, "epd:images_encoded_total")
    assert sum(encoded.values()) == 1, encoded  # encode and prefill workers alike
    events = _metric(dep, "epd:cluster_cache_total")
    assert events["images_from_cluster_cache"] + events["images_encode_shared"] == len(texts) - 1


def test_prefill_takes_a_shared_prefix_from_its_holder(dep, llava_dir):
    questions = [SHARED + q for q in ("Which colour is the sky?", "How many legs has a cat?",
                                      "What is two plus two?")]

    async def run():
        async with aiohttp.ClientSession() as s:
            out = []
            for q in questions:  # round robin: the later ones land on the other prefill worker
                out.append(await _chat(s, dep, q, []))
                await asyncio.sleep(0.3)  # the holder's cache event reaches the index
            return out

    got = _run(run())
    for q, ids in zip(questions, got):
        assert ids == reference(llava_dir, q, [])[:MAX_TOKENS]
    _settle()
    fetched = _metric(dep, "epd:kv_prefix_blocks_fetched_total")
    assert sum(v for w, v in fetched.items() if w.startswith("prefill")) >= 4, fetched
    assert sum(_metric(dep, "epd:kv_prefix_blocks_exported_total").values()) >= 4


def test_wedged_encoder_mid_transfer_falls_back_to_encoding(dep, llava_dir, test_images):
    img = test_images[4]
    text = "Describe the colours"

    async def first():
        async with aiohttp.ClientSession() as s:
            return await _chat(s, dep, text + " #0", [img])

    _settle()
    before = _metric(dep, "epd:images_encoded_total")
    assert _run(first()) == reference(llava_dir, text + " #0", [img])[:MAX_TOKENS]
    _settle()
    after = _metric(dep, "epd:images_encoded_total")
    (holder,) = [w for w in after if w.startswith("encode") and after[w] > before.get(w, 0)]
    fallbacks_before = sum(_metric(dep, "epd:embedding_pull_fallbacks_total").values())
    os.kill(dep.procs[holder].pid, signal.SIGSTOP)  # wedged: alive, holding the embedding, silent

    async def during():
        async with aiohttp.ClientSession() as s:
            t0 = time.monotonic()
            other = asyncio.create_task(_chat(s, dep, "Hello there, no picture", []))
            ids = await _chat(s, dep, text + " #1", [img])
            return ids, time.monotonic() - t0, await other

    ids, took, other_ids = _run(during())
    assert ids == reference(llava_dir, text + " #1", [img])[:MAX_TOKENS]
    assert other_ids == reference(llava_dir, "Hello there, no picture", [])[:MAX_TOKENS]
    assert took < PULL_TIMEOUT_S + 20, took  # bounded by the pull timeout, not hung
    _settle()
    assert sum(_metric(dep, "epd:embedding_pull_fallbacks_total").values()) > fallbacks_before
