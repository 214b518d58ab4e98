"""The transfer layer between real processes: a spawned holder publishes, this process pulls.

Every pull goes over each backend (shm, zmq) and through the auto choice
(ucx has its own module, tests/test_transfer_ucx.py);
faults are real (a SIGKILLed holder, a holder whose loop is stuck), and the
shm segments in /dev/shm are counted before and after.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import pytest
import torch

from transfer.base import KeyNotFound, TransferError, TransferTimeout
from transfer.select import UCX_FROM_BYTES, MultiTransfer, host_id, make_backend
from transfer.shm_backend import SHM_DIR, ShmBackend
from transfer.shm_pool import SEGMENT_PREFIX, owner_prefix
from tests.transfer_holder import spawn_holder
from transfer.wire import describe

BACKENDS = ("shm", "zmq")
BIG = 64 << 20  # bytes


def payloads() -> dict[str, list[torch.Tensor]]:
    """The same tensors in every process (seeded)."""
    g = torch.Generator().manual_seed(7)
    return {
        "mix": [
            torch.randn(3, 5, generator=g),
            torch.randn(7, 11, generator=g).to(torch.bfloat16),
            torch.randint(-(2**40), 2**40, (13,), generator=g),
            torch.empty(0, 4),
            torch.tensor(2.5, dtype=torch.float64),
            torch.randn(6, 4, generator=g).t(),  # not contiguous: travels as its values
            torch.rand(5, generator=g) > 0.5,
        ],
        "big": [torch.randn(BIG // 4, generator=g)],
        "mid": [torch.randn(1 << 20, generator=g), torch.randn(3, 1 << 18, generator=g).to(torch.bfloat16)],
        "empties": [torch.empty(0), torch.empty(2, 0, dtype=torch.int64)],
    }


def _spawn_holder():
    return spawn_holder(payloads)


def _segments(*pids: int) -> set[str]:
    """Our segments in /dev/shm: those of ``pids`` (other test runs may share the machine)."""
    prefixes = tuple(owner_prefix(p) for p in pids) or (SEGMENT_PREFIX,)
    return {f for f in os.listdir(SHM_DIR) if f.startswith(prefixes)}


@pytest.fixture(scope="module")
def shm_before():
    return _segments(os.getpid())


@pytest.fixture(scope="module")
def holder(shm_before):
    proc, conn, card = _spawn_holder()
    yield proc, conn, card
    if proc.is_alive():
        conn.send(("close",))
        proc.join(10)
    proc.kill()


@pytest.fixture(scope="module")
def expected():
    return payloads()


def run(coro_fn, *args):
    """Run ``coro_fn(puller, *args)`` with a fresh auto puller, closed afterwards."""

    async def main():
        t = make_backend("auto", "127.0.0.1")
        await t.start()
        try:
            return await coro_fn(t, *args)
        finally:
            await t.close()

    return asyncio.run(main())


def assert_same(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert describe(got) == describe(want)
    for g, w in zip(got, want):
        assert g.device.type == "cpu"
        assert torch.equal(g, w)
        assert g.is_contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
def test_round_trip(holder, expected, backend):
    _, _, card = holder

    async def pull_all(t):
        return {k: await t.backend(backend).pull(card[backend], k, timeout=10) for k in expected}

    got = run(pull_all)
    for key, want in expected.items():
        assert_same(got[key], want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pulled_tensors_are_the_callers(holder, expected, backend):
    _, _, card = holder

    async def pull_twice(t):
        b = t.backend(backend)
        first = await b.pull(card[backend], "mid", timeout=10)
        for x in first:
            x.zero_()  # writable, and writing it must not reach the holder or the next pull
        return await b.pull(card[backend], "mid", timeout=10)

    assert_same(run(pull_twice), expected["mid"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_key(holder, backend):
    _, _, card = holder

    async def pull_missing(t):
        with pytest.raises(KeyNotFound, match="no-such-key"):
            await t.backend(backend).pull(card[backend], "no-such-key", timeout=10)
        # The channel still works after an error reply.
        return await t.backend(backend).pull(card[backend], "empties", timeout=10)

    assert [x.shape for x in run(pull_missing)] == [torch.Size([0]), torch.Size([2, 0])]


@pytest.mark.parametrize("backend", BACKENDS)
def test_concurrent_pulls_to_one_peer(holder, expected, backend):
    _, _, card = holder
    keys = ["mix", "mid"] * 4

    async def pull_many(t):
        b = t.backend(backend)
        return await asyncio.gather(*(b.pull(card[backend], k, timeout=20) for k in keys))

    for key, got in zip(keys, run(pull_many)):
        assert_same(got, expected[key])


def test_auto_picks_shm_on_the_same_host(holder, expected):
    _, _, card = holder
    assert card["host_id"] == host_id()
    card = {k: v for k, v in card.items() if k != "ucx"}  # tests/test_transfer_ucx.py has the ucx choices

    async def pulls(t):
        assert_same(await t.pull(json.dumps(card), "mix", timeout=10), expected["mix"])  # as sent on the bus
        elsewhere = {**card, "host_id": "other-host:0"}
        assert_same(await t.pull(elsewhere, "mix", timeout=10), expected["mix"])
        return dict(t.pulls_by_backend)

    by_backend = run(pulls)
    assert by_backend.pop("ucx", 0) == 0
    assert by_backend == {"shm": 1, "zmq": 1}


def test_auto_choice_follows_the_measured_order():
    """Host memory, one host: shm, until pulls of that kind of key came to UCX_FROM_BYTES; then ucx.
    Device memory: ucx. Another host: ucx over RDMA, else zmq. (Fake backends: only the choice is tested.)"""
    from types import SimpleNamespace

    sizes = {"kv/small": 16 << 10, "kv/big": UCX_FROM_BYTES, "emb/a": 4 << 10}

    def fake(name):
        async def pull(addr, key, *, timeout, device="cpu"):
            return [torch.zeros(sizes[key], dtype=torch.uint8)]
        return SimpleNamespace(name=name, pull=pull)

    t = MultiTransfer([fake("ucx"), fake("shm"), fake("zmq")], {})
    t.ucx_rdma = False  # as on this machine (tcp, shared memory)
    card = {"host_id": host_id(), "ucx": "u", "shm": "s", "zmq": "z"}
    elsewhere = {**card, "host_id": "other-host:0"}

    def chosen(peer, key, device="cpu"):
        return t.choose(peer, key, device)[0].name

    async def main():
        assert chosen(card, "kv/small") == "shm"
        assert chosen(card, "kv/small", "cuda") == "ucx"
        assert chosen({k: v for k, v in card.items() if k != "shm"}, "kv/small") == "ucx"
        # Another host: over TCP zmq, over RDMA (or into device memory) ucx.
        assert chosen(elsewhere, "kv/small") == "zmq"
        assert chosen(elsewhere, "kv/small", "cuda") == "ucx"
        assert chosen({k: v for k, v in elsewhere.items() if k != "zmq"}, "kv/small") == "ucx"
        t.ucx_rdma = True
        assert chosen(elsewhere, "kv/small") == "ucx"
        t.ucx_rdma = False
        await t.pull(card, "kv/small", timeout=1)
        assert chosen(card, "kv/x") == "shm"
        await t.pull(card, "kv/big", timeout=1)  # over shm: nothing was known of the size before
        assert chosen(card, "kv/x") == "ucx"
        assert chosen(card, "emb/a") == "shm"  # another kind keeps its own
        await t.pull(card, "kv/small", timeout=1)  # over ucx
        assert chosen(card, "kv/x") == "shm"

    asyncio.run(main())
    assert t.pulls_by_backend == {"ucx": 1, "shm": 2, "zmq": 0}


def test_wedged_holder_times_out_and_its_segment_is_released(holder):
    proc, conn, card = holder
    conn.send(("stall", 2.0))
    assert conn.recv() == "stalling"

    async def pull_stalled(t):
        t0 = time.monotonic()
        with pytest.raises(TransferTimeout):
            await t.backend("shm").pull(card["shm"], "mid", timeout=0.5)
        return time.monotonic() - t0

    assert run(pull_stalled) < 0.5 + 0.3
    # After the stall the holder answers a puller that is gone; it must take the
    # segment back (undeliverable reply) instead of waiting out the lease.
    deadline = time.monotonic() + 10
    while True:
        conn.send(("stats",))
        stats = conn.recv()
        if stats["lent"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert stats["lent"] == 0


def test_killed_holder_times_out_and_its_segments_are_swept():
    proc, _, card = _spawn_holder()

    async def pull_once(t):
        return await t.backend("shm").pull(card["shm"], "mid", timeout=10)

    run(pull_once)  # leaves a free segment in the holder's pool
    proc.kill()
    proc.join(10)
    assert _segments(proc.pid), "a SIGKILLed holder cannot clean up"

    async def pull_dead(t):
        # Starting a shm backend swept the dead holder's segments.
        assert not _segments(proc.pid)
        elapsed = {}
        for name in BACKENDS:
            t0 = time.monotonic()
            with pytest.raises(TransferTimeout, match="within 1s"):
                await t.backend(name).pull(card[name], "mix", timeout=1.0)
            elapsed[name] = time.monotonic() - t0
        t0 = time.monotonic()
        # Through ucx where both run it: an endpoint to a dead worker fails at once.
        with pytest.raises(TransferTimeout if "ucx" not in card else TransferError):
            await t.pull(card, "mix", timeout=1.0)
        elapsed["auto"] = time.monotonic() - t0
        return elapsed

    for name, dt in run(pull_dead).items():
        assert (1.0 if name != "auto" or "ucx" not in card else 0) <= dt < 1.0 + 0.3, (name, dt)


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 1 MiB tmpfs, to fill up (needs root; skipped elsewhere)."""
    import subprocess

    d = tmp_path / "shm"
    d.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield str(d)
    subprocess.run(["umount", str(d)], check=True)


