"""Prefix-cache hits in the plan: the router hashes a prompt's blocks as the engine does, and
``slo_aware`` prices prefill on the tokens a worker must still compute.

The hashes are checked against transformers' expanded ids and the engine's own hash; the
dispatch against the router core on a real ROUTER socket with scripted workers (no model
processes) that report their prefix caches with ``KvCacheEvent`` as real workers do.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from bus import messages as m
from router.cost_model import WorkerCost
from router.prefix_price import PREFIX_PULL_S, block_hashes
from router.request_size import PromptSizer
from tests.hf_reference import hf_chat_inputs
from tests.test_router_plan import _chat, _deployment, _png, _until

# A prefill cost dominated by the tokens computed, so a cached prefix matters.
PER_TOKEN = {"step": {"base": 0.001, "new_tokens": 1e-3, "decode_seqs": 1e-4}}
# Every prefill costs the same whatever its length: only the tie-breaks separate workers.
FLAT = {"step": {"base": 0.001, "decode_seqs": 1e-4}}
LONG_TEXT = "describe the picture in great detail, " * 12


def _msgs(n_images: int, text: str = LONG_TEXT) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]}]


def test_router_block_hashes_are_the_engines(llava_dir, test_images):
    """Expanded ids equal transformers' processor's; block hashes equal the engine's chain."""
    from stages.engine.block_manager import block_extra_keys, hash_block
    from stages.engine.sequence import ImageItem

    images = test_images[:2]
    msgs = [{"role": "user", "content": [{"type": "text", "text": LONG_TEXT}, {"type": "image"},
                                         {"type": "text", "text": "and"}, {"type": "image"}]}]
    req = _chat("r", [])
    req.messages, req.images = msgs, [_png(1), _png(2)]  # sizes do not matter: LLaVA's count is fixed
    size = PromptSizer(llava_dir).count(req)
    want = hf_chat_inputs(llava_dir, msgs, images)["input_ids"][0].tolist()
    assert size.token_ids == want and size.prompt_tokens == len(want)
    assert len(size.image_offsets) == 2 and size.image_offsets[1] > 16

    pixels = ["a" * 32, "b" * 32]
    seq = SimpleNamespace(images=[ImageItem(h, off, n) for h, off, n in zip(pixels, size.image_offsets,
                                                                             size.image_tokens)])
    engine, parent, bs = [], None, 16
    for i in range((len(want) - 1) // bs):
        parent = hash_block(parent, want[i * bs:(i + 1) * bs], block_extra_keys(seq, i * bs, (i + 1) * bs))
        engine.append(f"{parent:032x}")
    assert block_hashes(size, pixels, bs) == engine
    # An image the router has not seen encoded: hashing stops at its first block.
    unknown = block_hashes(size, [pixels[0], None], bs)
    assert unknown == engine[:size.image_offsets[1] // bs]
    assert block_hashes(size, [None, None], bs) == engine[:size.image_offsets[0] // bs]


async def _hold(core, worker, hashes: list[str]) -> None:
    """``worker`` reports these prefix-cache blocks, as a real worker does after a prefill."""
    await worker.send(m.KvCacheEvent(worker.worker_id, worker.incarnation, hashes, []))
    await _until(lambda: all(worker.worker_id in core.index.kv.get(h, ()) for h in hashes))


async def _plan_of(core, w, rid: str, images=()):
    req = _chat(rid, list(images))
    req.messages = _msgs(len(images))
    task = asyncio.create_task(core.generate(req).__anext__())
    await _until(lambda: any(x.of(m.GenerateRequest) and x.of(m.GenerateRequest)[-1].request_id == rid
                             for x in w.values()))
    return task, core.flights[rid].plan


def _close(core, w, tasks):
    for t in tasks:
        t.cancel()
    for x in w.values():
        x.close()
    return core.close()


@pytest.mark.parametrize("cluster_cache", [False, True])
def test_slo_aware_prefills_where_the_prefix_is_held(llava_dir, cluster_cache):
    async def main():
        core, w = await _deployment({"prefill": [("p0", PER_TOKEN), ("p1", PER_TOKEN)], "decode": [("d0", PER_TOKEN)]},
                                    model=llava_dir, cluster_cache=cluster_cache)
        sizer = PromptSizer(llava_dir)
        req = _chat("x", [])
        req.messages = _msgs(0)
        size = sizer.count(req)
        hashes = block_hashes(size, [], 16)
        assert len(hashes) >= 5
        await _hold(core, w["p1"], hashes)
        task, plan = await _plan_of(core, w, "r1")
        cached = 16 * len(hashes)
        assert plan.prefill == "p1" and plan.cached_tokens == cached
        assert plan.ttft_s == pytest.approx(WorkerCost(PER_TOKEN).prefill_s(size.prompt_tokens - cached, cached))
        assert plan.ttft_s < WorkerCost(PER_TOKEN).prefill_s(size.prompt_tokens) / 2
        # p0 would pull the prefix from p1 through the cluster cache, or compute it all.
        from router.policy import PlanInputs
        p0 = core.registry.workers["p0"]
        x = PlanInputs(req, size, [], [], [p0], core.registry.alive("decode"), core.planner.slo, 4,
                       core.planner.prefix_view(req, size))
        alone = core.policy.plan(core.planner, x)
        if cluster_cache:
            assert alone.cached_tokens == cached and alone.ttft_s == pytest.approx(plan.ttft_s + PREFIX_PULL_S)
        else:
            assert alone.cached_tokens == 0
            assert alone.ttft_s == pytest.approx(WorkerCost(PER_TOKEN).prefill_s(size.prompt_tokens))
        await _close(core, w, [task])

    asyncio.run(main())


def test_the_holder_loses_when_its_queue_outweighs_the_prefix(llava_dir):
    async def main():
        core, w = await _deployment({"prefill": [("p0", PER_TOKEN), ("p1", PER_TOKEN)], "decode": [("d0", PER_TOKEN)]},
                                    model=llava_dir, cluster_cache=False)
        req = _chat("x", [])
        req.messages = _msgs(0)
        await _hold(core, w["p1"], block_hashes(PromptSizer(llava_dir).count(req), [], 16))
        # A long prompt queued on p1 (~3 s predicted): recomputing the prefix on p0 is faster.
        from router.backend import ApiRequest
        from router.policy import SloAware

        class Pin(SloAware):  # the long request goes to p1 whatever its price
            def plan(self, planner, x):
                return super().plan(planner, x.__class__(**{**x.__dict__, "prefills": [
                    p for p in x.prefills if p.worker_id == "p1"]}))

        core.policy = Pin()
        long = ApiRequest("big", "m", "completion", None, None, list(range(1, 3000)), [], {"max_tokens": 4}, True)
        first = asyncio.create_task(core.generate(long).__anext__())
        await _until(lambda: w["p1"].of(m.GenerateRequest))
        core.policy = SloAware()
        task, plan = await _plan_of(core, w, "r1")
        assert plan.prefill == "p0" and plan.cached_tokens == 0
        await _close(core, w, [first, task])

    asyncio.run(main())


def test_equal_ttft_ties_go_to_the_most_cached_then_the_least_loaded(llava_dir):
    async def main():
        core, w = await _deployment({"prefill": [("p0", FLAT), ("p1", FLAT), ("p2", FLAT)],
                                     "decode": [("d0", FLAT)]}, model=llava_dir, cluster_cache=False)
        req = _chat("x", [])
        req.messages = _msgs(0)
        hashes = block_hashes(PromptSizer(llava_dir).count(req), [], 16)
        await _hold(core, w["p2"], hashes)
        await _hold(core, w["p1"], hashes[:2])
        tasks = []
        task, plan = await _plan_of(core, w, "r1")  # same predicted TTFT everywhere: the most cached
        tasks.append(task)
        assert plan.prefill == "p2" and plan.cached_tokens == 16 * len(hashes)
        # Nothing cached for a new prompt: the least loaded (p2 now holds r1).
        core.holdings.add("someone-else", "p0")
        req2 = _chat("r2", [])
        task = asyncio.create_task(core.generate(req2).__anext__())
        tasks.append(task)
        await _until(lambda: "r2" in core.flights and core.flights["r2"].plan is not None)
        assert core.flights["r2"].plan.prefill == "p1" and core.flights["r2"].plan.cached_tokens == 0
        await _close(core, w, tasks)

    asyncio.run(main())
