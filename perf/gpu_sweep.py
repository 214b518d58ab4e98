"""Deployments side by side on the GPU(s) of one host: a rate sweep each, with peak GPU memory per stage.

    python -m perf.gpu_sweep --configs gpu-aggregated,gpu-1p1d,gpu-1e1p1d --out-dir $OUT \\
        --images-per-request 1-8 --image-sizes 448x448,896x896,1344x1344 --image-format jpeg \\
        --input-len 64-128 --output-len 64 --num-prompts 16 --request-rate 0.5,1,2 \\
        --slo-ttft-ms 2000 --slo-tpot-ms 50

It builds the model directory (default: Qwen2.5-VL-7B-shaped, config only, served with
``load_format: dummy``), then for each config of ``configs/`` starts the deployment
(``router.serve.Deployment``, as ``epd-serve --config`` does), warms it with requests of their own
(the measured ones must not hit its prefix and image caches), sweeps the rates with ``epd-bench``'s
load and samples ``nvidia-smi`` (per process, mapped to the worker ids) and each worker's host RSS.
Written to ``--out-dir``: ``<config>.json`` (``epd-bench``'s results plus ``memory``, ``placement``
and ``config``; rewritten after every rate), and ``slo_attainment.png``, ``ttft_cdf.png``,
``tpot_cdf.png``, ``gpu_memory.png``. ``--deadline-s`` skips a config (or a rate) whose whole sweep
would end past it.
``--set KEY=VALUE`` overrides an engine option for every worker (``--set device=cpu`` also drops the
configs' placements): the CPU rehearsal of a GPU sweep.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import yaml

from perf.epd_bench import datasets, plot
from perf.epd_bench.cli import add_load_args, build_requests, format_run, parse_rates, run_one_rate
from perf.epd_bench.load import run_load
from perf.epd_bench.metrics import goodput
from router.serve import ENGINE_FLAGS, Deployment, free_port, load_config, worker_plan

ROOT = Path(__file__).resolve().parents[1]
SERVED_NAME = "bench-model"


class MemorySampler:
    """Peak GPU memory (``nvidia-smi --query-compute-apps``) and host RSS of named processes."""

    def __init__(self, pids: dict[str, int], interval: float = 0.5):
        self.pids, self.interval = pids, interval
        self.smi = shutil.which("nvidia-smi")
        self.gpu_peak = {name: 0 for name in pids}  # MiB
        self.gpu_first: dict[str, int] = {}  # MiB at the first sample: weights + KV pool, before load
        self.rss_peak = {name: 0 for name in pids}
        self.device_peak: dict[str, int] = {}  # per GPU index, every process on it
        self.unmatched: dict[int, int] = {}  # GPU processes that are none of ours
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def _smi(self, *query: str) -> list[list[str]]:
        out = subprocess.run([self.smi, *query, "--format=csv,noheader,nounits"], capture_output=True,
                             text=True, timeout=10).stdout
        return [[c.strip() for c in line.split(",")] for line in out.splitlines() if line.strip()]

    def sample(self) -> None:
        self.samples += 1
        by_pid = {pid: name for name, pid in self.pids.items()}
        for name, pid in self.pids.items():
            self.rss_peak[name] = max(self.rss_peak[name], _rss_mib(pid))
        if not self.smi:
            return
        try:
            apps = self._smi("--query-compute-apps=pid,used_memory")
            gpus = self._smi("--query-gpu=index,memory.used")
        except (OSError, subprocess.SubprocessError):
            return
        for pid_s, used_s in apps:
            if not (pid_s.isdigit() and used_s.isdigit()):
                continue
            pid, used = int(pid_s), int(used_s)
            name = by_pid.get(pid)
            if name is None:
                self.unmatched[pid] = max(self.unmatched.get(pid, 0), used)
                continue
            self.gpu_first.setdefault(name, used)
            self.gpu_peak[name] = max(self.gpu_peak[name], used)
        for idx, used_s in gpus:
            if used_s.isdigit():
                self.device_peak[idx] = max(self.device_peak.get(idx, 0), int(used_s))

    def report(self) -> dict:
        return {"gpu_peak_mib": self.gpu_peak, "gpu_at_start_mib": self.gpu_first, "rss_peak_mib": self.rss_peak,
                "device_peak_mib": self.device_peak, "unmatched_gpu_pids_mib": self.unmatched,
                "samples": self.samples, "interval_s": self.interval, "nvidia_smi": bool(self.smi)}


def _rss_mib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0


def deployment_config(name: str, overrides: dict[str, str]) -> dict:
    """``configs/<name>.yaml`` (or a path) with ``overrides`` winning over every worker entry."""
    path = Path(name) if name.endswith(".yaml") else ROOT / "configs" / f"{name}.yaml"
    cfg = load_config(path)
    cfg["served_model_name"] = SERVED_NAME
    if overrides:
        cfg["engine"] = {**(cfg.get("engine") or {}), **{k: yaml.safe_load(v) for k, v in overrides.items()}}
        for w in cfg["workers"]:
            for key in overrides:
                w.pop(key, None)
            if "device" in overrides:
                w.pop("devices", None)
    return cfg


def warm_up(url: str, args, n: int) -> None:
    """``n`` requests of their own (another seed) at once: CUDA kernels, allocator, first images."""
    if n <= 0:
        return
    reqs = build_requests(argparse.Namespace(**{**vars(args), "num_prompts": n}), seed=args.seed + 10_000)
    res = asyncio.run(run_load(url, SERVED_NAME, reqs, float("inf"), ignore_eos=args.ignore_eos))
    bad = [r.error for r in res.results if not r.ok]
    print(f"  warm-up: {n} requests in {res.wall_s:.1f} s" + (f", failed: {bad[:2]}" if bad else ""), flush=True)


def sweep_one(name: str, args, model: Path, log_root: Path, deadline: float) -> dict:
    cfg = deployment_config(name, dict(kv.split("=", 1) for kv in args.set))
    dep = Deployment(cfg, model, port=free_port(), log_dir=log_root / name)
    res = {"system": name, "model": SERVED_NAME, "model_dir": str(model), "config": cfg,
           "placement": {wid: dev for wid, _, dev in worker_plan(cfg)}, "args": vars(args), "runs": [],
           "skipped_rates": [], "host": platform.node(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    out = Path(args.out_dir) / f"{name}.json"
    t0 = time.monotonic()
    try:
        dep.start(args.start_timeout)
        res["start_s"] = round(time.monotonic() - t0, 1)
        print(f"  up in {res['start_s']} s at {dep.url}", flush=True)
        pids = {n: p.pid for n, p in dep.procs.items()}
        with MemorySampler(pids, args.mem_interval) as mem:
            warm_up(dep.url, args, args.warmup_requests)
            for i, rate in enumerate(parse_rates(args.request_rate)):
                need = _rate_time(args, rate)
                if time.monotonic() + need > deadline:
                    print(f"  rate {rate:g}: skipped (~{need:.0f} s would pass the deadline)", flush=True)
                    res["skipped_rates"].append(rate)
                    continue
                run = run_one_rate(args, dep.url, SERVED_NAME, build_requests(args, args.seed + i), rate)
                print(format_run(run), flush=True)
                res["runs"].append(run)
                res["memory"] = mem.report()
                _finish(res, out)
                dead = {n: p.returncode for n, p in dep.procs.items() if p.poll() is not None}
                if dead:  # later rates would only count refusals
                    raise RuntimeError(f"process(es) exited during rate {rate:g}: {dead}")
        res["memory"] = mem.report()
        res["predictions"] = _predictions(dep.url)
    except Exception as e:  # noqa: BLE001 - one failed deployment must not cost the others
        res["error"] = f"{type(e).__name__}: {e}"
        print(f"  FAILED: {res['error']}", flush=True)
        for wid in dep.procs:
            if wid != "router":
                print(f"  --- {wid} log tail ---{dep._tail(wid, 2500)}", flush=True)
    finally:
        dep.stop()
    _finish(res, out)
    return res


def _predictions(url: str) -> dict:
    """The router's own score of its cost models over the whole sweep (all rates, warm-up
    included): TTFT and TPOT predicted vs actual, from its /metrics histograms."""
    import urllib.request

    from perf.bench_policies import histogram, quantile, ratio_stats

    try:
        text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    except OSError as e:
        return {"error": repr(e)}
    error = histogram(text, "epd:ttft_prediction_error")
    return {"ttft_error_median": quantile(error), "ttft_error_p90": quantile(error, 0.9),
            "ttft_within_15pct": round(error.get(0.15, 0.0) / max(error.get(float("inf"), 0.0), 1), 3),
            "ttft_ratio": ratio_stats(histogram(text, "epd:ttft_prediction_ratio")),
            "tpot_ratio": ratio_stats(histogram(text, "epd:tpot_prediction_ratio"))}


def _rate_time(args, rate: float) -> float:
    """Rough seconds one rate takes: its arrivals plus ``--drain-s``."""
    return (args.num_prompts / rate if rate != float("inf") else 0.0) + args.drain_s


def _finish(res: dict, out: Path) -> None:
    sweep = [(float(r["rate"]), r["summary"].get("slo_attainment")) for r in res["runs"]]
    good = goodput(sweep) if sweep else None
    res["goodput_rate"] = str(good) if good == float("inf") else good
    out.write_text(json.dumps(res, indent=1))


def plot_memory(results: list[dict], path: Path) -> None:
    plt = plot.plt
    rows = [(r["system"], wid, mib) for r in results
            for wid, mib in (r.get("memory") or {}).get("gpu_peak_mib", {}).items() if wid != "router"]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"{s}\n{w}" for s, w, _ in rows]
    ax.bar(range(len(rows)), [m / 1024 for _, _, m in rows])
    ax.set_xticks(range(len(rows)), labels, fontsize="small", rotation=30, ha="right")
    ax.set(ylabel="peak GPU memory (GiB, nvidia-smi)", title="Peak GPU memory per stage worker")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="gpu-aggregated,gpu-1p1d,gpu-1e1p1d", help="names under configs/ or paths")
    ap.add_argument("--model", help="model directory (default: build --family/--size into the cache)")
    ap.add_argument("--family", default="qwen2_5_vl")
    ap.add_argument("--size", default="7b")
    ap.add_argument("--out-dir", default=str(ROOT / "perf" / "out" / "gpu_sweep"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help=f"engine option for every worker, one of: {', '.join(ENGINE_FLAGS)}")
    ap.add_argument("--start-timeout", type=float, default=600.0)
    ap.add_argument("--warmup-requests", type=int, default=3)
    ap.add_argument("--mem-interval", type=float, default=0.5, help="seconds between memory samples")
    ap.add_argument("--deadline-s", type=float, default=None, help="skip rates/configs that would end later")
    ap.add_argument("--drain-s", type=float, default=30.0, help="time allowed past the last arrival of a rate")
    ap.add_argument("--start-estimate-s", type=float, default=60.0,
                    help="start-up and warm-up time assumed when deciding whether a config fits")
    add_load_args(ap)
    args = ap.parse_args(argv)
    bad = [kv for kv in args.set if kv.split("=", 1)[0] not in ENGINE_FLAGS or "=" not in kv]
    if bad:
        ap.error(f"--set takes KEY=VALUE with KEY one of {', '.join(ENGINE_FLAGS)}: {bad}")
    deadline = time.monotonic() + (args.deadline_s or float("inf"))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else build_model(args.family, args.size)
    args.tokenizer = args.tokenizer or str(model)
    datasets.load_tokenizer(args.tokenizer)  # fail here, not inside the first sweep
    logs = Path(tempfile.mkdtemp(prefix="epd-gpu-sweep-"))
    print(f"model {model}; server logs {logs}", flush=True)
    results = []
    whole = args.start_estimate_s + sum(_rate_time(args, r) for r in parse_rates(args.request_rate))
    for name in args.configs.split(","):
        if time.monotonic() + whole > deadline:
            print(f"### {name}: skipped (its sweep needs ~{whole:.0f} s, past the deadline)", flush=True)
            continue
        print(f"### {name}", flush=True)
        results.append(sweep_one(name, args, model, logs, deadline))
        r = results[-1]
        print(f"{name}: goodput {r['goodput_rate']} req/s; peak GPU MiB "
              f"{(r.get('memory') or {}).get('gpu_peak_mib')}", flush=True)
    done = [r for r in results if r["runs"]]
    if done:
        for r in done:
            r["label"] = r["system"]
        plot.plot_slo(done, out_dir / "slo_attainment.png")
        plot.plot_cdf(done, "ttft_ms", "TTFT", out_dir / "ttft_cdf.png")
        plot.plot_cdf(done, "tpot_ms", "TPOT", out_dir / "tpot_cdf.png")
        plot_memory(done, out_dir / "gpu_memory.png")
    return 0 if results and all("error" not in r for r in results) else 1


def build_model(family: str, size: str) -> Path:
    from stages.models.make_model import CONFIG_ONLY_SIZES, make_model

    out = Path(tempfile.gettempdir()) / f"epd-{family}-{size}"
    return make_model(family, size, out, dtype="bfloat16", reuse=True, config_only=size in CONFIG_ONLY_SIZES)


if __name__ == "__main__":
    raise SystemExit(main())
