"""The UCX backend between real processes: a spawned holder publishes, this process pulls.

Faults are real: a holder SIGKILLed while a large pull is on the wire, and a
holder whose event loop is stuck. Skipped as a whole where ucxx is missing.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import pytest
import torch

from transfer.ucx_backend import INSTALL_HINT, ucx_available

if not ucx_available():
    pytest.skip(f"ucxx is not installed or UCX does not start here ({INSTALL_HINT})", allow_module_level=True)

from transfer.base import KeyNotFound, TransferError, TransferTimeout  # noqa: E402
from transfer.select import MultiTransfer, host_id, make_backend  # noqa: E402
from transfer.ucx_backend import UcxBackend  # noqa: E402
from tests.transfer_holder import spawn_holder  # noqa: E402
from transfer.wire import describe  # noqa: E402

HUGE = 256 << 20  # bytes: long enough on the wire to kill its holder in the middle


def payloads(huge: bool = False) -> dict[str, list[torch.Tensor]]:
    """The same tensors in every process (seeded)."""
    g = torch.Generator().manual_seed(11)
    out = {
        "mix": [
            torch.randn(3, 5, generator=g),
            torch.randn(7, 11, generator=g).to(torch.bfloat16),
            torch.randn(4, 3, generator=g).to(torch.float16),
            torch.randint(-(2**40), 2**40, (13,), generator=g),
            torch.randint(0, 255, (9,), generator=g).to(torch.uint8),
            torch.empty(0, 4),
            torch.tensor(2.5, dtype=torch.float64),
            torch.randn(6, 4, generator=g).t(),  # not contiguous: travels as its values
            torch.rand(5, generator=g) > 0.5,
        ],
        "mid": [torch.randn(1 << 20, generator=g), torch.randn(3, 1 << 18, generator=g).to(torch.bfloat16)],
        "none": [],
        "empties": [torch.empty(0), torch.empty(2, 0, dtype=torch.int64)],
    }
    if huge:
        out["huge"] = [torch.ones(HUGE // 4)]
    return out


def _spawn_holder(kind: str = "auto", huge: bool = False):
    return spawn_holder(payloads, kind, huge)


@pytest.fixture(scope="module")
def holder():
    proc, conn, card = _spawn_holder()
    yield proc, conn, card
    if proc.is_alive():
        conn.send(("close",))
        proc.join(10)
    proc.kill()


@pytest.fixture(scope="module")
def expected():
    return payloads()


def run(coro_fn, *args, kind: str = "ucx"):
    """Run ``coro_fn(puller, *args)`` with a fresh puller of ``kind``, closed afterwards."""

    async def main():
        t = make_backend(kind, "127.0.0.1")
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


def test_round_trip(holder, expected):
    _, _, card = holder

    async def pull_all(t):
        ucx = t.backend("ucx")
        got = {k: await ucx.pull(card["ucx"], k, timeout=10) for k in expected}
        return got, ucx.stats()

    got, stats = run(pull_all)
    for key, want in expected.items():
        assert_same(got[key], want)
    assert stats["pulls_done"] == len(expected)
    assert stats["bytes_received"] == sum(t.numel() * t.element_size() for ts in expected.values() for t in ts)


def test_pulled_tensors_are_the_callers(holder, expected):
    _, _, card = holder

    async def pull_twice(t):
        first = await t.pull(card, "mid", timeout=10)
        for x in first:
            x.zero_()  # writable, and writing it must not reach the holder or the next pull
        return await t.pull(card, "mid", timeout=10)

    assert_same(run(pull_twice), expected["mid"])


def test_missing_key(holder):
    _, _, card = holder

    async def pull_missing(t):
        with pytest.raises(KeyNotFound, match="no-such-key"):
            await t.pull(card, "no-such-key", timeout=10)
        # The endpoint still works after an error reply.
        return await t.pull(card, "empties", timeout=10)

    assert [x.shape for x in run(pull_missing)] == [torch.Size([0]), torch.Size([2, 0])]


def test_concurrent_pulls_to_one_peer(holder, expected):
    _, _, card = holder
    keys = ["mix", "mid", "none", "empties"] * 3

    async def pull_many(t):
        return await asyncio.gather(*(t.pull(card, k, timeout=20) for k in keys))

    for key, got in zip(keys, run(pull_many)):
        assert_same(got, expected[key])


def test_choice_order(holder, expected):
    """One host, host memory: shm, then ucx for a kind of key whose last pull was big; another host: zmq
    (ucx where UCX has RDMA, or where zmq is not shared); counted per backend."""
    _, _, card = holder
    assert set(card) == {"host_id", "ucx", "shm", "zmq"}
    elsewhere = {**card, "host_id": "other-host:0"}

    async def pulls(t):
        assert t.choose(card, "mix")[0].name == "shm"
        assert t.choose(card, "mix", device="cuda")[0].name == "ucx"
        assert_same(await t.pull(json.dumps(card), "mix", timeout=10), expected["mix"])  # as sent on the bus
        assert_same(await t.pull(card, "mid", timeout=10), expected["mid"])  # shm: 5.5 MiB
        assert t.choose(card, "mid")[0].name == "ucx"
        assert_same(await t.pull(card, "mid", timeout=10), expected["mid"])
        assert_same(await t.pull(elsewhere, "mix", timeout=10), expected["mix"])  # zmq, or ucx over RDMA
        no_zmq = {k: v for k, v in elsewhere.items() if k != "zmq"}
        assert_same(await t.pull(no_zmq, "mix", timeout=10), expected["mix"])
        return dict(t.pulls_by_backend), t.stats(), t.ucx_rdma

    by_backend, stats, rdma = run(pulls, kind="auto")
    assert by_backend == ({"ucx": 3, "shm": 2, "zmq": 0} if rdma else {"ucx": 2, "shm": 2, "zmq": 1})
    assert stats["backends"]["ucx"]["pulls_done"] == by_backend["ucx"]


def test_idle_progress_sleeps():
    """After pulls (here to its own store), an idle backend's loop progresses UCX only on an event:
    a few wake-ups a second, no CPU to speak of (ucxx's blocking mode spun a core; issue 10)."""
    from transfer.ucx_backend import start_ucx
    from transfer.ucx_progress import progress

    async def main():
        b = UcxBackend()
        await b.start()
        b.put("k", [torch.ones(1 << 18)])  # 1 MiB: a rendezvous, not an eager message
        for _ in range(3):
            await b.pull(b.address, "k", timeout=10)
        drv = progress(start_ucx())
        await asyncio.sleep(0.3)  # the last completions
        runs, cpu = drv.runs, time.process_time()
        await asyncio.sleep(1.5)
        runs, cpu = drv.runs - runs, time.process_time() - cpu
        await b.close()
        return runs, cpu

    runs, cpu = asyncio.run(main())
    assert runs <= 3 and cpu < 0.1, (runs, cpu)


def test_forget_peer_then_pull_again(holder, expected):
    _, _, card = holder

    async def pulls(t):
        await t.pull(card, "mid", timeout=10)
        await t.forget_peer(json.dumps(card))  # as the bus would, for a peer it saw die
        return await t.pull(card, "mix", timeout=10)

    assert_same(run(pulls, kind="auto"), expected["mix"])


def test_ucx_only_worker_meets_any_card(holder):
    _, _, card = holder

    async def check(t):
        assert isinstance(t, MultiTransfer) and set(t.card) == {"host_id", "ucx"}
        with pytest.raises(TransferError, match="no transport in common"):
            t.choose({"host_id": host_id(), "zmq": card["zmq"]})
        with pytest.raises(TransferError, match="not a ucx address"):
            await t.backend("ucx").pull("tcp://127.0.0.1:1", "mix", timeout=1)
        return t.choose(card)[0].name

    assert run(check) == "ucx"


def test_wedged_holder_times_out_then_answers_again(holder, expected):
    _, conn, card = holder
    conn.send(("stall", 1.5))
    assert conn.recv() == "stalling"

    async def pull_stalled(t):
        t0 = time.monotonic()
        with pytest.raises(TransferTimeout, match="within 0.5s"):
            await t.pull(card, "mid", timeout=0.5)
        elapsed = time.monotonic() - t0
        await asyncio.sleep(1.5)  # the holder wakes up and answers a pull that gave up
        # A fresh endpoint and fresh tags: the late reply cannot land in this pull.
        got = await t.pull(card, "mid", timeout=10)
        return elapsed, got

    elapsed, got = run(pull_stalled)
    assert elapsed < 0.5 + 0.3
    assert_same(got, expected["mid"])


def test_holder_killed_mid_transfer(monkeypatch):
    """SIGKILL once a 256 MiB reply's header is in and its bytes are not: TransferTimeout on time.

    Then the puller still pulls, from a new holder.
    """
    proc, _, card = _spawn_holder("ucx", huge=True)
    timeout = 3.0
    allocate = UcxBackend._allocate

    def kill_then_allocate(header, *args):
        if any(shape == [HUGE // 4] for _, shape in header.get("tensors", [])):
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(10)  # dead before the payload's receives are posted
        return allocate(header, *args)

    monkeypatch.setattr(UcxBackend, "_allocate", staticmethod(kill_then_allocate))

    async def pulls(t):
        await t.pull(card, "mix", timeout=10)  # endpoints up in both directions
        t0 = time.monotonic()
        with pytest.raises(TransferTimeout, match="within 3s"):
            await t.pull(card, "huge", timeout=timeout)
        elapsed = time.monotonic() - t0
        assert not proc.is_alive()
        new_proc, new_conn, new_card = _spawn_holder("ucx")
        try:
            got = await t.pull(new_card, "mix", timeout=10)
        finally:
            new_conn.send(("close",))
            new_proc.join(10)
            new_proc.kill()
        return elapsed, got

    elapsed, got = run(pulls)
    assert timeout <= elapsed < timeout + 0.3
    assert_same(got, payloads()["mix"])


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda,
                                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]),
])
def test_receive_pool_lends_a_buffer_only_once_its_tensor_died(device):
    from transfer.ucx_buffers import RecvPool

    dev = torch.device(device)
    pool = RecvPool(max_bytes=8 << 20)
    a = pool.take(3 << 20, dev)
    assert a.device.type == dev.type and a.dtype == torch.uint8 and a.numel() == 3 << 20
    a_view = a[10:20]
    del a
    b = pool.take(3 << 20, dev)
    assert (pool.hits, pool.misses) == (0, 2)  # a_view still holds the first buffer
    ptr = a_view.data_ptr() - 10
    del a_view
    c = pool.take(3 << 20, dev)
    assert pool.hits == 1 and c.data_ptr() == ptr and c.data_ptr() != b.data_ptr()
    assert pool.size_class(3 << 20) - (3 << 20) <= (3 << 20) // 8
    assert pool.size_class(1) == pool.size_class(4096) == 4096  # a CUDA scalar is pooled too
    del b, c
    big = pool.take(16 << 20, dev)  # over max_bytes: dropped when it comes back
    del big
    assert pool.take(16 << 20, dev) is not None and pool.hits == 1


