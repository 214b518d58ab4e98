"""``stages.peer_cache.PeerCache`` alone, with a fake engine and transfer backend: what it
publishes, reports, drops on a role change, and answers to the prefix messages."""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from types import SimpleNamespace

import torch

from bus import messages as m
from stages.engine.input_processor import PreparedImage
from stages.peer_cache import PeerCache
from transfer.hash_keys import embedding_key

CARD = {"zmq": "tcp://127.0.0.1:1"}


class FakeBlocks:
    events = None

    def record_events(self):
        self.events = deque()


class FakeTransfer:
    card = CARD

    def __init__(self):
        self.store: dict[str, list] = {}

    def put(self, key, tensors):
        self.store[key] = tensors

    def drop(self, key):
        self.store.pop(key, None)


def _cache(role: str, sent: list, encoder_cache_mb: int = 1) -> PeerCache:
    engine = SimpleNamespace(config=SimpleNamespace(encoder_cache_mb=encoder_cache_mb, block_size=4),
                             blocks=FakeBlocks(), hf_config=SimpleNamespace(hidden_size=8), device="cpu")

    async def send(msg):
        sent.append(msg)

    async def pull_failed(rid, holder, err):
        raise AssertionError("no pull here")

    return PeerCache(engine, FakeTransfer(), send, pull_failed, Counter(), asyncio.get_running_loop(),
                     worker_id="w", incarnation="inc", role=role, epoch=0, pull_timeout=1.0)


def test_publish_report_and_leave_encode():
    async def main():
        sent: list = []
        pc = _cache("encode", sent)
        assert pc.engine.blocks.events is None  # an encoder records no KV events
        img = PreparedImage("pix", 3, (1, 2, 2), torch.zeros(3, 8))
        pc.publish(img)
        pc.publish(img)  # already held: no second event
        assert pc.ref(img) == m.ImageRef("pix", 3, [1, 2, 2], CARD)
        assert list(pc.transfer.store) == [embedding_key("pix")]
        task = asyncio.create_task(pc.report_events())
        await asyncio.sleep(0.25)
        task.cancel()
        assert sent == [m.EmbeddingCacheEvent("w", "inc", [pc.ref(img)], [], 0)]
        pc.enter_role("prefill", 1)  # its embeddings are no longer offered; KV events are recorded
        assert pc.transfer.store == {} and pc.epoch == 1 and pc.engine.blocks.events is not None

    asyncio.run(main())


def test_late_prefix_answer_releases_the_copy_and_export_reports_none():
    async def main():
        sent: list = []
        pc = _cache("prefill", sent)
        await pc.on_prefix_answer(m.PrefixAnswer("r1", "k1", CARD, 2))  # nobody waits for it
        pc.engine.export_prefix = lambda hashes: None
        await pc.on_prefix_export(m.PrefixExport("r2", ["00" * 16], "k2"))
        assert sent == [m.KvTaken("r1", "k1"), m.PrefixExported("r2", "k2", 0)]

    asyncio.run(main())
