"""The router core and its dispatch policies against fake workers, with no model process.

Each fake worker is a plain zmq DEALER socket in the test that speaks the bus's real encoding
(``bus.codec``): it registers, receives what the router dispatches, answers, heartbeats and
dies (closes its socket) when the test says so. Each test asserts where work went, what the
client saw, and that ``router.holdings`` stays consistent with what the workers were sent.
"""

from __future__ import annotations

import asyncio
import uuid

import zmq
import zmq.asyncio

from bus import messages as m
from bus.codec import decode, encode
from bus.sockets import free_tcp_address
from router.admin import workers_view
from router.backend import ApiError, ApiRequest
from router.core import RouterCore
from router.policy import make_policy


class FakeWorker:
    """A worker as the router sees it: a DEALER with its worker id as identity."""

    def __init__(self, ctx: zmq.asyncio.Context, addr: str, worker_id: str, role: str):
        self.ctx, self.addr, self.worker_id, self.role = ctx, addr, worker_id, role
        self.incarnation = uuid.uuid4().hex
        self.transfer = {"zmq": f"tcp://x/{worker_id}"}
        self.sock: zmq.asyncio.Socket | None = None

    async def start(self) -> "FakeWorker":
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, self.worker_id.encode())
        self.sock.connect(self.addr)
        info = m.WorkerInfo(worker_id=self.worker_id, incarnation=self.incarnation, role=self.role, model="m",
                            device="cpu", max_model_len=4096, num_kv_blocks=64, block_size=16,
                            is_multimodal=False, transfer=self.transfer, pid=1)
        await self.send(m.WorkerReady(info=info))
        await self.beat()
        return self

    async def send(self, msg) -> None:
        await self.sock.send_multipart(encode(msg))

    async def beat(self, running: int = 0) -> None:
        await self.send(m.Heartbeat(worker_id=self.worker_id, incarnation=self.incarnation, running=running,
                                    waiting=0, kv_blocks_used=0, kv_blocks_total=64))

    async def next(self, kind, timeout: float = 3.0):
        """The next message of type ``kind`` (pings skipped; anything else fails the test)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            if not await self.sock.poll(max(int((end - loop.time()) * 1000), 0), zmq.POLLIN):
                raise AssertionError(f"{self.worker_id} got no {kind.__name__} within {timeout} s")
            msg = decode(await self.sock.recv_multipart())
            if isinstance(msg, m.Ping):
                continue
            assert isinstance(msg, kind), f"{self.worker_id} got {type(msg).__name__}, expected {kind.__name__}"
            return msg

    async def nothing_but_pings(self, for_s: float = 0.3) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + for_s
        while (left := end - loop.time()) > 0:
            if await self.sock.poll(int(left * 1000), zmq.POLLIN):
                msg = decode(await self.sock.recv_multipart())
                assert isinstance(msg, m.Ping), f"{self.worker_id} got an unexpected {type(msg).__name__}"

    async def delta(self, rid: str, ids: list[int], finish: str | None = None, total: int | None = None) -> None:
        await self.send(m.TokenDelta(request_id=rid, text="".join(f"<{t}>" for t in ids), token_ids=ids,
                                     finish_reason=finish, prompt_tokens=3,
                                     completion_tokens=len(ids) if total is None else total))

    def die(self) -> None:
        self.sock.close(linger=0)


def _req(rid: str, max_tokens: int = 8) -> ApiRequest:
    return ApiRequest(request_id=rid, model="m", kind="completion", messages=None, prompt=None,
                      prompt_token_ids=[1, 2, 3], images=[], sampling={"max_tokens": max_tokens}, stream=True)


async def _until(cond, timeout: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


class Cluster:
    """A RouterCore on a real ROUTER socket and fake workers connected to it."""

    def __init__(self, roles: dict[str, str], **core_kw):
        self.roles, self.core_kw = roles, core_kw

    async def __aenter__(self) -> "Cluster":
        self.ctx = zmq.asyncio.Context()
        addr = free_tcp_address()
        self.core = RouterCore(["m"], **{"policy": make_policy("least_loaded"), **self.core_kw})
        await self.core.start(addr)
        self.w = {wid: await FakeWorker(self.ctx, addr, wid, role).start() for wid, role in self.roles.items()}
        await _until(lambda: len(self.core.registry.counts()) and
                     sum(self.core.registry.counts().values()) == len(self.roles))
        return self

    async def __aexit__(self, *exc) -> None:
        await self.core.close()
        for w in self.w.values():
            if not w.sock.closed:
                w.die()
        self.ctx.term()

    def client(self, req: ApiRequest) -> tuple[asyncio.Task, list]:
        out: list = []

        async def read():
            try:
                async for d in self.core.generate(req):
                    out.append(d)
            except ApiError as e:
                out.append(e)

        return asyncio.create_task(read()), out

    @property
    def holdings(self):
        return self.core.holdings

    def runs(self) -> dict[str, set[str]]:
        """Worker id -> request ids it runs, as /admin/workers reports it (``in_flight``) and as the
        registry's records read it; the two must agree."""
        view = {w["worker_id"]: w["in_flight"] for w in workers_view(self.core)["workers"]}
        runs = {wid: set(self.holdings.requests_of(wid)) for wid in self.roles}
        assert view == {wid: len(r) for wid, r in runs.items()}
        assert all(self.core.registry.workers[wid].in_flight == r for wid, r in runs.items())
        self.holdings.check()
        return {wid: r for wid, r in runs.items() if r}


