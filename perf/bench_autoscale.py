"""A shifting trace against a static split and the same split with the autoscaler on.

    python -m perf.bench_autoscale --model ~/.cache/epd/models/llava-small --config 2e1p1d \
        --arms static,autoscale --round 0 --out perf/results/autoscale/round0.json
    python -m perf.bench_autoscale --merge perf/results/autoscale/round*.json \
        --plot perf/results/autoscale/roles.png

The trace has three phases, sent open-loop at fixed rates: image-heavy (4-8 images, short
answers), text-heavy (long answers), image-heavy again. Each arm gets a fresh deployment of the
same config (``--arms`` in the order given: alternate it between rounds so a shared host's load
falls on both) and the same requests; the autoscale arm adds ``router.autoscale``. While the
trace runs, ``/admin/workers`` is polled for each worker's role. Per arm and phase: SLO
attainment (TTFT and TPOT targets, as ``epd-bench``) and goodput (requests in SLO per second of
the run). ``--merge`` prints the medians over rounds and plots roles over time beside the load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import urllib.request
from pathlib import Path

from perf.epd_bench import datasets
from perf.epd_bench.client import chat_body, make_session, send
from perf.epd_bench.metrics import meets_slo
from router.serve import ROOT, Deployment, default_model, free_port, load_config

NAME = "bench"
SIZES = [(112, 112), (224, 160), (160, 224)]


def phases(tokenizer, args, seed: int) -> list[tuple[str, float, list]]:
    """(kind, rate, requests) in order: image-heavy, text-heavy, image-heavy."""
    img = lambda n, s: datasets.random_requests(tokenizer, n, (16, 32), (4, 8), s, (4, 8), SIZES)  # noqa: E731
    text = datasets.random_requests(tokenizer, args.n_text, (64, 256), (96, 160), seed + 1)
    return [("image", args.rate_image, img(args.n_image, seed)), ("text", args.rate_text, text),
            ("image", args.rate_image, img(args.n_image, seed + 2))]


async def drive(url: str, trace, slo: tuple[float, float], poll_s: float = 0.5) -> dict:
    """Send the phases in turn (each at its rate), polling the workers' roles meanwhile."""
    roles, rows, t0 = [], [], time.perf_counter()
    async with make_session() as session:
        stop = asyncio.Event()

        async def poll():
            while not stop.is_set():
                try:
                    async with session.get(url + "/admin/workers") as r:
                        ws = (await r.json())["workers"]
                    roles.append((time.perf_counter() - t0, {w["worker_id"]: [w["role"], w.get("role_state")]
                                                             for w in ws}))
                except Exception as e:  # noqa: BLE001 - a missed poll is a gap in the plot
                    print("poll:", e)
                await asyncio.sleep(poll_s)

        async def one(kind, phase, req, at):
            await asyncio.sleep(max(at - (time.perf_counter() - t0), 0))
            res = await send(session, url + "/v1/chat/completions", chat_body(req, NAME, True), req.n_images)
            rows.append({"kind": kind, "phase": phase, "send": res.send - t0, "end": res.end - t0, "ok": res.ok,
                         "error": res.error[:200], "ttft": res.ttft, "tpot": res.tpot,
                         "out": res.output_tokens, "good": meets_slo(res, *slo)})

        poller = asyncio.create_task(poll())
        jobs, at = [], 0.0
        for phase, (kind, rate, reqs) in enumerate(trace):
            for req in reqs:
                jobs.append(one(kind, phase, req, at))
                at += 1.0 / rate
        await asyncio.gather(*jobs)
        stop.set()
        await poller
    return {"requests": sorted(rows, key=lambda r: r["send"]), "roles": roles,
            "duration": max(r["end"] for r in rows)}


def summary(run: dict) -> dict:
    rows, out = run["requests"], {}
    for name, sel in [("all", rows)] + [(f"phase{p}", [r for r in rows if r["phase"] == p]) for p in range(3)]:
        if not sel:
            continue
        span = max(r["end"] for r in sel) - min(r["send"] for r in sel)
        good = sum(r["good"] for r in sel)
        out[name] = {"n": len(sel), "failed": sum(not r["ok"] for r in sel), "attainment": round(good / len(sel), 3),
                     "goodput_rps": round(good / span, 3), "span_s": round(span, 1),
                     "median_ttft_s": round(statistics.median(r["ttft"] for r in sel), 3),
                     "median_tpot_ms": round(1e3 * statistics.median(r["tpot"] for r in sel), 1)}
    return out


