"""End to end over UCX: each shipped config with ``--transfer ucx``, tokens equal transformers'.

Every worker runs the ucx backend alone, so every embedding and KV pull of a
disaggregated config must go over UCX, and ``/metrics`` must say so.
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request

import aiohttp
import pytest

from tests.e2e_util import CONFIGS, chat_body, chat_cases, reference, start
from transfer.ucx_backend import INSTALL_HINT, ucx_available

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not ucx_available(), reason=f"ucxx is not installed or UCX does not start ({INSTALL_HINT})"),
]

N_REQUESTS = 8
_PULLS = re.compile(r'^epd:transfer_pulls_total\{([^}]*)\} ([0-9.e+]+)$', re.M)


@pytest.fixture(scope="module")
def cases(test_images, llava_dir):
    return [(text, imgs, reference(llava_dir, text, imgs)) for text, imgs in chat_cases(test_images, N_REQUESTS)]


@pytest.fixture(scope="module", params=CONFIGS)
def deployment(request, llava_dir, tmp_path_factory):
    dep = start(request.param, llava_dir, tmp_path_factory.mktemp(f"logs-ucx-{request.param}"), transfer="ucx")
    yield dep
    dep.stop()


def pulls_by_backend(url: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for labels, value in _PULLS.findall(text):
        backend = re.search(r'backend="([^"]*)"', labels).group(1)
        out[backend] = out.get(backend, 0.0) + float(value)
    return out


def test_ucx_everywhere(deployment, cases):
    url = f"{deployment.url}/v1/chat/completions"

    async def post(s, body):
        async with s.post(url, json=body) as r:
            return r.status, await r.json()

    async def run():
        async with aiohttp.ClientSession() as s:
            return await asyncio.gather(*(post(s, chat_body(deployment.name, text, imgs, return_token_ids=True))
                                          for text, imgs, _ in cases))

    for i, ((status, body), (_, _, ref)) in enumerate(zip(asyncio.run(run()), cases)):
        assert status == 200, body
        assert body["choices"][0]["token_ids"] == ref, f"request {i}"

    if all(w["role"] == "mixed" for w in deployment.cfg["workers"]):
        return  # aggregated: nothing to pull
    deadline = time.monotonic() + 10  # the counters ride on heartbeats
    while True:
        pulls = pulls_by_backend(deployment.url)
        if pulls.get("ucx", 0) > 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert pulls.get("ucx", 0) > 0, pulls
    assert sum(n for b, n in pulls.items() if b != "ucx") == 0, pulls