def _run(coro_fn, timeout: float = 20.0):
    asyncio.run(asyncio.wait_for(coro_fn(), timeout))


def test_aggregated_request_goes_to_the_least_loaded_worker_and_leaves_no_holdings():
    async def main():
        async with Cluster({"mixed-0": "mixed", "mixed-1": "mixed"}) as c:
            t1, out1 = c.client(_req("r1"))
            g1 = await c.w["mixed-0"].next(m.GenerateRequest)  # both idle: the lower id
            assert g1.request_id == "r1" and not g1.prefill_only and g1.prompt_token_ids == [1, 2, 3]
            assert c.runs() == {"mixed-0": {"r1"}}
            t2, out2 = c.client(_req("r2"))
            g2 = await c.w["mixed-1"].next(m.GenerateRequest)  # mixed-0 holds r1: the other one
            assert g2.request_id == "r2"
            assert c.runs() == {"mixed-0": {"r1"}, "mixed-1": {"r2"}}
            await c.w["mixed-0"].delta("r1", [7])
            await c.w["mixed-0"].delta("r1", [8], "length", total=2)
            await c.w["mixed-1"].delta("r2", [9], "stop")
            await asyncio.gather(t1, t2)
            assert [t for d in out1 for t in d.token_ids] == [7, 8] and out1[-1].finish_reason == "length"
            assert [d.token_ids for d in out2] == [[9]]
            assert c.runs() == {} and c.holdings.holders_of("r1") == frozenset() and not c.core.flights
            await c.w["mixed-0"].nothing_but_pings(0.1)

    _run(main)


def test_round_robin_alternates_and_a_batch_of_deltas_reaches_each_client():
    async def main():
        async with Cluster({"mixed-0": "mixed", "mixed-1": "mixed"}, policy=make_policy("round_robin")) as c:
            clients = [c.client(_req(f"r{i}")) for i in range(4)]
            got = {wid: [(await c.w[wid].next(m.GenerateRequest)).request_id for _ in range(2)]
                   for wid in ("mixed-0", "mixed-1")}
            assert sorted(got["mixed-0"] + got["mixed-1"]) == ["r0", "r1", "r2", "r3"]
            assert sorted(got["mixed-0"]) == ["r0", "r2"] and sorted(got["mixed-1"]) == ["r1", "r3"]
            assert c.runs() == {"mixed-0": {"r0", "r2"}, "mixed-1": {"r1", "r3"}}
            for wid, rids in got.items():  # one step's deltas in one message
                await c.w[wid].send(m.TokenDeltas(deltas=[
                    m.TokenDelta(request_id=rid, text="x", token_ids=[int(rid[1:])], finish_reason="stop",
                                 completion_tokens=1) for rid in rids]))
            await asyncio.gather(*(t for t, _ in clients))
            assert [out[-1].token_ids for _, out in clients] == [[0], [1], [2], [3]]
            assert c.runs() == {}

    _run(main)


