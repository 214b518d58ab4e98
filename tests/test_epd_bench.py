"""epd-bench: metrics on hand-made records, arrival statistics, dataset determinism, one real run."""

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from perf.epd_bench import datasets
from perf.epd_bench.client import RequestResult
from perf.epd_bench.load import arrival_times, run_load
from perf.epd_bench.metrics import goodput, summarize

ROOT = Path(__file__).resolve().parent.parent


def rec(send, ttft, e2e, tokens, itl=(), ok=True, error=""):
    return RequestResult(ok=ok, error=error, send=send, ttft=ttft, e2e=e2e, output_tokens=tokens,
                         prompt_tokens=10, itl=list(itl))


def test_summary_exact_figures():
    # TTFTs 10, 20, 30, 40 ms; 11 tokens, so TPOT = (e2e - ttft) / 10.
    rs = [rec(0.0, 0.010, 0.110, 11, [0.01] * 10), rec(0.5, 0.020, 0.220, 11, [0.02] * 10),
          rec(1.0, 0.030, 0.330, 11, [0.03] * 10), rec(1.5, 0.040, 0.440, 11, [0.04] * 10),
          rec(1.6, 0, 0.2, 0, ok=False, error="HTTP 500: boom")]
    s = summarize(rs, duration_s=2.0, slo_ttft_ms=25, slo_tpot_ms=100)
    assert s["completed"] == 4 and s["failed"] == 1 and s["errors"] == {"HTTP 500: boom": 1}
    assert s["request_throughput"] == pytest.approx(2.0)
    assert s["output_throughput"] == pytest.approx(44 / 2.0)
    assert s["mean_ttft_ms"] == pytest.approx(25.0)
    assert s["median_ttft_ms"] == pytest.approx(25.0)
    assert s["p90_ttft_ms"] == pytest.approx(37.0)   # linear: 30 + 0.7 * 10
    assert s["p99_ttft_ms"] == pytest.approx(39.7)
    assert s["mean_tpot_ms"] == pytest.approx(25.0)  # 10, 20, 30, 40
    assert s["p90_tpot_ms"] == pytest.approx(37.0)
    assert s["mean_itl_ms"] == pytest.approx(25.0)
    assert s["median_e2el_ms"] == pytest.approx(275.0)
    # Two of five requests meet TTFT <= 25 ms (the failure never does).
    assert s["slo_attainment"] == pytest.approx(0.4)


def test_tpot_is_vllms_definition():
    r = rec(0.0, 0.1, 1.1, 5)
    assert r.tpot == pytest.approx(0.25)
    assert rec(0.0, 0.1, 0.1, 1).tpot == 0.0


def test_goodput_highest_rate_over_threshold():
    sweep = [(1.0, 1.0), (2.0, 0.95), (4.0, 0.90), (8.0, 0.6), (float("inf"), 0.1)]
    assert goodput(sweep) == 4.0
    assert goodput([(1.0, 0.5)]) is None
    assert goodput([(2.0, 0.85), (1.0, 0.99)], threshold=0.8) == 2.0


@pytest.mark.parametrize("burstiness", [1.0, 0.5, 4.0])
def test_arrivals_mean_gap_and_burstiness(burstiness):
    t = np.array(arrival_times(20000, rate=5.0, burstiness=burstiness, seed=3))
    gaps = np.diff(np.concatenate([[0.0], t]))
    assert gaps.mean() == pytest.approx(0.2, rel=0.01)
    # Gamma(k, theta): coefficient of variation 1/sqrt(k).
    assert gaps.std() / gaps.mean() == pytest.approx(1 / np.sqrt(burstiness), rel=0.05)
    assert arrival_times(5, 5.0, burstiness, seed=3) == arrival_times(5, 5.0, burstiness, seed=3)
    assert arrival_times(5, 5.0, burstiness, seed=3) != arrival_times(5, 5.0, burstiness, seed=4)
    assert arrival_times(4, float("inf")) == [0.0] * 4


def test_datasets_deterministic(llava_dir, tmp_path):
    tok = datasets.load_tokenizer(llava_dir)
    kw = dict(input_len=(16, 32), output_len=(8, 8), images=(1, 3), sizes=[(32, 32), (48, 40)])
    a = datasets.random_requests(tok, 6, seed=1, **kw)
    b = datasets.random_requests(tok, 6, seed=1, **kw)
    c = datasets.random_requests(tok, 6, seed=2, **kw)
    assert [r.body for r in a] == [r.body for r in b]
    assert [r.body for r in a] != [r.body for r in c]
    for r in a:
        parts = r.body["messages"][0]["content"]
        assert parts[0]["type"] == "text" and 1 <= r.n_images <= 3 and len(parts) == 1 + r.n_images
        assert all(p["image_url"]["url"].startswith("data:image/png;base64,") for p in parts[1:])
        assert r.body["max_tokens"] == 8 and len(tok.encode(parts[0]["text"], add_special_tokens=False)) <= 32
    text = datasets.random_requests(tok, 2, (8, 8), (4, 4), seed=0)
    assert isinstance(text[0].body["messages"][0]["content"], str) and text[0].n_images == 0

    path = tmp_path / "reqs.jsonl"
    path.write_text("\n".join(json.dumps({"model": "x", "messages": [{"role": "user", "content": f"q{i}"}],
                                          "max_tokens": 3}) for i in range(2)))
    js = datasets.jsonl_requests(path, 3, output_len=(5, 5))
    assert [r.body["messages"][0]["content"] for r in js] == ["q0", "q1", "q0"]
    assert all(r.body["max_tokens"] == 5 and "model" not in r.body for r in js)


def test_real_run_against_aggregated(llava_dir, tmp_path):
    from router.serve import Deployment, load_config

    dep = Deployment(load_config(ROOT / "configs" / "aggregated.yaml"), llava_dir, log_dir=tmp_path / "logs")
    tok = datasets.load_tokenizer(llava_dir)
    reqs = datasets.random_requests(tok, 6, (16, 16), (8, 8), seed=0, images=(0, 1), sizes=[(64, 64)])
    try:
        dep.start(180)
        load = asyncio.run(run_load(dep.url, dep.name, reqs, rate=20.0, max_concurrency=4, warmup=1))
    finally:
        dep.stop()
    assert len(load.results) == 6
    for r in load.results:
        assert r.ok, r.error
        assert 0 < r.ttft <= r.e2e
        assert r.output_tokens == 8  # ignore_eos + max_tokens fix the length
        assert len(r.itl) <= 7
    s = summarize(load.results, load.wall_s)
    assert s["completed"] == 6 and s["total_output_tokens"] == 48 and load.cpu_s > 0
