"""``epd-plan`` against real deployments: predicted vs measured SLO attainment and goodput.

    python -m perf.validate_epd_plan measure --splits aggregated,1p1d,1e1p1d --model llava-small \
        --rates 0.5,1,2 --num-prompts 20 --out perf/results/epd_plan
    python -m perf.validate_epd_plan table --dir perf/results/epd_plan --slo-ttft-ms 1500 --slo-tpot-ms 150

``measure`` starts each split (a shipped config, ``router.serve.Deployment``) and saves what
its workers profiled at start-up (``GET /admin/workers``: the cost models ``epd-plan`` reads)
and every request's TTFT and TPOT at each rate, sent by epd-bench's load generator
(``perf.epd_bench.load.run_load``: random-mm chats, gamma arrivals). ``table`` then runs
``epd-plan``'s simulation on those profiles and the same trace for any SLO, so one measurement
serves every SLO. Each rate gets its own images (seed + rate index), as epd-bench does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import urllib.request
from pathlib import Path

from perf.epd_bench import datasets
from perf.epd_bench.load import run_load
from perf.epd_bench.metrics import goodput
from perf.epd_plan import GOOD, SplitRunner, Sizer, load_profiles
from router.plan import Slo
from router.plan_sim import SimRequest, Split
from router.serve import ROOT, Deployment, free_port, load_config

SPLIT_OF = {"aggregated": "1m", "1p1d": "1p1d", "1e1p1d": "1e1p1d", "2e1p1d": "2e1p1d"}


def trace_args(args) -> argparse.Namespace:
    """The trace as epd-plan's flags (one definition for measuring and predicting)."""
    return argparse.Namespace(dataset="random-mm", jsonl=None, input_len=args.input_len, output_len=args.output_len,
                              images_per_request=args.images, image_sizes=args.image_sizes,
                              num_prompts=args.num_prompts, seed=args.seed, burstiness=args.burstiness)