def test_disaggregated_request_moves_from_prefill_to_decode_and_the_kv_is_released():
    async def main():
        async with Cluster({"prefill-0": "prefill", "decode-0": "decode"}) as c:
            t, out = c.client(_req("r1"))
            g = await c.w["prefill-0"].next(m.GenerateRequest)
            assert g.prefill_only and g.request_id == "r1"
            assert c.runs() == {"prefill-0": {"r1"}}
            await c.w["prefill-0"].delta("r1", [5])  # the first token comes from the prefill worker
            await c.w["prefill-0"].send(m.PrefillDone(request_id="r1", header=_header(), kv_key="kv/r1",
                                                      holder=c.w["prefill-0"].transfer))
            d = await c.w["decode-0"].next(m.DecodeRequest)
            assert (d.request_id, d.kv_key, d.holder) == ("r1", "kv/r1", c.w["prefill-0"].transfer)
            # The prefill worker still holds the parked KV (an abort target) but runs nothing.
            assert c.runs() == {"decode-0": {"r1"}}
            assert c.holdings.holders_of("r1") == {"prefill-0", "decode-0"}
            await c.w["decode-0"].send(m.KvTaken(request_id="r1", kv_key="kv/r1"))
            rel = await c.w["prefill-0"].next(m.ReleaseKv)
            assert rel.kv_key == "kv/r1"
            assert c.holdings.holders_of("r1") == {"decode-0"}
            await c.w["decode-0"].delta("r1", [6, 7], "length", total=3)
            await t
            assert [tok for d in out for tok in d.token_ids] == [5, 6, 7]
            assert c.runs() == {} and c.holdings.holders_of("r1") == frozenset()

    _run(main)


def test_a_client_that_leaves_aborts_every_holder_and_frees_the_parked_kv():
    async def main():
        async with Cluster({"prefill-0": "prefill", "decode-0": "decode"}) as c:
            t, _ = c.client(_req("r1"))
            await c.w["prefill-0"].next(m.GenerateRequest)
            await c.w["prefill-0"].send(m.PrefillDone(request_id="r1", header=_header(),
                                                      kv_key="kv/r1", holder=c.w["prefill-0"].transfer))
            await c.w["decode-0"].next(m.DecodeRequest)
            t.cancel()
            await c.core.abort("r1")
            assert (await c.w["decode-0"].next(m.AbortRequest)).request_id == "r1"
            assert (await c.w["prefill-0"].next(m.AbortRequest)).request_id == "r1"
            assert (await c.w["prefill-0"].next(m.ReleaseKv)).kv_key == "kv/r1"
            assert c.runs() == {} and c.holdings.holders_of("r1") == frozenset()
            # A late delta of the gone request is not read by anyone: its work is aborted.
            await c.w["decode-0"].delta("r1", [1])
            assert (await c.w["decode-0"].next(m.AbortRequest)).request_id == "r1"

    _run(main)


def test_a_dead_workers_request_resumes_on_another_worker_from_the_tokens_sent():
    async def main():
        async with Cluster({"mixed-0": "mixed", "mixed-1": "mixed"}) as c:
            t, out = c.client(_req("r1"))
            await c.w["mixed-0"].next(m.GenerateRequest)
            await c.w["mixed-0"].delta("r1", [10, 11], total=2)
            await _until(lambda: len(out) == 1)
            c.w["mixed-0"].die()  # the router's next ping finds the connection gone
            g = await c.w["mixed-1"].next(m.GenerateRequest)
            assert g.request_id == "r1@r1" and g.resume.token_ids == [10, 11]
            assert g.resume.text_len == len("<10><11>")
            assert not c.core.registry.workers["mixed-0"].alive
            assert c.runs() == {"mixed-1": {"r1"}} and c.holdings.holders_of("r1") == {"mixed-1"}
            await c.w["mixed-1"].delta("r1@r1", [12], "length", total=3)
            await t
            assert [tok for d in out for tok in d.token_ids] == [10, 11, 12]
            assert c.core.recoveries["mixed"] == 1 and c.runs() == {}

    _run(main)


def test_a_503_from_the_prefill_worker_replans_the_request_by_the_policy():
    async def main():
        async with Cluster({"prefill-0": "prefill", "prefill-1": "prefill", "decode-0": "decode"}) as c:
            t, out = c.client(_req("r1"))
            await c.w["prefill-0"].next(m.GenerateRequest)
            assert c.runs() == {"prefill-0": {"r1"}}
            await c.w["prefill-0"].beat(running=4)  # busy now: the policy's pick is the other one
            await _until(lambda: c.core.registry.workers["prefill-0"].load == 4)
            await c.w["prefill-0"].send(m.RequestFailed(request_id="r1", status=503, message="a pull failed"))
            # The failed attempt is aborted where it ran; the new one goes where the policy says.
            assert (await c.w["prefill-0"].next(m.AbortRequest)).request_id == "r1"
            g = await c.w["prefill-1"].next(m.GenerateRequest)
            assert g.request_id == "r1@r1" and g.prefill_only and g.resume is None
            assert c.runs() == {"prefill-1": {"r1"}}
            # The old attempt's late output is dropped (and its work aborted again).
            await c.w["prefill-0"].delta("r1", [99])
            assert (await c.w["prefill-0"].next(m.AbortRequest)).request_id == "r1"
            await c.w["prefill-1"].delta("r1@r1", [1], "stop")
            await t
            assert [d.token_ids for d in out] == [[1]]

    _run(main)


