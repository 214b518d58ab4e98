"""Pull bandwidth and latency between two processes: shm and zmq beside an in-process copy.

A holder process publishes one float32 tensor per size; this process pulls
each one ``--reps`` times per backend (after a warm-up round) and reports the
median. Beside them, in this process, taking turns with the pulls: ``copy_``
into a preallocated tensor (the memcpy ceiling) and ``clone`` (allocate +
copy: what a pull must at least do, since it returns a fresh tensor). The
4 KiB row is the fixed cost of one pull (latency).

    python perf/bench_transfer.py [--sizes-mib 1,4,16,64,256] [--reps 7] \
        [--out perf/out/bench_transfer.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from transfer.shm_backend import ShmBackend  # noqa: E402
from transfer.zmq_backend import ZmqBackend  # noqa: E402

MiB = 1 << 20
LATENCY_BYTES = 4096  # a tiny pull: the fixed cost of one round trip


def _payload(nbytes: int) -> torch.Tensor:
    return torch.full((nbytes // 4,), 1.5, dtype=torch.float32)


def _holder(conn, sizes: list[int]) -> None:
    async def serve() -> None:
        store: dict = {}
        backends = [ShmBackend(store=store), ZmqBackend("127.0.0.1", store=store)]
        for b in backends:
            await b.start()
        for n in sizes:
            backends[0].put(f"b{n}", [_payload(n)])
        conn.send({b.name: b.address for b in backends})
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # wait for "stop"
        for b in backends:
            await b.close()

    asyncio.run(serve())


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


async def _timed_pull(backend, address: str, key: str) -> float:
    t0 = time.perf_counter()
    out = await backend.pull(address, key, timeout=60)
    dt = time.perf_counter() - t0
    del out
    return dt


async def _measure(addresses: dict, sizes: list[int], reps: int) -> dict[int, dict[str, float]]:
    """Median seconds per size and method; the methods take turns within each
    repetition so that the machine's noise falls on all of them alike."""
    backends = [ShmBackend(), ZmqBackend("127.0.0.1")]
    for b in backends:
        await b.start()
    medians: dict[int, dict[str, float]] = {}
    for n in sizes:
        src = _payload(n)
        dst = torch.empty_like(src)
        key = f"b{n}"
        times: dict[str, list[float]] = {"copy": [], "clone": [], "shm": [], "zmq": []}
        for rep in range(reps + 1):  # the first round warms up connections, pools and pages
            sample = {
                "copy": _timed(lambda: dst.copy_(src)),
                "clone": _timed(lambda: src.clone()),
                **{b.name: await _timed_pull(b, addresses[b.name], key) for b in backends},
            }
            if rep:
                for k, v in sample.items():
                    times[k].append(v)
        medians[n] = {k: statistics.median(v) for k, v in times.items()}
        del src, dst
    for b in backends:
        await b.close()
    return medians


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mib", default="1,4,16,64,256")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default=str(ROOT / "perf/out/bench_transfer.json"))
    args = ap.parse_args()
    sizes = [LATENCY_BYTES] + [int(float(s) * MiB) for s in args.sizes_mib.split(",")]

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    holder = ctx.Process(target=_holder, args=(child, sizes), daemon=True)
    holder.start()
    try:
        if not parent.poll(120):
            raise RuntimeError("the holder process did not start")
        addresses = parent.recv()
        medians = asyncio.run(_measure(addresses, sizes, args.reps))
    finally:
        parent.send("stop")
        holder.join(30)

    rows = []
    for n in sizes:
        row = {"bytes": n, **{f"{k}_s": v for k, v in medians[n].items()}}
        for k in ("copy", "clone", "shm", "zmq"):
            row[f"{k}_gbps"] = n / row[f"{k}_s"] / 1e9
        rows.append(row)

    print(f"{'size':>9} | {'copy_ GB/s':>10} {'clone GB/s':>10} | {'shm GB/s':>8} {'shm ms':>8} | "
          f"{'zmq GB/s':>8} {'zmq ms':>8} | shm/clone zmq/clone")
    for r in rows:
        n = r["bytes"]
        size = f"{n // MiB} MiB" if n >= MiB else f"{n // 1024} KiB"
        print(f"{size:>9} | {r['copy_gbps']:10.2f} {r['clone_gbps']:10.2f} | "
              f"{r['shm_gbps']:8.2f} {r['shm_s'] * 1e3:8.3f} | "
              f"{r['zmq_gbps']:8.2f} {r['zmq_s'] * 1e3:8.3f} | "
              f"{r['clone_s'] / r['shm_s']:9.2f} {r['clone_s'] / r['zmq_s']:9.2f}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads()},
        "reps": args.reps,
        "note": "median seconds per pull of one float32 tensor between two processes on one host; "
                "copy/clone are in-process baselines measured in the same run",
        "rows": rows,
    }, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
