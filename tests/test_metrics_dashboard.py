"""/metrics of a running 1e1p1d deployment: counters are counters, encode workers have no KV pool,
and every query of the Grafana dashboard (docs/grafana-dashboard.json) names a served metric."""

from __future__ import annotations

import json
import re
import time
import urllib.request

import openai
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from router.serve import ROOT
from router.worker_metrics import ReportedCounters
from tests.e2e_util import chat_body, start

DASHBOARD = ROOT / "docs" / "grafana-dashboard.json"
# What the dashboard must show (issue: TTFT/TPOT/throughput, per-stage queues, KV use, transfer, cache hits).
REQUIRED = ["epd:time_to_first_token_seconds", "epd:inter_token_latency_seconds", "epd:generation_tokens_total",
            "epd:worker_requests_waiting", "epd:kv_cache_usage_perc", "epd:transfer_pulls_total",
            "epd:prefix_cache_hit_tokens_total", "epd:cluster_cache_total"]


def test_reported_counters_stay_monotonic_across_restarts():
    reg = CollectorRegistry()
    c = ReportedCounters("epd:things_total", "Things.", ["worker"])
    reg.register(c)
    c.labels(worker="w").set(5)
    c.labels(worker="w").set(7)
    c.restarted("w")  # a new incarnation counts from 0 again
    c.labels(worker="w").set(2)
    text = generate_latest(reg).decode()
    assert "# TYPE epd:things_total counter" in text and 'epd:things_total{worker="w"} 9.0' in text
    c.labels(worker="w").set(1)  # a reporter that started again unannounced
    assert c.labels(worker="w").value == 10


def dashboard_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert panels and all(p.get("targets") for p in panels)
    return [t["expr"] for p in panels for t in p["targets"]]


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bepd:[A-Za-z0-9_:]+", expr))


def test_dashboard_shows_what_an_operator_needs():
    names = set().union(*map(metric_names, dashboard_queries()))
    assert all(any(n.startswith(r) for n in names) for r in REQUIRED), set(REQUIRED) - names


@pytest.mark.e2e
def test_metrics_served_by_a_deployment(llava_dir, test_images, tmp_path):
    dep = start("1e1p1d", llava_dir, tmp_path)
    try:
        client = openai.OpenAI(base_url=dep.url + "/v1", api_key="none", max_retries=0)
        for _ in range(2):  # the second time: the image and the prompt come from the caches
            client.chat.completions.create(**chat_body(dep.name, "What is in this picture? " * 6, test_images[:1]))
        client.completions.create(model=dep.name, prompt="Once upon a time", max_tokens=4, stream=True)
        with pytest.raises(openai.BadRequestError):  # errors have their series too
            client.completions.create(model=dep.name, prompt="x", max_tokens=0)
        time.sleep(2.5)  # heartbeats (1 s) carry the workers' counts
        with urllib.request.urlopen(dep.url + "/metrics") as r:
            text = r.read().decode()
    finally:
        dep.stop()
    families = list(text_string_to_metric_families(text))
    gauges_named_total = [f.name for f in families if f.type != "counter"
                          and any(s.name.endswith("_total") for s in f.samples)]
    assert not gauges_named_total, gauges_named_total
    served = {s.name for f in families for s in f.samples}
    for name in ("epd:images_encoded_total", "epd:transfer_pulls_total", "epd:prefix_cache_hit_tokens_total",
                 "epd:request_success_total", "epd:cluster_cache_total"):
        assert name in served and next(f for f in families if name in {s.name for s in f.samples}).type == "counter"
    kv = [s for f in families if f.name.startswith("epd:kv_cache") for s in f.samples]
    assert {s.labels["role"] for s in kv} == {"prefill", "decode"}, "an encode worker reports no KV pool"
    assert all(0 <= s.value <= 1 for s in kv if s.name == "epd:kv_cache_usage_perc")
    missing = {(n, e) for e in dashboard_queries() for n in metric_names(e) if n not in served}
    assert not missing, missing