def bench_arm(arm: str, args, trace) -> dict:
    cfg = load_config(ROOT / "configs" / f"{args.config}.yaml")
    cfg["served_model_name"] = NAME
    router = cfg.setdefault("router", {})
    router.pop("admin_key", None)
    router["slo"] = {"ttft_ms": args.slo_ttft_ms, "tpot_ms": args.slo_tpot_ms}
    router["autoscale"] = json.loads(args.autoscale) if arm == "autoscale" else {"enabled": False}
    router["switch_drain_s"] = args.switch_drain_s
    if args.threads:
        cfg.setdefault("engine", {})["threads"] = args.threads
    log_dir = Path(args.log_dir) / f"{arm}-{args.round}"
    dep = Deployment(cfg, str(args.model), port=free_port(), log_dir=log_dir)
    try:
        dep.start(args.start_timeout)
        run = asyncio.run(drive(dep.url, trace, (args.slo_ttft_ms, args.slo_tpot_ms)))
        metrics = urllib.request.urlopen(f"{dep.url}/metrics", timeout=10).read().decode()
    finally:
        dep.stop()
    run["decisions"] = [line for line in metrics.splitlines() if line.startswith("epd:autoscale_decisions_total")]
    run["summary"] = summary(run)
    run.update(arm=arm, round=args.round)
    print(arm, f"round {args.round}", json.dumps(run["summary"]), run["decisions"], flush=True)
    return run


def merge(paths: list[str], plot: str | None) -> None:
    runs = [r for p in paths for r in json.loads(Path(p).read_text())["runs"]]
    by_arm: dict[str, list[dict]] = {}
    for r in runs:
        by_arm.setdefault(r["arm"], []).append(r)
    table = {}
    for arm, rs in by_arm.items():
        table[arm] = {k: {m: statistics.median(r["summary"][k][m] for r in rs)
                          for m in ("attainment", "goodput_rps", "median_ttft_s", "median_tpot_ms", "failed")}
                      for k in rs[0]["summary"]}
        table[arm]["rounds"] = len(rs)
    if "static" in table and "autoscale" in table:
        table["ratio_autoscale_over_static"] = {
            k: {m: round(table["autoscale"][k][m] / table["static"][k][m], 2) if table["static"][k][m] else None
                for m in ("attainment", "goodput_rps")} for k in by_arm["static"][0]["summary"]}
        table["per_round_goodput_ratio"] = [
            round(a["summary"]["all"]["goodput_rps"] / max(s["summary"]["all"]["goodput_rps"], 1e-9), 2)
            for s, a in zip(sorted(by_arm["static"], key=lambda r: r["round"]),
                            sorted(by_arm["autoscale"], key=lambda r: r["round"]))]
        table["median_round_goodput_ratio"] = statistics.median(table["per_round_goodput_ratio"])
    print(json.dumps(table, indent=1))
    if plot:
        from perf.autoscale_plot import plot_runs

        plot_runs(runs, plot)
        print("plot:", plot)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: the tiny LLaVA)")
    ap.add_argument("--config", default="2e1p1d")
    ap.add_argument("--arms", default="static,autoscale")
    ap.add_argument("--round", type=int, default=0, help="seeds the trace; alternate --arms between rounds")
    ap.add_argument("--n-image", type=int, default=16, help="requests per image-heavy phase")
    ap.add_argument("--n-text", type=int, default=16, help="requests of the text-heavy phase")
    ap.add_argument("--rate-image", type=float, default=0.5, help="requests/s in the image-heavy phases")
    ap.add_argument("--rate-text", type=float, default=1.0, help="requests/s in the text-heavy phase")
    ap.add_argument("--slo-ttft-ms", type=float, default=5000)
    ap.add_argument("--slo-tpot-ms", type=float, default=150)
    ap.add_argument("--autoscale", default='{"interval_s": 1, "cooldown_s": 8, "persist": 3, "margin": 0.3, '
                                           '"min_backlog_s": 1.0}')
    ap.add_argument("--switch-drain-s", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--start-timeout", type=float, default=300)
    ap.add_argument("--log-dir", default="perf/out/autoscale")
    ap.add_argument("--out", default=None, help="JSON of the runs (rewritten after each arm)")
    ap.add_argument("--merge", nargs="*", help="JSON files of earlier rounds: print medians, --plot")
    ap.add_argument("--plot", default=None)
    args = ap.parse_args(argv)
    if args.merge:
        merge(args.merge, args.plot)
        return 0
    args.model = args.model or default_model()
    tokenizer = datasets.load_tokenizer(str(args.model))
    trace = phases(tokenizer, args, 1000 * args.round)
    runs = []
    for arm in args.arms.split(","):
        runs.append(bench_arm(arm, args, trace))
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                  "runs": runs}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
