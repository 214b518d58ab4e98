"""Plans and policies of the router core against scripted workers (real ROUTER socket, no model).

Each fake worker registers with a cost model, so what the policy predicts is known exactly:
the tests check which workers a plan picks, that a request's images are encoded in parallel on
the encoders it was planned on, admission's 429, the online correction and /admin/workers.
"""

from __future__ import annotations

import asyncio
import io
import uuid

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from PIL import Image

from bus import messages as m
from bus.sockets import AsyncSocket, free_tcp_address
from router.admin import add_admin_routes
from router.api import make_app
from router.backend import ApiError, ApiRequest
from router.cost_model import WorkerCost
from router.core import RouterCore
from router.limits import ApiLimits
from router.plan import Slo
from router.plan_metrics import PlanMetrics
from router.policy import make_policy

FAST = {"step": {"base": 0.001, "new_tokens": 1e-5, "decode_seqs": 1e-4}, "encode": {"base": 0.001,
                                                                                    "image_tokens": 1e-5}}
SLOW = {"step": {"base": 0.1, "new_tokens": 1e-3, "decode_seqs": 0.05}, "encode": {"base": 0.1,
                                                                                  "image_tokens": 1e-3}}


class Worker:
    def __init__(self, addr: str, worker_id: str, role: str, cost: dict, model: str = "m"):
        self.addr, self.worker_id, self.role, self.cost, self.model = addr, worker_id, role, cost, model
        self.got: list = []  # every work message received, in order

    async def start(self) -> "Worker":
        self.incarnation = uuid.uuid4().hex
        self.sock = AsyncSocket("dealer", self.addr, bind=False, identity=self.worker_id.encode())
        await self.sock.send(m.WorkerReady(m.WorkerInfo(
            self.worker_id, self.incarnation, self.role, self.model, "cpu", 4096, 64, 16, True,
            {"zmq": f"tcp://x/{self.worker_id}"}, 1, self.cost)))
        self.tasks = [asyncio.create_task(self._beat()), asyncio.create_task(self._recv())]
        return self

    async def _beat(self):
        while True:
            await self.sock.send(m.Heartbeat(self.worker_id, self.incarnation, 0, 0, 0, 64))
            await asyncio.sleep(0.5)

    async def _recv(self):
        while True:
            _, msg = await self.sock.recv()
            if not isinstance(msg, m.Ping):
                self.got.append(msg)

    def of(self, kind) -> list:
        return [g for g in self.got if isinstance(g, kind)]

    async def send(self, msg) -> None:
        await self.sock.send(msg)

    def close(self):
        for t in self.tasks:
            t.cancel()
        self.sock.close()


async def _until(cond, timeout: float = 5.0):
    for _ in range(int(timeout / 0.02)):
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


def _png(seed: int, w: int = 40, h: int = 30) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _chat(rid: str, images: list[bytes], **kw) -> ApiRequest:
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": "what is this?"}]
    return ApiRequest(rid, "m", "chat", [{"role": "user", "content": content}], None, None, images,
                      {"max_tokens": 4}, True, **kw)


async def _deployment(roles: dict[str, list[tuple[str, dict]]], model: str = "m", **kw):
    addr = free_tcp_address()
    core = RouterCore(["m"], **kw)
    await core.start(addr)
    workers = {wid: await Worker(addr, wid, role, cost, model).start() for role, ws in roles.items()
               for wid, cost in ws}
    await _until(lambda: len(core.registry.workers) == len(workers))
    return core, workers


async def _serve_encodes(enc: Worker):
    """Answer each EncodeRequest with one ref per image."""
    seen = 0
    while True:
        reqs = enc.of(m.EncodeRequest)
        for r in reqs[seen:]:
            refs = [m.ImageRef(f"{enc.worker_id}-{r.request_id}-{i}", 64, None, {"zmq": "x"})
                    for i in range(len(r.images))]
            await enc.send(m.EncodeDone(r.request_id, refs))
        seen = len(reqs)
        await asyncio.sleep(0.01)


