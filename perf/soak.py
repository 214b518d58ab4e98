"""Soak: a deployment under steady load for a long time; does any process grow?

    python perf/soak.py --config aggregated --minutes 30 [--rate auto|8] [--images 20] [--out DIR]

Starts the deployment (``router.serve.Deployment``), measures its capacity (closed loop, a few
concurrent clients) unless ``--rate`` is a number, then sends requests at ``--load`` (default
70%) of it as a Poisson stream for ``--minutes``: a chat with one image each, drawn from
``--images`` distinct random images (0: a new one per request). Every ``--every`` seconds it
samples every process's RSS, the KV blocks in use and the router's cluster-index entries. Writes
``soak.csv``, ``soak.png`` (RSS per process, KV blocks and index entries over time) and prints per process: RSS after warm-up and at the end, the
slope after warm-up (MB/min, least squares) and the errors.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import csv
import io
import json
import random
import re
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp
import numpy as np

from router.serve import ROOT, Deployment, config_path, default_model, load_config
from tests.e2e_util import kv_blocks_used


def _png(rng: np.random.Generator) -> str:
    from PIL import Image

    h, w = rng.integers(32, 96, 2)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return float("nan")


class Load:
    def __init__(self, url: str, model: str, images: int, max_tokens: int, seed: int = 0):
        self.url, self.model, self.max_tokens = url, model, max_tokens
        self.rng = np.random.default_rng(seed)
        self.pool = [_png(self.rng) for _ in range(images)]
        self.ok = self.errors = 0
        self.last_error = ""

    def body(self, i: int) -> dict:
        image = self.pool[i % len(self.pool)] if self.pool else _png(self.rng)
        content = [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": f"soak {i}"}]
        return {"model": self.model, "messages": [{"role": "user", "content": content}],
                "max_tokens": self.max_tokens, "temperature": 0, "ignore_eos": True}

    async def one(self, session: aiohttp.ClientSession, i: int) -> None:
        try:
            async with session.post(f"{self.url}/v1/chat/completions", json=self.body(i)) as r:
                await r.read()
                if r.status == 200:
                    self.ok += 1
                    return
                self.last_error = f"{r.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            self.last_error = type(e).__name__
        self.errors += 1

    async def capacity(self, seconds: float = 30, clients: int = 8) -> float:
        """Requests per second with ``clients`` back-to-back clients."""
        stop, n = time.monotonic() + seconds, [0]

        async def client(session, k):
            i = k * 1_000_000
            while time.monotonic() < stop:
                await self.one(session, i)
                i, n[0] = i + 1, n[0] + 1

        t0 = time.monotonic()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
            await asyncio.gather(*(client(s, k) for k in range(clients)))
        return n[0] / (time.monotonic() - t0)

    async def steady(self, rate: float, seconds: float, sample) -> None:
        """Poisson arrivals at ``rate``; ``sample()`` every time it asks to be called."""
        rnd = random.Random(1)
        end, tasks, i = time.monotonic() + seconds, set(), 0
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as s:
            next_at = time.monotonic()
            while time.monotonic() < end:
                sample()
                next_at += rnd.expovariate(rate)
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                t = asyncio.create_task(self.one(s, i))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
                i += 1
            await asyncio.gather(*tasks)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="aggregated")
    ap.add_argument("--model")
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--rate", default="auto", help="requests/s, or auto: --load x the measured capacity")
    ap.add_argument("--load", type=float, default=0.7)
    ap.add_argument("--images", type=int, default=20, help="distinct images (0: a new one per request)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--every", type=float, default=10.0, help="seconds between samples")
    ap.add_argument("--warmup", type=float, default=0.2, help="share of the run before the slope is taken")
    ap.add_argument("--out", default=str(ROOT / "perf" / "results" / "soak"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(config_path(args.config))
    model = args.model or cfg.get("model") or default_model()
    dep = Deployment(cfg, model, log_dir=tempfile.mkdtemp(prefix="epd-soak-logs-"))
    dep.start(timeout=300)
    try:
        load = Load(dep.url, dep.name, args.images, args.max_tokens)
        rate = float(args.rate) if args.rate != "auto" else args.load * asyncio.run(load.capacity())
        print(f"rate {rate:.2f} req/s for {args.minutes} min", flush=True)
        names = sorted(dep.procs)
        rows: list[list[float]] = []
        t0, next_sample = time.monotonic(), [0.0]

        def sample() -> None:
            now = time.monotonic() - t0
            if now < next_sample[0]:
                return
            next_sample[0] = now + args.every
            with urllib.request.urlopen(f"{dep.url}/metrics", timeout=5) as r:
                text = r.read().decode()
            index = sum(float(v) for v in re.findall(r'^epd:cluster_index_entries\{[^}]*\} ([0-9.e+]+)$', text, re.M))
            rows.append([now, *(_rss_mb(dep.procs[n].pid) for n in names), kv_blocks_used(text), index,
                         load.ok, load.errors])

        asyncio.run(load.steady(rate, args.minutes * 60, sample))
        next_sample[0] = 0
        sample()
    finally:
        dep.stop()
    with open(out / "soak.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t_s", *(f"rss_mb_{n}" for n in names), "kv_blocks_used", "cluster_index_entries", "ok",
                    "errors"])
        w.writerows(rows)
    data = np.array(rows)
    t_min = data[:, 0] / 60
    warm = t_min >= args.warmup * t_min[-1]
    summary = {"config": args.config, "minutes": args.minutes, "rate": round(rate, 2), "images": args.images,
               "ok": load.ok, "errors": load.errors, "processes": {}}
    for j, n in enumerate(names, 1):
        slope = float(np.polyfit(t_min[warm], data[warm, j], 1)[0]) if warm.sum() > 1 else float("nan")
        start, end = float(data[warm, j][0]), float(data[-1, j])
        summary["processes"][n] = {"rss_after_warmup_mb": round(start, 1), "rss_end_mb": round(end, 1),
                                   "change_pct": round(100 * (end - start) / start, 2),
                                   "slope_mb_per_min": round(slope, 3)}
    print(json.dumps(summary, indent=1))
    (out / "soak.json").write_text(json.dumps(summary, indent=1))
    _plot(out / "soak.png", t_min, data, names, summary)
    return 0


def _plot(path: Path, t_min, data, names, summary) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for j, n in enumerate(names, 1):
        p = summary["processes"][n]
        a.plot(t_min, data[:, j], label=f"{n} ({p['slope_mb_per_min']:+.2f} MB/min)")
    a.set_ylabel("RSS (MB)")
    a.legend(fontsize=8)
    a.set_title(f"soak: {summary['config']}, {summary['rate']} req/s, {summary['ok']} ok / "
                f"{summary['errors']} errors")
    b.plot(t_min, data[:, len(names) + 1], label="KV blocks in use")
    b.plot(t_min, data[:, len(names) + 2], label="cluster index entries (router)")
    b.set_yscale("symlog")
    b.legend(fontsize=8)
    b.set_xlabel("minutes")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    raise SystemExit(main())