def test_a_request_error_that_is_not_a_503_goes_to_the_client():
    async def main():
        async with Cluster({"mixed-0": "mixed"}) as c:
            t, out = c.client(_req("r1"))
            await c.w["mixed-0"].next(m.GenerateRequest)
            await c.w["mixed-0"].send(m.RequestFailed(request_id="r1", status=400, message="prompt too long"))
            await t
            assert isinstance(out[-1], ApiError) and out[-1].status == 400
            assert c.runs() == {} and c.holdings.holders_of("r1") == frozenset()

    _run(main)


def test_past_the_retry_budget_a_dead_workers_request_fails_with_a_503():
    async def main():
        async with Cluster({"mixed-0": "mixed", "mixed-1": "mixed"}, retry_budget=0) as c:
            t, out = c.client(_req("r1"))
            await c.w["mixed-0"].next(m.GenerateRequest)
            c.w["mixed-0"].die()
            await t
            assert isinstance(out[-1], ApiError) and out[-1].status == 503 and "retry budget" in out[-1].message
            await c.w["mixed-1"].nothing_but_pings(0.2)
            assert c.runs() == {}

    _run(main)


def test_with_no_worker_of_the_role_left_the_request_waits_then_fails():
    async def main():
        async with Cluster({"mixed-0": "mixed"}, worker_wait_s=0.3) as c:
            t, out = c.client(_req("r1"))
            await c.w["mixed-0"].next(m.GenerateRequest)
            c.w["mixed-0"].die()
            await t
            assert isinstance(out[-1], ApiError) and out[-1].status == 503
            assert "no mixed worker came back" in out[-1].message
            assert c.runs() == {} and not c.core.health()[0]

    _run(main)


def test_a_silent_worker_is_dead_past_the_heartbeat_timeout_and_its_request_moves():
    """Wedged, not gone: its connection stays open (pings go through) but it says nothing."""
    async def main():
        async with Cluster({"mixed-0": "mixed", "mixed-1": "mixed"}, heartbeat_timeout=1.0) as c:
            t, out = c.client(_req("r1"))
            await c.w["mixed-0"].next(m.GenerateRequest)
            await c.w["mixed-0"].delta("r1", [4])

            async def beats():  # only mixed-1 keeps beating
                while True:
                    await c.w["mixed-1"].beat()
                    await asyncio.sleep(0.1)

            beating = asyncio.create_task(beats())
            try:
                g = await c.w["mixed-1"].next(m.GenerateRequest, timeout=4.0)
            finally:
                beating.cancel()
            assert g.request_id == "r1@r1" and g.resume.token_ids == [4]
            assert not c.core.registry.workers["mixed-0"].alive and c.core.recoveries["mixed"] == 1
            assert c.runs() == {"mixed-1": {"r1"}}
            await c.w["mixed-1"].delta("r1@r1", [5], "stop", total=2)
            await t
            assert [tok for d in out for tok in d.token_ids] == [4, 5]

    _run(main)


def test_heartbeats_count_as_load_and_a_restart_frees_what_the_old_incarnation_held():
    async def main():
        async with Cluster({"mixed-0": "mixed", "mixed-1": "mixed"}) as c:
            await c.w["mixed-0"].beat(running=5)  # busy with work of another router
            await _until(lambda: c.core.registry.workers["mixed-0"].load == 5)
            t, out = c.client(_req("r1"))
            await c.w["mixed-1"].next(m.GenerateRequest)
            assert c.runs() == {"mixed-1": {"r1"}}
            # mixed-1 restarts (a new incarnation on the same id): it holds nothing of before.
            w = c.w["mixed-1"]
            w.die()
            c.w["mixed-1"] = w = FakeWorker(c.ctx, w.addr, "mixed-1", "mixed")
            await w.start()
            g = await w.next(m.GenerateRequest, timeout=3.0)  # the least loaded again: recovered here
            assert g.request_id == "r1@r1" and g.resume is None
            assert c.core.registry.restarts["mixed-1"] == 1
            assert c.runs() == {"mixed-1": {"r1"}}
            await w.delta("r1@r1", [3], "stop")
            await t
            assert [d.token_ids for d in out] == [[3]] and c.runs() == {}

    _run(main)


def _header() -> m.HandoffHeader:
    """A prefilled request's header (the router forwards it unread)."""
    return m.HandoffHeader(prompt_token_ids=[1, 2, 3], output_token_ids=[5], params={"max_tokens": 8})