def test_errors_name_the_package(monkeypatch):
    import builtins

    import transfer.ucx_backend as ub

    real_import = builtins.__import__

    def no_ucxx(name, *args, **kwargs):
        if name == "ucxx":
            raise ImportError("No module named 'ucxx'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ucxx)
    with pytest.raises(ub.UcxUnavailable, match=r"pip install 'epd\[ucx\]'.*ucxx-cu12"):
        UcxBackend()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_round_trip(holder, expected):
    """Received straight into CUDA tensors; a CUDA holder's tensors are sent from the device."""
    _, _, card = holder

    async def pulls(t):
        got = await t.pull(card, "mix", timeout=10, device="cuda")  # inline in the header
        assert all(x.is_cuda for x in got)
        mid = await t.pull(card, "mid", timeout=10, device="cuda")  # into pooled device buffers
        for x in mid:
            x.zero_()  # the caller's: the next pull of the same sizes gets other memory, or this back
        mid = await t.pull(card, "mid", timeout=10, device="cuda")
        # Both ends on the GPU: publish what we pulled, pull it back through ourselves.
        t.put("back", got + mid)
        again = await t.pull(t.card, "back", timeout=10, device="cuda")
        return [x.cpu() for x in got + mid], [x.cpu() for x in again]

    got, again = run(pulls)
    want = expected["mix"] + expected["mid"]
    assert_same(got, want)
    assert_same(again, want)


def test_zz_holder_counters(holder):
    """Runs last (file order): the holder served, never pulled, and closes cleanly."""
    proc, conn, _ = holder
    conn.send(("stats",))
    stats = conn.recv()
    assert stats["pulls_by_backend"]["ucx"] == 0
    assert stats["backends"]["ucx"]["pulls_served"] > 0 and stats["backends"]["ucx"]["bytes_sent"] > 0
    conn.send(("close",))
    assert conn.recv() == "closed"
    proc.join(10)
    assert proc.exitcode == 0
