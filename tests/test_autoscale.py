"""The autoscaler's decision (``router.autoscale.decide``) on constructed loads: which worker moves
where and why, hysteresis, cool-down, min_per_role, the SLO signal; and its config."""

from __future__ import annotations

import math

import pytest

from router.autoscale import AutoscaleConfig, ControllerState, StageLoad, decide

CFG = AutoscaleConfig(enabled=True, interval_s=1, cooldown_s=10, min_per_role=1, persist=3, margin=0.3,
                      min_backlog_s=1.0)


def stage(role: str, per_worker: list[float]) -> StageLoad:
    """E/P-like: the work splits evenly over the workers."""
    total, n = sum(per_worker), len(per_worker)
    return StageLoad(role, {f"{role}-{i}": s for i, s in enumerate(per_worker)}, total / n, total / (n + 1),
                     total / (n - 1) if n > 1 else math.inf)


def loads(e, p, d) -> dict:
    return {"encode": stage("encode", e), "prefill": stage("prefill", p), "decode": stage("decode", d)}


def run(seq, cfg=CFG, slo=None, state=None, t0=100.0, busy=()):
    """``decide`` over consecutive intervals; the decisions (None where it held)."""
    state = state or ControllerState()
    return [decide(x, slo or {}, state, t0 + i * cfg.interval_s, cfg, busy=i in busy) for i, x in enumerate(seq)], state


def test_image_heavy_moves_the_idlest_worker_to_encode_after_persist_intervals():
    x = loads([6.0], [0.2, 0.0], [0.1])
    got, _ = run([x] * 3)
    assert got[:2] == [None, None]
    d = got[2]
    assert (d.worker_id, d.from_role, d.to_role, d.reason) == ("prefill-1", "prefill", "encode", "backlog")
    assert "encode backlog 6.00 s/worker -> 3.00" in d.detail


def test_text_heavy_moves_an_encoder_to_prefill():
    got, _ = run([loads([0.0, 0.3], [5.0], [0.2])] * 3)
    assert (got[2].worker_id, got[2].from_role, got[2].to_role) == ("encode-0", "encode", "prefill")


def test_hysteresis_a_need_that_comes_and_goes_never_moves():
    busy_e, calm = loads([6.0], [0.2, 0.0], [0.1]), loads([0.1], [0.2, 0.0], [0.1])
    got, state = run([busy_e, busy_e, calm, busy_e, busy_e, calm, busy_e])
    assert got == [None] * 7
    assert "no stage has" in state.hold or "wanted 1 of 3" in state.hold
    # A different best move also restarts the count.
    other = loads([0.0, 0.0], [5.0], [0.1])
    e_need = loads([6.0, 0.0], [0.0], [0.1])
    got, _ = run([e_need, e_need, other, other, e_need])
    assert got == [None] * 5


def test_margin_a_move_that_barely_helps_is_not_made():
    # Encode 1.5 s on one worker; the one prefill left would hold 1.2 s: max(0.75, 1.2) cuts 20% < 30%.
    x = loads([1.5], [0.6, 0.6], [0.0])
    got, state = run([x] * 5)
    assert got == [None] * 5 and "< margin 30%" in state.hold


def test_below_min_backlog_nothing_moves():
    got, state = run([loads([0.9], [0.0, 0.0], [0.0])] * 5)
    assert got == [None] * 5 and "no stage has 1 s" in state.hold


def test_an_idle_deployment_never_moves_even_without_a_floor():
    cfg = AutoscaleConfig(enabled=True, interval_s=1, cooldown_s=0, persist=1, min_backlog_s=0.0)
    got, state = run([loads([0.0, 0.0], [0.0], [0.0])] * 3, cfg=cfg)
    assert got == [None] * 3 and "no stage has" in state.hold


def test_cooldown_after_a_move_and_while_a_switch_runs():
    x = loads([6.0], [0.2, 0.0], [0.1])
    # Moves at interval 2; the switch runs in intervals 3-4 (busy); cool-down counts from 4: 10 s.
    got, state = run([x] * 20, busy={3, 4})
    moved = [i for i, d in enumerate(got) if d is not None]
    assert moved[0] == 2
    assert moved[1] == 4 + 10 + 2, moved  # cooled down at 14, then 3 intervals wanted: 14, 15, 16
    assert all(d.to_role == "encode" for d in got if d)


def test_min_per_role_never_empties_a_stage():
    # Every other stage has one worker: nothing may move although encode is swamped.
    got, state = run([loads([9.0], [0.0], [0.0])] * 4)
    assert got == [None] * 4 and "min_per_role 1" in state.hold
    cfg = AutoscaleConfig(enabled=True, interval_s=1, cooldown_s=0, persist=1, min_per_role=2)
    got, state = run([loads([9.0], [0.0, 0.0], [0.0, 0.0])], cfg=cfg)
    assert got == [None] and "min_per_role 2" in state.hold
    got, _ = run([loads([9.0], [0.0, 0.0, 0.0], [0.0, 0.0])], cfg=cfg)
    assert (got[0].from_role, got[0].to_role) == ("prefill", "encode")


def test_the_donor_is_the_stage_that_loses_least():
    # Prefill holds work on two workers, decode idles on two: decode gives one.
    got, _ = run([loads([8.0], [0.5, 0.5], [0.0, 0.2])] * 3)
    assert (got[2].worker_id, got[2].from_role) == ("decode-0", "decode")


