"""Chaos: SIGKILL a random worker every few seconds for a minute under continuous load, on a
deployment with spares (1 encoder, 2 prefill, 2 decode) run by ``epd-serve``.

No request hangs; each one either completes token-exact (greedy, against an undisturbed run of
the same prompt) or, rarely, ends with a clean 503 naming what failed; afterwards /health is
200, KV blocks in use are back to their baseline and new requests are served.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import aiohttp
import pytest
import yaml

from router.serve import ROOT
from tests.e2e_util import chat_body, kv_blocks_used
from tests.test_resilience import Serve, _stream

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHAOS_S = 60
KILL_EVERY_S = 5.0
CLIENTS = 6


@pytest.fixture(scope="module")
def serve(llava_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs-chaos")
    cfg = yaml.safe_load((ROOT / "configs" / "1e1p1d.yaml").read_text())
    cfg["workers"] = [{"role": "encode", "count": 1}, {"role": "prefill", "count": 2}, {"role": "decode", "count": 2}]
    cfg["engine"]["threads"] = 1
    path = logs / "1e2p2d.yaml"
    path.write_text(yaml.safe_dump(cfg))
    s = Serve(llava_dir, logs, config=path)
    yield s
    left = s.stop()
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left behind by epd-serve: {left}"


def _bodies(images) -> list[dict]:
    return [chat_body("tiny-llava", f"chaos prompt {i}", [images[i % len(images)]] if i % 2 else [], stream=True,
                      max_tokens=48, ignore_eos=True, return_token_ids=True, temperature=0)
            for i in range(8)]


def test_chaos(serve, test_images):
    bodies = _bodies(test_images)

    async def once(session, body):
        return await _stream(session, serve.url, body, [0], 0)

    async def reference():
        async with aiohttp.ClientSession() as s:
            return [await once(s, b) for b in bodies]

    want = asyncio.run(reference())
    assert all(w["error"] is None and len(w["ids"]) == 48 for w in want)
    baseline = kv_blocks_used(serve.metrics())
    rng = random.Random(7)
    kills: dict[str, int] = {}
    results: list[tuple[int, dict, float]] = []

    async def client(session, stop_at):
        while time.monotonic() < stop_at:
            i = rng.randrange(len(bodies))
            t0 = time.monotonic()
            out = await asyncio.wait_for(once(session, bodies[i]), 240)  # a hang fails here
            results.append((i, out, time.monotonic() - t0))

    def kill_one():
        detail = serve.health()[1].get("workers", {})
        alive = [w for w, d in detail.items() if d["state"] == "alive" and kills.get(w, 0) < 3]
        if alive:
            victim = rng.choice(sorted(alive))
            kills[victim] = kills.get(victim, 0) + 1
            os.kill(detail[victim]["pid"], signal.SIGKILL)

    async def main():
        stop_at = time.monotonic() + CHAOS_S
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as s:
            tasks = [asyncio.create_task(client(s, stop_at)) for _ in range(CLIENTS)]
            while time.monotonic() < stop_at - KILL_EVERY_S:
                await asyncio.sleep(KILL_EVERY_S)
                await asyncio.get_running_loop().run_in_executor(None, kill_one)
            await asyncio.gather(*tasks)

    asyncio.run(main())
    assert sum(kills.values()) >= 5, kills  # a victim is picked among workers alive then (restarts take a while)
    done = [(i, out) for i, out, _ in results if out["error"] is None]
    errors = [out["error"] for _, out, _ in results if out["error"] is not None]
    print(f"kills {kills}; requests {len(results)}, errors {sum(o['error'] is not None for _, o, _ in results)}, "
          f"slowest {max(t for _, _, t in results):.1f} s; errors: {errors[:3]}")
    assert len(done) >= 20, (len(done), errors[:5])
    for i, out in done:
        assert out["ids"] == want[i]["ids"] and out["text"] == want[i]["text"], f"prompt {i} changed"
    # A clean error is a 503 naming the failure, and rare.
    assert len(errors) <= len(results) // 5, errors
    assert all("503" in e or "worker" in e or "failed" in e for e in errors), errors
    serve.wait_healthy(180)
    deadline = time.monotonic() + 30
    while kv_blocks_used(serve.metrics()) > baseline and time.monotonic() < deadline:
        time.sleep(0.5)
    assert kv_blocks_used(serve.metrics()) <= baseline
    again = asyncio.run(reference())
    assert [a["ids"] for a in again] == [w["ids"] for w in want]
