"""Role-aware workers as real processes: the encode worker announces no KV pool, the router
plans around it, and an image request is still token-exact with transformers."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from tests.e2e_util import chat_body, reference, start

pytestmark = pytest.mark.e2e


def test_encode_worker_has_no_kv_pool(llava_dir, test_images, tmp_path):
    dep = start("1e1p1d", llava_dir, tmp_path)
    try:
        async def run():
            async with aiohttp.ClientSession() as s:
                async with s.get(f"{dep.url}/admin/workers") as r:
                    assert r.status == 200
                    workers = (await r.json())["workers"]
                text, imgs = "What is in these two pictures?", test_images[:2]
                async with s.post(f"{dep.url}/v1/chat/completions",
                                  json=chat_body(dep.name, text, imgs, return_token_ids=True)) as r:
                    assert r.status == 200, await r.text()
                    out = await r.json()
                return workers, out["choices"][0]["token_ids"], reference(llava_dir, text, imgs)

        workers, got, want = asyncio.run(run())
        blocks = {w["role"]: w["kv_blocks_total"] for w in workers}
        assert blocks["encode"] == 0 and blocks["prefill"] > 0 and blocks["decode"] > 0, blocks
        enc = next(w for w in workers if w["role"] == "encode")
        assert enc["cost_model"]["kv_capacity_tokens"] == 0
        assert got == want
    finally:
        dep.stop()