def test_slo_met_holds_and_misses_point_at_their_stage():
    x = loads([6.0], [0.0, 0.0], [3.0, 0.0])  # encode worst by backlog; decode needy too
    got, state = run([x] * 3, slo={"ttft": (10, 0), "tpot": (10, 0)})
    assert got == [None] * 3 and state.hold == "every recent request met its SLO"
    got, _ = run([x] * 3, slo={"ttft": (10, 4), "tpot": (10, 0)})
    assert (got[2].to_role, got[2].reason) == ("encode", "ttft_slo")
    # TPOT misses: decode is the receiver even though encode's backlog is larger.
    d_need = {"encode": stage("encode", [6.0]), "prefill": stage("prefill", [0.0, 0.0]),
              "decode": StageLoad("decode", {"decode-0": 3.0}, 3.0, 1.0, math.inf)}
    got, _ = run([d_need] * 3, slo={"ttft": (10, 0), "tpot": (4, 6)})
    assert (got[2].worker_id, got[2].from_role, got[2].to_role, got[2].reason) == \
        ("prefill-0", "prefill", "decode", "tpot_slo")


def test_decode_that_does_not_speed_up_with_a_worker_is_left_alone():
    # A decode batch whose step hardly shrinks when spread (CPU: a fixed cost per step): 5 s -> 4.6 s.
    x = {"encode": stage("encode", [0.0, 0.0]), "prefill": stage("prefill", [0.1]),
         "decode": StageLoad("decode", {"decode-0": 5.0}, 5.0, 4.6, math.inf)}
    got, state = run([x] * 4)
    assert got == [None] * 4 and "< margin" in state.hold


def test_config_from_yaml_dict():
    assert AutoscaleConfig.from_dict(None).enabled is False
    c = AutoscaleConfig.from_dict({"interval_s": 0.5, "cooldown_s": 3, "min_per_role": 1})
    assert c.enabled and c.interval_s == 0.5 and c.cooldown_s == 3
    assert AutoscaleConfig.from_dict({"enabled": False}).enabled is False
    with pytest.raises(ValueError, match="unknown keys"):
        AutoscaleConfig.from_dict({"interval": 2})
    with pytest.raises(ValueError):
        AutoscaleConfig.from_dict({"min_per_role": 0})
    with pytest.raises(ValueError):
        AutoscaleConfig.from_dict({"margin": 1.0})


def test_the_controller_moves_a_worker_through_the_switch_path():
    """A real router core and scripted workers (real sockets): decode-0 holds 20 long decodes, the
    encoders idle; ``Autoscaler.step`` reads that from the flights and cost models, asks for the
    move after ``persist`` intervals, SwitchRole reaches encode-0, nothing moves while it switches
    or cools down, and with one encoder left min_per_role holds."""
    import asyncio

    from prometheus_client import CollectorRegistry

    from bus import messages as m
    from router.autoscale import Autoscaler
    from router.backend import ApiRequest
    from router.flight import Flight as _Flight
    from tests.test_resilience_router import FakeWorker, _router, _until

    async def main():
        core, addr = await _router()
        ws = [await FakeWorker(addr, wid, wid.split("-")[0]).start()
              for wid in ("encode-0", "encode-1", "prefill-0", "decode-0")]
        await _until(lambda: len(core.registry.workers) == 4)
        for i in range(20):
            rid = f"r{i}"
            core.flights[rid] = _Flight(ApiRequest(rid, "m", "chat", [], None, None, [], {"max_tokens": 500}, True))
            core.holdings.add(rid, "decode-0")
        cfg = AutoscaleConfig(enabled=True, interval_s=1, cooldown_s=5, persist=2, margin=0.2, min_backlog_s=1.0)
        reg = CollectorRegistry()
        scaler = Autoscaler(core, cfg, reg)
        t = 1000.0
        assert scaler.step(t) is None and "wanted 1 of 2" in scaler.state.hold
        d = scaler.step(t + 1)
        assert (d.worker_id, d.from_role, d.to_role, d.reason) == ("encode-0", "encode", "decode", "backlog")
        sw = await ws[0].next(m.SwitchRole)
        assert (sw.role, sw.epoch) == ("decode", 1)
        assert scaler.step(t + 2) is None and scaler.state.hold == "a switch is under way"
        ws[0].beats.cancel()
        await ws[0].sock.send(m.WorkerReady(m.WorkerInfo("encode-0", ws[0].incarnation, "decode", "m", "cpu", 4096,
                                                         64, 16, False, ws[0].transfer, 1, {}, 1)))
        rec = core.registry.workers["encode-0"]
        await _until(lambda: rec.switch == "active" and rec.role == "decode")
        assert scaler.step(t + 3) is None and "cooling down" in scaler.state.hold
        # Cooled down; decode still holds the work, but the one encoder left stays (min_per_role 1),
        # and prefill-0 is the last of its role too.
        assert scaler.step(t + 9) is None and "min_per_role 1" in scaler.state.hold
        assert reg.get_sample_value("epd:autoscale_decisions_total",
                                    {"from": "encode", "to": "decode", "reason": "backlog"}) == 1.0
        assert reg.get_sample_value("epd:autoscale_backlog_seconds", {"role": "decode"}) > 1.0
        assert len(scaler.decisions) == 1
        ws[0].sock.close()
        for w in ws[1:]:
            w.close()
        await core.close()

    asyncio.run(main())
