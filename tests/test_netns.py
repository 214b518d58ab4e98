"""Across hosts: the router and each stage of 1e1p1d in a network namespace of its own.

Four namespaces (router + API, encode, prefill, decode) hang off one bridge,
each with its own address, as four machines on one LAN would. Every worker
binds its transfer server on its own address and registers with the router
over TCP; the test process, in the root namespace, is the client. Requests
must give transformers' greedy tokens, and ``/metrics`` must show the pulls
went through the named backend, none through shared memory. Under ``auto``
every worker also runs shm, so its zero there shows the choice at work: a
host id includes the network namespace, and shm is never taken between hosts.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
import urllib.request

import aiohttp
import pytest

from router.serve import ROOT, load_config
from tests.e2e_util import chat_body, reference
from tests.netns_util import Lan, NetnsDeployment, unavailable

pytestmark = pytest.mark.e2e

HOSTS = ["router", "encode-0", "prefill-0", "decode-0"]  # Deployment's worker ids for 1e1p1d


@pytest.fixture(scope="module")
def lan():
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    net = Lan(str(os.getpid()), HOSTS)
    try:
        yield net.up()
    finally:
        net.down()
        time.sleep(0.5)  # namespaces go asynchronously; the veth ends follow them
        assert not net.leftovers(), f"left behind: {net.leftovers()}"


@pytest.fixture(scope="module")
def cases(test_images, llava_dir):
    texts = ["What is in this picture?", "Describe the colours", "Hello there", "Compare these",
             "Tell me a story about rivers", "Count the objects"]
    out = []
    for i, text in enumerate(texts):
        imgs = [test_images[(i + j) % len(test_images)] for j in range(i % 3)]
        out.append((f"{text} #{i}", imgs, reference(llava_dir, f"{text} #{i}", imgs)))
    return out


def ucx_unavailable() -> str | None:
    from transfer.base import TransferError
    from transfer.select import make_backend

    try:
        make_backend("ucx", "127.0.0.1")  # built, never started: nothing to close
    except (ValueError, ImportError, TransferError) as e:
        return f"transfer backend 'ucx' is not usable here: {e}"
    return None


@pytest.fixture(params=["zmq", "ucx", "auto"])
def deployment(request, lan, llava_dir, tmp_path_factory):
    if request.param == "ucx":
        reason = ucx_unavailable()
        if reason:
            pytest.skip(reason)
    cfg = load_config(ROOT / "configs" / "1e1p1d.yaml")
    dep = NetnsDeployment(cfg, llava_dir, lan, transfer=request.param,
                          log_dir=tmp_path_factory.mktemp(f"netns-{request.param}"))
    try:
        dep.start(timeout=120)
        yield dep
    finally:
        dep.stop()


def metric_sums(dep, name: str, label: str) -> dict[str, float]:
    """``name`` from ``/metrics``, summed over its series by the value of ``label``."""
    with urllib.request.urlopen(f"{dep.url}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for labels, value in re.findall(rf'^{re.escape(name)}\{{([^}}]*)\}} (\S+)$', text, re.M):
        key = re.search(rf'{label}="([^"]*)"', labels).group(1)
        out[key] = out.get(key, 0.0) + float(value)
    return out


def test_requests_across_namespaces(deployment, cases, lan):
    dep = deployment
    assert dep.url.startswith(f"http://{lan.addr['router']}:")
    # Each worker's transfer server is on its own host's address, not the router's nor loopback.
    for wid in HOSTS[1:]:
        argv = dep.argv[wid][0]
        assert argv[:4] == lan.exec_argv(wid) and argv[argv.index("--host") + 1] == lan.addr[wid]

    url = f"{dep.url}/v1/chat/completions"

    async def run():
        async with aiohttp.ClientSession() as s:
            async def one(text, imgs):
                body = chat_body(dep.name, text, imgs, return_token_ids=True)
                async with s.post(url, json=body) as r:
                    return r.status, await r.json()
            return await asyncio.gather(*(one(t, im) for t, im, _ in cases))

    for i, ((status, body), (_, _, ref)) in enumerate(zip(asyncio.run(run()), cases)):
        assert status == 200, body
        assert body["choices"][0]["token_ids"] == ref, f"request {i}"

    # Worker counters reach /metrics with the next heartbeat (1 s).
    want = dep.transfer if dep.transfer != "auto" else None
    deadline = time.monotonic() + 10
    while True:
        pulls = metric_sums(dep, "epd:transfer_pulls_total", "backend")
        encoded = metric_sums(dep, "epd:images_encoded_total", "role")
        moved = sum(v for k, v in pulls.items() if k == want or (want is None and k != "shm"))
        if (moved > 0 and encoded.get("encode", 0) > 0) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert pulls.get("shm", 0) == 0, f"pulls went through shared memory between namespaces: {pulls}"
    assert moved > 0, f"no pulls by {want or 'a network backend'}: {pulls}"
    if want is None:  # shm was on offer (a zero under its label) and not taken
        assert "shm" in pulls, pulls
    # Every image was encoded on the encode host and its embedding moved; a prefill worker that
    # encodes one itself has given up pulling it (its log says why).
    assert encoded.get("encode", 0) > 0 and encoded.get("prefill", 0) == 0, encoded