def test_four_images_run_in_parallel_on_both_encoders_then_the_planned_p_and_d():
    async def main():
        core, w = await _deployment({"encode": [("e0", FAST), ("e1", FAST)], "prefill": [("p0", FAST)],
                                     "decode": [("d0", FAST)]})
        servers = [asyncio.create_task(_serve_encodes(w[e])) for e in ("e0", "e1")]
        out: list = []

        async def client():
            async for d in core.generate(_chat("r1", [_png(i) for i in range(4)])):
                out.append(d)

        task = asyncio.create_task(client())
        await _until(lambda: w["p0"].of(m.GenerateRequest))
        # Two images each, under their own ids, encoded at once.
        parts = {e: w[e].of(m.EncodeRequest) for e in ("e0", "e1")}
        assert [len(p) for p in parts.values()] == [1, 1]
        assert sorted(len(p[0].images) for p in parts.values()) == [2, 2]
        assert {p[0].request_id for p in parts.values()} == {"r1#e0", "r1#e1"}
        gen = w["p0"].of(m.GenerateRequest)[0]
        assert gen.prefill_only and all(ref.content_hash for ref in gen.image_refs) and len(gen.image_refs) == 4
        assert core.registry.workers["e0"].in_flight == set() == core.registry.workers["e1"].in_flight
        plan = core.flights["r1"].plan
        assert plan.policy == "slo_aware" and plan.prefill == "p0" and plan.decode == "d0"
        assert sorted(plan.encoders) == ["e0", "e0", "e1", "e1"] and plan.ttft_s > 0 and plan.tpot_s > 0
        await w["p0"].send(m.TokenDelta("r1", "a", [5], None, None, 300, 1))
        await w["p0"].send(m.PrefillDone("r1", m.HandoffHeader([1], [5], {}), "kv/r1", {"zmq": "x"}))
        await _until(lambda: w["d0"].of(m.DecodeRequest))
        await w["d0"].send(m.TokenDelta("r1", "b", [6], "length", None, 300, 2))
        await asyncio.wait_for(task, 5)
        assert [d.token_ids for d in out] == [[5], [6]]
        for t in servers:
            t.cancel()
        for x in w.values():
            x.close()
        await core.close()

    asyncio.run(main())


def test_slo_aware_picks_the_fastest_prefill_and_a_decode_meeting_the_tpot_slo():
    async def main():
        core, w = await _deployment({"prefill": [("p-fast", FAST), ("a-slow", SLOW)],
                                     "decode": [("d-fast", FAST), ("a-slow-d", SLOW)]},
                                    slo=Slo(tpot_s=0.02))
        task = asyncio.create_task(core.generate(_chat("r1", [])).__anext__())
        await _until(lambda: w["p-fast"].of(m.GenerateRequest))
        plan = core.flights["r1"].plan
        assert (plan.prefill, plan.decode) == ("p-fast", "d-fast")
        assert plan.tpot_s <= 0.02
        # The plan's prediction: the fast worker's profile for this prompt.
        assert plan.ttft_s == pytest.approx(WorkerCost(FAST).prefill_s(plan.size.prompt_tokens))
        assert not w["a-slow"].got
        task.cancel()
        for x in w.values():
            x.close()
        await core.close()

    asyncio.run(main())


def test_baselines_put_every_image_on_one_encoder():
    async def main():
        core, w = await _deployment({"encode": [("e0", FAST), ("e1", FAST)], "prefill": [("p0", FAST)],
                                     "decode": [("d0", FAST)]}, policy=make_policy("least_loaded"))
        servers = [asyncio.create_task(_serve_encodes(w[e])) for e in ("e0", "e1")]
        task = asyncio.create_task(core.generate(_chat("r1", [_png(i + 10) for i in range(4)])).__anext__())
        await _until(lambda: w["p0"].of(m.GenerateRequest))
        sent = [r for e in ("e0", "e1") for r in w[e].of(m.EncodeRequest)]
        assert len(sent) == 1 and len(sent[0].images) == 4
        task.cancel()
        for t in servers:
            t.cancel()
        for x in w.values():
            x.close()
        await core.close()

    asyncio.run(main())


def test_admission_answers_429_when_every_plan_would_queue_too_long():
    async def main():
        metrics = PlanMetrics()
        core, w = await _deployment({"prefill": [("p0", SLOW)], "decode": [("d0", SLOW)]}, max_queue_s=0.5,
                                    plan_metrics=metrics)
        long = ApiRequest("big", "m", "completion", None, None, list(range(1, 3000)), [], {"max_tokens": 4}, True)
        first = asyncio.create_task(core.generate(long).__anext__())
        await _until(lambda: w["p0"].of(m.GenerateRequest))  # ~3.1 s of predicted prefill queued on p0
        with pytest.raises(ApiError) as err:
            await core.generate(_chat("r2", [])).__anext__()
        e = err.value
        assert e.status == 429 and e.code == "rate_limit_exceeded" and int(e.headers["Retry-After"]) >= 1
        assert metrics.rejected.labels(reason="queue")._value.get() == 1
        first.cancel()
        for x in w.values():
            x.close()
        await core.close()

    asyncio.run(main())