def test_full_shm_is_a_clean_error(tiny_tmpfs):
    async def main():
        holder, puller = ShmBackend(shm_dir=tiny_tmpfs), ShmBackend(shm_dir=tiny_tmpfs)
        await holder.start()
        await puller.start()
        try:
            holder.put("fits", [torch.ones(1 << 17)])  # 512 KiB
            holder.put("too-big", [torch.ones(1 << 19)])  # 2 MiB
            with pytest.raises(TransferError, match="is full"):
                await puller.pull(holder.address, "too-big", timeout=10)
            assert torch.equal((await puller.pull(holder.address, "fits", timeout=10))[0], torch.ones(1 << 17))
        finally:
            await holder.close()
            await puller.close()
        return os.listdir(tiny_tmpfs)

    assert asyncio.run(main()) == []


def test_choices_and_bad_input():
    with pytest.raises(ValueError, match="auto, ucx, shm, zmq"):
        make_backend("rdma", "127.0.0.1")
    t = make_backend("zmq", "127.0.0.1")
    assert isinstance(t, MultiTransfer) and t.backend("shm") is None
    with pytest.raises(TypeError):
        t.put("k", [torch.zeros(2).to_sparse()])
    with pytest.raises(TypeError):
        t.put("k", [[1, 2]])
    with pytest.raises(TransferError, match="no transport in common"):
        t.choose({"host_id": host_id(), "shm": "tcp://127.0.0.1:1"})  # we run no shm
    with pytest.raises(TransferError, match="not a transfer card"):
        t.choose("tcp://127.0.0.1:1")
    t.put("k", [torch.zeros(2)])
    t.drop("k")
    t.drop("k")  # idempotent
    assert "k" not in t


def test_zz_no_segment_left_behind(holder, shm_before):
    """Runs last (file order): closes the holder and counts /dev/shm."""
    proc, conn, _ = holder
    conn.send(("stats",))
    stats = conn.recv()
    assert stats["lent"] == 0  # every pull released its segment
    assert set(stats["pulls_by_backend"].values()) == {0}  # the holder only served
    assert stats["backends"]["shm"]["pulls_served"] > 0 and stats["backends"]["zmq"]["pulls_served"] > 0
    assert _segments(proc.pid), "the pool keeps released segments for reuse"
    conn.send(("close",))
    assert conn.recv() == "closed"
    proc.join(10)
    assert not _segments(proc.pid)
    assert _segments(os.getpid()) == shm_before
