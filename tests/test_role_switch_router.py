"""The router's side of a live role switch against scripted workers (real sockets, no model):
the states it passes, the SwitchRole it sends, and that messages of an older role epoch are
dropped (the order of events is exact here, unlike with real workers)."""

from __future__ import annotations

import asyncio

import pytest

from bus import messages as m
from router.backend import ApiError
from tests.test_resilience_router import FakeWorker, _router, _until

H, H2 = "ab" * 16, "cd" * 16  # block hashes as workers send them


def test_switch_states_and_old_epochs_dropped():
    async def main():
        core, addr = await _router()
        d0 = await FakeWorker(addr, "decode-0", "decode").start()
        d1 = await FakeWorker(addr, "decode-1", "decode").start()
        await _until(lambda: len(core.registry.alive("decode")) == 2)
        rec = core.registry.workers["decode-0"]

        out = core.switches.request("decode-0", "prefill", drain_s=5)
        assert out == {"worker_id": "decode-0", "from": "decode", "role": "prefill", "epoch": 1, "state": "draining"}
        assert [w.worker_id for w in core.registry.alive("decode")] == ["decode-1"]  # no new decode work
        assert [w.worker_id for w in core.registry.may_return("prefill")] == ["decode-0"]  # it is coming
        with pytest.raises(ApiError) as e:  # one switch of a worker at a time
            core.switches.request("decode-0", "encode")
        assert e.value.status == 409
        with pytest.raises(ApiError) as e:  # decode-1 is the last live decode worker now
            core.switches.request("decode-1", "encode")
        assert e.value.status == 409 and "last live decode" in e.value.message

        sw = await d0.next(m.SwitchRole)  # nothing in flight: drained at once
        assert (sw.role, sw.epoch) == ("prefill", 1) and rec.switch == "switching"
        # While it switches, its old role's cache events describe blocks it is freeing: dropped.
        await d0.sock.send(m.KvCacheEvent("decode-0", d0.incarnation, [H], [], 0))
        d0.beats.cancel()
        await d0.sock.send(m.WorkerReady(m.WorkerInfo("decode-0", d0.incarnation, "prefill", "m", "cpu", 4096, 32,
                                                      16, False, d0.transfer, 1, {}, 1)))
        await _until(lambda: rec.switch == "active" and rec.role == "prefill")
        assert rec.info.epoch == 1 and rec.info.incarnation == d0.incarnation  # the same process
        assert core.index.longest_prefix([H], "", {"decode-0"})[1] == 0
        # Old-epoch messages that arrive late: a WorkerReady, a heartbeat, a cache event -- dropped.
        await d0.sock.send(m.WorkerReady(m.WorkerInfo("decode-0", d0.incarnation, "decode", "m", "cpu", 4096, 64,
                                                      16, False, d0.transfer, 1, {}, 0)))
        await d0.sock.send(m.Heartbeat("decode-0", d0.incarnation, 5, 0, 7, 64, epoch=0))
        await d0.sock.send(m.KvCacheEvent("decode-0", d0.incarnation, [H2], [], 0))
        await d0.sock.send(m.KvCacheEvent("decode-0", d0.incarnation, [H], [], 1))  # the new epoch counts
        await _until(lambda: core.index.longest_prefix([H], "", {"decode-0"})[1] == 1)  # all above handled
        assert rec.role == "prefill" and rec.running == 0 and rec.kv_blocks_total == 32
        assert core.index.longest_prefix([H2], "", {"decode-0"})[1] == 0
        await d0.sock.send(m.Heartbeat("decode-0", d0.incarnation, 1, 0, 3, 32, epoch=1))
        await _until(lambda: rec.running == 1 and rec.kv_blocks_used == 3)
        assert [w.worker_id for w in core.registry.alive("prefill")] == ["decode-0"]
        d0.sock.close()
        d1.close()
        await core.close()

    asyncio.run(main())


def test_a_worker_that_dies_while_switching_ends_the_switch():
    async def main():
        core, addr = await _router()
        e0 = await FakeWorker(addr, "encode-0", "encode").start()
        e1 = await FakeWorker(addr, "encode-1", "encode").start()
        await _until(lambda: len(core.registry.alive("encode")) == 2)
        core.switches.request("encode-1", "decode")
        await e1.next(m.SwitchRole)
        e1.close()  # gone before it announced its new role
        rec = core.registry.workers["encode-1"]
        await _until(lambda: not rec.alive and rec.switch == "active" and rec.switch_to is None, timeout=10)
        assert rec.role == "encode" and not core.registry.may_return("decode")
        e0.close()
        await core.close()

    asyncio.run(main())
