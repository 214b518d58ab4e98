"""The router's failure handling against scripted workers (real sockets, no model).

Each fake worker is a DEALER that registers, receives what the router sends and answers
what the test tells it to; so the order of events (a late delta from a dead attempt, a
restart between two deltas) is exact.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from bus import messages as m
from bus.sockets import AsyncSocket, free_tcp_address
from router.backend import ApiError, ApiRequest
from router.core import RouterCore


class FakeWorker:
    def __init__(self, addr: str, worker_id: str, role: str = "mixed", transfer: dict | None = None):
        self.addr, self.worker_id, self.role = addr, worker_id, role
        self.transfer = transfer or {"zmq": f"tcp://x/{worker_id}"}
        self.sock: AsyncSocket | None = None
        self.beats: asyncio.Task | None = None

    async def start(self) -> "FakeWorker":
        """Connect and register as a new incarnation (the old one is gone)."""
        if self.sock is not None:
            self.close()
        self.incarnation = uuid.uuid4().hex
        self.sock = AsyncSocket("dealer", self.addr, bind=False, identity=self.worker_id.encode())
        await self.sock.send(m.WorkerReady(m.WorkerInfo(self.worker_id, self.incarnation, self.role, "m", "cpu",
                                                        4096, 64, 16, False, self.transfer, 1)))
        self.beats = asyncio.create_task(self._heartbeats())
        return self

    async def _heartbeats(self) -> None:
        while True:
            await self.sock.send(m.Heartbeat(self.worker_id, self.incarnation, 0, 0, 0, 64))
            await asyncio.sleep(0.5)

    async def next(self, kind, timeout: float = 5.0):
        """The next message of type ``kind`` (pings and others skipped)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            left = deadline - asyncio.get_running_loop().time()
            _, msg = await self.sock.recv(timeout=max(left, 0.01))
            if isinstance(msg, kind):
                return msg

    async def delta(self, rid: str, ids: list[int], total: int, finish: str | None = None) -> None:
        await self.sock.send(m.TokenDelta(rid, "".join(f"<{t}>" for t in ids), ids, finish, None, 3, total))

    def close(self) -> None:
        self.beats.cancel()
        self.sock.close()


def _req(rid: str = "r1") -> ApiRequest:
    return ApiRequest(rid, "m", "completion", None, None, [1, 2, 3], [], {"max_tokens": 8}, True)


async def _router(**kw) -> tuple[RouterCore, str]:
    addr = free_tcp_address()
    core = RouterCore(["m"], heartbeat_timeout=kw.pop("heartbeat_timeout", 5.0), **kw)
    await core.start(addr)
    return core, addr


async def _collect(core: RouterCore, req: ApiRequest, out: list):
    try:
        async for d in core.generate(req):
            out.append(d)
    except ApiError as e:
        out.append(e)


