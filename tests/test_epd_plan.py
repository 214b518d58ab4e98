"""epd-plan's simulation (router/plan_sim.py) on cost models whose answer is known, and its CLI."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from argparse import Namespace

import numpy as np
import pytest

from perf.epd_plan import SplitRunner
from router.plan import Slo
from router.plan_sim import SimRequest, Simulation, Split, all_splits, attainment

BUDGET = 512
ZERO = {"base": 0.0, "new_tokens": 0.0, "attn_kilopairs": 0.0, "decode_seqs": 0.0, "decode_ctx_ktokens": 0.0}


def spec(step=None, encode=None, max_num_seqs=256) -> dict:
    return {"step": {**ZERO, **(step or {})}, "encode": {"base": 0.0, "images": 0.0, "image_tokens": 0.0, **(encode or {})},
            "token_budget": BUDGET, "max_num_seqs": max_num_seqs}


def planner(trace, costs, ttft_s, tpot_s, burstiness=1.0, seed=0) -> SplitRunner:
    args = Namespace(slo_ttft_ms=ttft_s * 1e3, slo_tpot_ms=tpot_s * 1e3, burstiness=burstiness, seed=seed,
                     policy="slo_aware", handoff_ms=0.0, hop_ms=0.0, host_cores=None, threads=None, max_rate=200.0)
    return SplitRunner(args, trace, costs, costs)


def test_splits_of_three_devices():
    assert [s.name for s in all_splits(3)] == ["1p2d", "2p1d", "1e1p1d", "3m", "1e2m", "2e1m"]
    assert Split.parse("2e1p1d") == Split(2, 1, 1, 0) and Split.parse("2m").devices == 2
    for bad in ("1e", "1p", "1m1d", "x"):
        with pytest.raises(ValueError):
            Split.parse(bad)


def test_one_worker_constant_service_is_md1():
    """One prompt per step (a full token budget) at 0.1 s, one output token: an M/D/1 queue.
    At load 0.5 its mean time in system is s + rho*s / (2(1 - rho)) = 0.15 s (Pollaczek-Khinchine)."""
    s = 0.1
    costs = spec({"new_tokens": s / BUDGET})
    trace = [SimRequest(BUDGET, [], 1) for _ in range(4000)]
    from perf.epd_bench.load import arrival_times

    reqs = [SimRequest(BUDGET, [], 1, t) for t in arrival_times(len(trace), 0.5 / s, 1.0, 0)]
    flights = Simulation(Split(mixed=1), costs, costs).run(reqs)
    mean = np.mean([f.first_token - f.req.arrival for f in flights])
    assert mean == pytest.approx(s + 0.5 * s / (2 * 0.5), rel=0.08)
    # Even arrivals: every request is served in s until the rate passes 1/s; past it the queue
    # grows by (s - 1/rate) a request, so a TTFT SLO of 1.5 s is met by 90% up to just over 1/s.
    p = planner(trace[:100], costs, 1.5 * s, 1.0, burstiness=1e6)
    assert p.goodput(Split(mixed=1)) == pytest.approx(1 / s, rel=0.03)
    assert p.attainment(Split(mixed=1), 0.9 / s) == 1.0
    assert p.attainment(Split(mixed=1), 1.3 / s) < 0.5


def test_more_decode_workers_raise_decode_bound_goodput():
    """TPOT = 10 ms + 5 ms a sequence: a 60 ms SLO holds 10 sequences a decode worker; prefill is
    nearly free, so goodput is decode-bound and a second decode worker about doubles it."""
    costs = spec({"base": 0.01, "new_tokens": 1e-6, "decode_seqs": 0.005})
    trace = [SimRequest(32, [], 64) for _ in range(120)]
    p = planner(trace, costs, 5.0, 0.06, burstiness=1e6)
    one, two = p.goodput(Split.parse("1p1d")), p.goodput(Split.parse("1p2d"))
    # One worker: 10 sequences of 63 decode steps of 60 ms: about 10 / 3.8 s = 2.6 req/s.
    assert one == pytest.approx(10 / (63 * 0.06), rel=0.25)
    assert two > 1.7 * one


def test_image_heavy_trace_favours_encoders_and_text_does_not():
    """Encode-bound (0.47 s of encode a request, prefill and decode nearly free): goodput follows
    the devices that encode. With encoders present every image goes to them (the router's rule),
    so 1e3m is no better than 1e1p2d; without, each prefill or mixed worker encodes its own."""
    costs = spec({"base": 0.005, "new_tokens": 1e-5, "decode_seqs": 1e-4}, {"base": 0.01, "image_tokens": 2e-4})
    images = [SimRequest(64 + 4 * 576, [576] * 4, 8) for _ in range(40)]
    p = planner(images, costs, 2.0, 0.1, burstiness=1e6)
    good = {s.name: p.goodput(s) for s in all_splits(4) if s.name != "1p3d"}
    assert good["2e2m"] > 1.8 * good["1e3m"] and good["3e1m"] > 1.3 * good["2e2m"]
    assert good["2e1p1d"] > 1.8 * good["1e2p1d"] and good["1e2p1d"] == pytest.approx(good["1e1p2d"], rel=0.03)
    assert max(good, key=good.get) == "4m"
    # Text only, prefill-bound (0.26 s a prompt): an encoder is a wasted device.
    costs = spec({"base": 0.005, "new_tokens": 1e-3, "decode_seqs": 1e-4})
    text = [SimRequest(256, [], 32) for _ in range(40)]
    p = planner(text, costs, 0.6, 0.05, burstiness=1e6)
    good = {s.name: p.goodput(s) for s in all_splits(3)}
    assert good["2p1d"] > 1.7 * good["1e1p1d"] and good["1e1p1d"] == pytest.approx(good["1p2d"], rel=0.03)
    assert max(good, key=good.get) in ("2p1d", "3m")


def test_policy_spreads_images_over_encoders():
    """The router's slo_aware plan, not a copy: four images go to both encoders, and the request
    then waits for the slower half only."""
    costs = spec({"base": 0.001}, {"base": 0.0, "image_tokens": 1e-3})
    sim = Simulation(Split.parse("2e1p1d"), costs, costs, slo=Slo(10.0, 1.0), handoff_s=0.0)
    (f,) = sim.run([SimRequest(4 * 100 + 10, [100] * 4, 2)])
    assert sorted(f.plan.encoders) == ["encode-0", "encode-0", "encode-1", "encode-1"]
    assert f.first_token == pytest.approx(0.2 + 4 * 0.002 + 0.001 + 410 * 0.0, abs=1e-6)
    assert attainment([f], Slo(0.3, 1.0)) == 1.0 and attainment([f], Slo(0.1, 1.0)) == 0.0


def _png() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_cli_on_a_jsonl_trace(tmp_path):
    bodies = [{"messages": [{"role": "user", "content": "describe this picture please " * 8}], "max_tokens": 16},
              {"messages": [{"role": "user", "content": [{"type": "text", "text": "what is it?"},
                                                         {"type": "image_url", "image_url": {"url": _png()}}]}],
               "max_tokens": 8}]
    (tmp_path / "trace.jsonl").write_text("\n".join(json.dumps(b) for b in bodies) + "\n")
    step = {"source": "profiled", "step": {**ZERO, "base": 0.004, "new_tokens": 1e-4, "decode_seqs": 1e-3}}
    encode = {"source": "profiled", "encode": {"base": 0.02, "images": 0.0, "image_tokens": 1e-4}}
    (tmp_path / "step.json").write_text(json.dumps(step))
    (tmp_path / "encode.json").write_text(json.dumps(encode))
    out = subprocess.run([sys.executable, "-m", "perf.epd_plan", "--devices", "3", "--dataset", "jsonl",
                          "--jsonl", str(tmp_path / "trace.jsonl"), "--num-prompts", "16", "--image-tokens", "64",
                          "--profile", str(tmp_path / "step.json"), "--profile", str(tmp_path / "encode.json"),
                          "--slo-ttft-ms", "300", "--slo-tpot-ms", "30", "--rates", "1,5",
                          "--json", str(tmp_path / "plan.json")],
                         capture_output=True, text=True, timeout=60, check=True)
    assert "recommended:" in out.stdout and "1e1p1d" in out.stdout, out.stdout
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert {r["split"] for r in plan["splits"]} == {s.name for s in all_splits(3)}
    assert plan["recommended"] == plan["splits"][0]["split"]
    assert all(r["goodput_rps"] > 0 for r in plan["splits"])
    # --help explains the inputs; the tool loads no torch (it runs on an operator's laptop).
    help_text = subprocess.run([sys.executable, "-m", "perf.epd_plan", "--help"], capture_output=True, text=True,
                               check=True).stdout
    assert "--profile" in help_text and "/admin/workers" in help_text and "random-mm" in help_text
    code = "import sys, perf.epd_plan, router.plan_sim; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_router_correction_scales_the_costs():
    """A spec carrying the router's online correction (GET /admin/workers) prices steps by it."""
    base = spec({"new_tokens": 1e-3})
    req = [SimRequest(100, [], 1)]
    (plain,) = Simulation(Split(mixed=1), base, base).run(req)
    slow = {**base, "correction": {"prefill": 3.0, "decode": 1.0}}
    (f,) = Simulation(Split(mixed=1), slow, slow).run([SimRequest(100, [], 1)])
    assert plain.first_token == pytest.approx(0.1) and f.first_token == pytest.approx(0.3)


def test_admin_workers_profiles_skip_the_routers_defaults(tmp_path):
    """In GET /admin/workers an encode worker shows the router's default step model (it measured
    none): epd-plan must price steps by the worker that measured them, and encodes likewise."""
    from perf.epd_plan import load_profiles
    from router.cost_model import WorkerCost

    enc = WorkerCost({"encode": {"base": 0.4}, "encode_samples": 6}).to_dict()
    pre = WorkerCost({"step": {"base": 0.13, "new_tokens": 0.004}, "step_samples": 19}).to_dict()
    pre["correction"]["prefill"] = 2.0
    doc = {"workers": [{"worker_id": "encode-0", "cost_model": enc}, {"worker_id": "prefill-0", "cost_model": pre}]}
    (tmp_path / "w.json").write_text(json.dumps(doc))
    step, encode = load_profiles([str(tmp_path / "w.json")])
    assert step["step"]["base"] == 0.13 and encode["encode"]["base"] == 0.4 and not step["correction"]
    step, _ = load_profiles([str(tmp_path / "w.json")], corrected=True)
    assert step["correction"]["prefill"] == 2.0
