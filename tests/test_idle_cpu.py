"""An idle worker costs (almost) no CPU, whatever transport its pulls took.

A 1e1p1d deployment per transfer backend serves text and image requests (so
embeddings move E -> P and KV moves P -> D over that backend, as ``/metrics``
must show), then sits idle: every process's CPU time (all its threads, from
/proc) over a few seconds must stay under a small bound. ucxx's own blocking
progress mode failed this for ucx: its epoll reader is never re-armed, and
each worker that had pulled or served over UCX spun a core (issue 10, item 5).
"""

from __future__ import annotations

import asyncio
import os
import re
import time
import urllib.request

import aiohttp
import pytest

from tests.e2e_util import chat_body, start
from transfer.ucx_backend import ucx_available

pytestmark = pytest.mark.e2e

IDLE_S = 3.0
# CPU seconds an idle process may use in IDLE_S: heartbeats (1/s), cache-event ticks (10/s) and
# the engine thread's queue timeouts cost ~0.2% of a core; a spinning event loop costs ~100%.
MAX_IDLE_CPU_S = 0.1
_PULLS = re.compile(r'^epd:transfer_pulls_total\{[^}]*backend="([^"]*)"[^}]*\} ([0-9.e+]+)$', re.M)


def cpu_seconds(pid: int) -> float:
    """User + system time of a process, all its threads, so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pulls(url: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for backend, value in _PULLS.findall(text):
        out[backend] = out.get(backend, 0.0) + float(value)
    return out


@pytest.mark.parametrize("backend", [
    pytest.param("ucx", marks=pytest.mark.skipif(not ucx_available(), reason="ucxx is not installed")),
    "shm", "zmq"])
def test_idle_workers_do_not_spin(backend, llava_dir, test_images, tmp_path):
    dep = start("1e1p1d", llava_dir, tmp_path / "logs", transfer=backend)
    try:
        url = f"{dep.url}/v1/chat/completions"

        async def serve():
            async with aiohttp.ClientSession() as s:
                for imgs in ([], test_images[:1], test_images[1:3]):
                    async with s.post(url, json=chat_body(dep.name, "Describe it", imgs)) as r:
                        assert r.status == 200, await r.text()

        asyncio.run(serve())
        deadline = time.monotonic() + 10  # the pull counters ride on heartbeats
        while (seen := pulls(dep.url)).get(backend, 0) < 3 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert seen.get(backend, 0) >= 3, seen  # KV for each request, embeddings for the images
        assert sum(n for b, n in seen.items() if b != backend) == 0, seen

        time.sleep(1.0)  # let the last replies and releases settle
        procs = {name: p.pid for name, p in dep.procs.items()}
        before = {name: cpu_seconds(pid) for name, pid in procs.items()}
        time.sleep(IDLE_S)
        used = {name: round(cpu_seconds(pid) - before[name], 3) for name, pid in procs.items()}
        assert all(p.poll() is None for p in dep.procs.values())
        busy = {name: s for name, s in used.items() if s > MAX_IDLE_CPU_S}
        assert not busy, f"idle processes used {busy} CPU seconds in {IDLE_S} s (bound {MAX_IDLE_CPU_S}); all: {used}"
    finally:
        dep.stop()