async def _until(cond, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


def test_a_restart_mid_stream_resumes_and_drops_the_old_attempt():
    async def main():
        core, addr = await _router()
        w = await FakeWorker(addr, "mixed-0").start()
        await _until(lambda: core.health()[0])
        out: list = []
        client = asyncio.create_task(_collect(core, _req(), out))
        first = await w.next(m.GenerateRequest)
        assert first.request_id == "r1" and first.resume is None
        await w.delta("r1", [10], 1)
        await w.delta("r1", [11, 12], 3)
        await _until(lambda: len(out) == 2)
        old_inc = w.incarnation
        await w.start()  # the worker restarted (new incarnation) between two deltas
        again = await w.next(m.GenerateRequest)
        assert again.request_id == "r1@r1"
        assert again.resume.token_ids == [10, 11, 12] and again.resume.text_len == len("<10><11><12>")
        # A late delta of the dead attempt (it raced the restart) is dropped and its work aborted.
        await w.delta("r1", [99], 4)
        abort = await w.next(m.AbortRequest)
        assert abort.request_id == "r1"
        await w.delta("r1@r1", [13], 4)
        await w.delta("r1@r1", [14], 5, "length")
        await asyncio.wait_for(client, 5)
        assert [t for d in out for t in d.token_ids] == [10, 11, 12, 13, 14]
        assert out[-1].completion_tokens == 5 and out[-1].finish_reason == "length"
        assert core.recoveries["mixed"] == 1 and core.registry.restarts["mixed-0"] == 1
        assert old_inc != w.incarnation
        w.close()
        await core.close()

    asyncio.run(main())


def test_a_killed_worker_is_dead_at_the_next_ping_and_its_stream_moves():
    async def main():
        core, addr = await _router()
        a = await FakeWorker(addr, "decode-0", "mixed").start()
        b = await FakeWorker(addr, "decode-1", "mixed").start()
        await _until(lambda: len(core.registry.alive("mixed")) == 2)
        out: list = []
        client = asyncio.create_task(_collect(core, _req(), out))
        first_a = asyncio.create_task(a.next(m.GenerateRequest))
        first_b = asyncio.create_task(b.next(m.GenerateRequest))
        done, _ = await asyncio.wait({first_a, first_b}, return_when=asyncio.FIRST_COMPLETED)
        holder, other = (a, b) if first_a in done else (b, a)
        (first_b if holder is a else first_a).cancel()
        await holder.delta("r1", [7], 1)
        await _until(lambda: len(out) == 1)
        holder.close()  # its process died: the connection closes
        moved = await other.next(m.GenerateRequest, timeout=3)  # within a ping or two, not a heartbeat timeout
        assert moved.request_id == "r1@r1" and moved.resume.token_ids == [7]
        assert core.health()[1]["workers"][holder.worker_id]["state"] == "dead"
        await other.delta("r1@r1", [8], 2, "stop")
        await asyncio.wait_for(client, 5)
        assert [t for d in out for t in d.token_ids] == [7, 8]
        other.close()
        await core.close()

    asyncio.run(main())


def test_suspect_worker_gets_no_new_work():
    async def main():
        core, addr = await _router()
        a = await FakeWorker(addr, "prefill-0", "mixed", {"zmq": "tcp://a"}).start()
        b = await FakeWorker(addr, "prefill-1", "mixed", {"zmq": "tcp://b"}).start()
        await _until(lambda: len(core.registry.alive("mixed")) == 2)
        await b.sock.send(m.PullFailed("x", {"zmq": "tcp://a"}, "TransferTimeout: 30 s"))
        await _until(lambda: core.health()[1]["workers"]["prefill-0"]["state"] == "suspect")
        for i in range(4):
            out: list = []
            task = asyncio.create_task(_collect(core, _req(f"q{i}"), out))
            got = await b.next(m.GenerateRequest)
            assert got.request_id == f"q{i}"
            await b.delta(got.request_id, [1], 1, "stop")
            await asyncio.wait_for(task, 5)
        assert "could not pull" in core.health()[1]["workers"]["prefill-0"]["suspect"]
        a.close()
        b.close()
        await core.close()

    asyncio.run(main())


def test_retry_budget_and_worker_wait_end_in_precise_503s():
    async def main():
        core, addr = await _router(retry_budget=2, worker_wait_s=1.0)
        w = await FakeWorker(addr, "mixed-0").start()
        await _until(lambda: core.health()[0])
        out: list = []
        client = asyncio.create_task(_collect(core, _req(), out))
        msg = await w.next(m.GenerateRequest)
        for n in (1, 2):  # a poison request: it fails its worker every time
            await w.sock.send(m.RequestFailed(msg.request_id, 503, "boom", "internal_error"))
            msg = await w.next(m.GenerateRequest)
            assert msg.request_id == f"r1@r{n}"
        await w.sock.send(m.RequestFailed(msg.request_id, 503, "boom", "internal_error"))
        await asyncio.wait_for(client, 5)
        assert isinstance(out[-1], ApiError) and out[-1].status == 503 and "retry budget" in out[-1].message
        # The only worker dies and nothing restarts it: a new request waits worker_wait_s, then a 503.
        w.close()
        await _until(lambda: not core.registry.alive("mixed"))
        out = []
        await asyncio.wait_for(_collect(core, _req("r2"), out), 5)
        assert isinstance(out[0], ApiError) and out[0].status == 503
        assert "no mixed worker came back within 1 s" in out[0].message and "mixed-0 dead" in out[0].message
        # Given up by its supervisor: no wait at all, and the reason is named.
        sup = AsyncSocket("dealer", addr, bind=False, identity=b"epd-serve")
        await sup.send(m.WorkerGaveUp("mixed-0", 5, "exited 6 times within 120 s"))
        await _until(lambda: "mixed-0" in core.registry.given_up)
        out = []
        await asyncio.wait_for(_collect(core, _req("r3"), out), 0.5)
        assert out[0].status == 503 and "given up: mixed-0 (exited 6 times" in out[0].message
        assert core.health()[1]["workers"]["mixed-0"]["given_up"].startswith("exited")
        sup.close()
        await core.close()

    asyncio.run(main())


@pytest.mark.parametrize("same_incarnation", [True, False])
def test_registering_again(same_incarnation):
    """Same incarnation: a worker finding a restarted router keeps its record; new: a restart."""
    async def main():
        core, addr = await _router()
        w = await FakeWorker(addr, "decode-0", "decode").start()
        await _until(lambda: "decode-0" in core.registry.workers)
        inc = w.incarnation
        if same_incarnation:
            await w.sock.send(m.WorkerReady(m.WorkerInfo("decode-0", inc, "decode", "m", "cpu", 4096, 64, 16,
                                                         False, w.transfer, 1)))
        else:
            await w.start()
        await _until(lambda: core.registry.workers["decode-0"].info.incarnation == w.incarnation)
        await asyncio.sleep(0.1)
        assert core.registry.restarts.get("decode-0", 0) == (0 if same_incarnation else 1)
        w.close()
        await core.close()

    asyncio.run(main())


def test_prefill_dies_while_its_kv_is_pulled():
    """P answered (first token streamed, KV parked) and died; D's pull fails with a 503: the
    request resumes on a decode worker from that first token, and the holder is suspect."""
    async def main():
        core, addr = await _router()
        p = await FakeWorker(addr, "prefill-0", "prefill", {"zmq": "tcp://p"}).start()
        d = await FakeWorker(addr, "decode-0", "decode", {"zmq": "tcp://d"}).start()
        await _until(lambda: core.health()[0] and len(core.registry.workers) == 2)
        out: list = []
        client = asyncio.create_task(_collect(core, _req(), out))
        gen = await p.next(m.GenerateRequest)
        assert gen.prefill_only
        await p.delta("r1", [5], 1)
        await p.sock.send(m.PrefillDone("r1", m.HandoffHeader([1, 2, 3], [5], {}), "kv/r1", p.transfer))
        dec = await d.next(m.DecodeRequest)
        assert dec.kv_key == "kv/r1"
        await d.sock.send(m.PullFailed("r1", p.transfer, "TransferTimeout: no answer"))
        await d.sock.send(m.RequestFailed("r1", 503, "TransferTimeout: no answer", "internal_error"))
        resumed = await d.next(m.GenerateRequest)
        assert resumed.request_id == "r1@r1" and not resumed.prefill_only and resumed.resume.token_ids == [5]
        assert core.health()[1]["workers"]["prefill-0"]["state"] == "suspect"
        await d.delta("r1@r1", [6], 2, "length")
        await asyncio.wait_for(client, 5)
        assert [t for x in out for t in x.token_ids] == [5, 6] and core.recoveries["decode"] == 1
        p.close()
        d.close()
        await core.close()

    asyncio.run(main())