def measure(args) -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stop the deployment on a kill, too
    model = str(Path(args.model).expanduser())
    tok = datasets.load_tokenizer(model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.splits.split(","):
        path = ROOT / "configs" / f"{name}.yaml"
        cfg = load_config(path if path.exists() else ROOT / "configs" / "1p1d.yaml")
        if not path.exists():  # a split with no shipped config, e.g. 2p1d: its workers by the name
            split = Split.parse(name)
            cfg["workers"] = [{"role": r, "count": getattr(split, r)}
                              for r in ("encode", "prefill", "decode", "mixed") if getattr(split, r)]
        cfg["served_model_name"] = "plan"
        dep = Deployment(cfg, model, port=free_port(), log_dir=out / f"logs-{name}")
        result = {"config": name, "split": SPLIT_OF.get(name, name), "cores": os.cpu_count(), "rates": {}}
        try:
            dep.start(300)
            with urllib.request.urlopen(f"{dep.url}/admin/workers", timeout=10) as r:
                result["admin_workers"] = json.loads(r.read())
            for i, rate in enumerate(float(x) for x in args.rates.split(",")):
                reqs = datasets.random_requests(tok, args.num_prompts, datasets.parse_range(args.input_len),
                                                datasets.parse_range(args.output_len), args.seed + i,
                                                datasets.parse_range(args.images),
                                                datasets.parse_sizes(args.image_sizes))
                load = asyncio.run(run_load(dep.url, "plan", reqs, rate, args.burstiness, None, 0, args.seed))
                result["rates"][str(rate)] = [{"ok": r.ok, "ttft": r.ttft, "tpot": r.tpot, "out": r.output_tokens,
                                               "prompt": r.prompt_tokens, "images": r.n_images} for r in load.results]
                ok = [r for r in load.results if r.ok]
                print(name, rate, f"{len(ok)}/{len(reqs)} ok, wall {load.wall_s:.1f} s", flush=True)
            with urllib.request.urlopen(f"{dep.url}/admin/workers", timeout=10) as r:
                result["admin_workers_after"] = json.loads(r.read())  # with the router's corrections
        finally:
            dep.stop()
        (out / f"{name}.json").write_text(json.dumps(result))
        (out / f"{name}.workers.json").write_text(json.dumps(result["admin_workers"], indent=1))  # for epd-plan


def profiles(admin_workers: dict, corrected: bool) -> tuple[dict, dict]:
    """(step spec, encode spec) from a GET /admin/workers answer, as epd-plan reads it."""
    tmp = Path(f"/tmp/epd-plan-workers-{os.getpid()}.json")
    tmp.write_text(json.dumps(admin_workers))
    try:
        return load_profiles([str(tmp)], corrected)
    finally:
        tmp.unlink()


def measured_attainment(records: list[dict], slo: Slo) -> float:
    good = sum(r["ok"] and r["ttft"] <= slo.ttft_s and (r["out"] <= 1 or r["tpot"] <= slo.tpot_s) for r in records)
    return good / len(records)


def table(args) -> None:
    slo = Slo(args.slo_ttft_ms / 1e3, args.slo_tpot_ms / 1e3)
    results = [json.loads(p.read_text()) for p in sorted(Path(args.dir).glob("*.json"))
               if not p.name.endswith(".workers.json")]
    results = [r for r in results if "admin_workers" in r]
    image_tokens = Sizer(args.model, 576).image(224, 224)
    rows = []
    for kind, key, corrected in (("profile", "admin_workers", False), ("corrected", "admin_workers_after", True)):
        costs = {r["config"]: profiles(r[key], corrected) for r in results if key in r}
        # 1p1d's prefill worker profiles no encode (it builds its vision tower on first need): its
        # encodes are priced by another split's encode worker (the same thread count on this host).
        spare = next((enc for _, enc in costs.values() if enc), {})
        for res in results:
            if res["config"] not in costs:
                continue
            step, encode = costs[res["config"]]
            plan_args = argparse.Namespace(**vars(trace_args(args)), slo_ttft_ms=args.slo_ttft_ms,
                                           slo_tpot_ms=args.slo_tpot_ms, policy="slo_aware",
                                           handoff_ms=args.handoff_ms, hop_ms=args.hop_ms, host_cores=res["cores"],
                                           threads=None, max_rate=1000.0)
            split = Split.parse(res["split"])
            rates = sorted(float(r) for r in res["rates"])
            meas, pred, every = {}, {}, []
            for r in rates:
                recs = res["rates"][str(r)]
                # The requests as sent: the server's prompt count (images expanded), images, outputs.
                trace = [SimRequest(x["prompt"] or 1, [image_tokens] * x["images"], max(x["out"], 1)) for x in recs]
                every += trace
                meas[r] = measured_attainment(recs, slo)
                pred[r] = SplitRunner(plan_args, trace, step, encode or spare).attainment(split, r)
            # The continuous goodput on all the rates' requests: 12 alone make it jump with their arrivals.
            planner = SplitRunner(plan_args, every, step, encode or spare)
            rows.append({"config": res["config"], "costs": kind, "measured": meas, "predicted": pred,
                         "goodput_measured": goodput(list(meas.items()), GOOD),
                         "goodput_predicted_at_rates": goodput(list(pred.items()), GOOD),
                         "goodput_predicted": round(planner.goodput(split), 3),
                         "attainment_error": sum(abs(pred[r] - meas[r]) for r in rates) / len(rates)})
    print(f"SLO TTFT {args.slo_ttft_ms:g} ms, TPOT {args.slo_tpot_ms:g} ms; attainment measured / predicted")
    for row in rows:
        cells = "  ".join(f"@{r:g}: {row['measured'][r]:.0%} / {row['predicted'][r]:.0%}" for r in row["measured"])
        print(f"{row['config']:>10} {row['costs']:>9}  {cells}  goodput measured {row['goodput_measured']} / predicted "
              f"{row['goodput_predicted_at_rates']} (continuous {row['goodput_predicted']}); "
              f"mean |attainment error| {row['attainment_error']:.0%}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("measure", "table"))
    ap.add_argument("--splits", default="aggregated,1p1d,1e1p1d", help="shipped configs (configs/<name>.yaml)")
    ap.add_argument("--model", default=str(Path.home() / ".cache/epd/models/llava-small"))
    ap.add_argument("--rates", default="0.5,1,2")
    ap.add_argument("--num-prompts", type=int, default=20)
    ap.add_argument("--input-len", default="32-128")
    ap.add_argument("--output-len", default="16")
    ap.add_argument("--images", default="0-2")
    ap.add_argument("--image-sizes", default="224x224")
    ap.add_argument("--burstiness", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="perf/results/epd_plan")
    ap.add_argument("--dir", default="perf/results/epd_plan")
    ap.add_argument("--slo-ttft-ms", type=float, default=1500)
    ap.add_argument("--slo-tpot-ms", type=float, default=150)
    ap.add_argument("--handoff-ms", type=float, default=5.0)
    ap.add_argument("--hop-ms", type=float, default=0.0)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    measure(args) if args.what == "measure" else table(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