def test_heartbeat_timings_correct_the_model_online():
    cost = WorkerCost(FAST)
    feats = [1.0, 100.0, 5.0, 0.0, 0.0]
    predicted = cost.prefill_s(100)
    for _ in range(30):
        cost.observe([0.0, *feats, 3 * sum(c * x for c, x in zip((0.001, 1e-5, 0, 1e-4, 0), feats))])
    assert cost.correction["prefill"] == pytest.approx(3.0, rel=0.01)
    assert cost.prefill_s(100) == pytest.approx(3 * predicted, rel=0.01)
    assert cost.correction["decode"] == 1.0  # decode-only steps were not seen


def test_admin_workers_shows_cost_models_behind_the_admin_key():
    async def main():
        core, w = await _deployment({"prefill": [("p0", FAST)], "decode": [("d0", SLOW)]})
        app = make_app(core, ApiLimits())
        add_admin_routes(app, core, "sekret")
        runner = web.AppRunner(app)
        await runner.setup()
        port = int(free_tcp_address().rsplit(":", 1)[1])
        await web.TCPSite(runner, "127.0.0.1", port).start()
        url = f"http://127.0.0.1:{port}/admin/workers"
        async with aiohttp.ClientSession() as s:
            async with s.get(url) as r:
                assert r.status == 401 and (await r.json())["error"]["code"] == "invalid_api_key"
            async with s.get(url, headers={"Authorization": "Bearer sekret"}) as r:
                assert r.status == 200
                body = await r.json()
        workers = {x["worker_id"]: x for x in body["workers"]}
        assert set(workers) == {"p0", "d0"}
        for x in workers.values():
            assert {"worker_id", "role", "state", "device", "load", "kv_blocks_used", "kv_blocks_total",
                    "cost_model"} <= set(x)
        assert workers["d0"]["cost_model"]["step"]["decode_seqs"] == 0.05 and workers["d0"]["state"] == "alive"
        await runner.cleanup()
        for x in w.values():
            x.close()
        await core.close()

    asyncio.run(main())


def test_slo_and_priority_body_fields():
    from router.openai_protocol import parse_completion

    body = {"model": "m", "prompt": "hi", "slo": {"ttft_ms": 250, "tpot_ms": 40}, "priority": 2}
    req = parse_completion(body, ["m"], ApiLimits(), "r").api
    assert req.slo == {"ttft_ms": 250.0, "tpot_ms": 40.0} and req.priority == 2
    slo = Slo.of(Slo(ttft_s=1.0, tpot_s=0.1), {"tpot_ms": 40})
    assert (slo.ttft_s, slo.tpot_s) == (1.0, 0.04)
    for bad in ({"ttft_ms": -1}, {"ttfb_ms": 5}, "fast", {"tpot_ms": True}):
        with pytest.raises(ApiError) as e:
            parse_completion({**body, "slo": bad}, ["m"], ApiLimits(), "r")
        assert e.value.status == 400 and e.value.param.startswith("slo")


def test_ttft_overhead_is_learned_from_first_tokens():
    from router.plan import Plan, Planner
    from router.request_size import RequestSize

    planner = Planner(registry=None, flights={})
    plan = Plan(RequestSize(10), prefill="p0", ttft_s=0.01)
    for i in range(60):
        planner.first_token(plan, 2.0 if i % 5 == 0 else 0.05)  # every fifth one descheduled
    assert planner.overhead["ttft"] == pytest.approx(0.04, rel=1e-3)  # the typical offset, not the mean's
    with_e = Plan(RequestSize(10), ["e0"], prefill="p0", ttft_s=0.01)
    planner.first_token(with_e, 0.11)
    assert planner.overhead["ttft+E"] == pytest.approx(0.1) and planner.overhead["ttft"] == pytest.approx(0.04)


def test_one_slow_first_token_does_not_price_its_worker_out():
    """The offset is the deployment's, not a worker's: after p-fast's first request was
    descheduled (100x its prediction), the next request still goes to p-fast."""
    async def main():
        core, w = await _deployment({"prefill": [("p-fast", FAST), ("p-slow", SLOW)], "decode": [("d0", FAST)]})
        task = asyncio.create_task(core.generate(_chat("r1", [])).__anext__())
        await _until(lambda: w["p-fast"].of(m.GenerateRequest))
        plan = core.flights["r1"].plan
        core.planner.first_token(plan, 100 * plan.ttft_s + 1.0)
        task2 = asyncio.create_task(core.generate(_chat("r2", [])).__anext__())
        await _until(lambda: "r2" in core.flights and core.flights["r2"].plan is not None)
        assert core.flights["r2"].plan.prefill == "p-fast"
        for t in (task, task2):
            t.cancel()
        for x in w.values():
            x.close()
        await core.close()

    asyncio.run(main())
