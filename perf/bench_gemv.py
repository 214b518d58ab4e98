"""Decode GEMV: our Triton kernel's candidates vs cuBLAS (F.linear) at Qwen2.5-VL-7B's shapes.

For each linear of a decode step (qkv 3584->4608, o 3584->3584, gate-up 3584->37888,
down 18944->3584, lm_head 3584->152064), M in 1, 2, 4, 8, 16 rows, bf16: one CUDA graph of 28
calls on different weight tensors (28 of them, fewer only where 28 would pass 8 GB: lm_head; a
weight is read again only after GBs of others, so L2 (50 MB) never serves it), 10 warm-up
replays, median of 50. Reports µs per call, TB/s of weight bytes, max |error| vs F.linear, the
best config per shape and its ratio to cuBLAS; then a whole decode body at each M (28 x qkv, o,
gate-up, down in one graph) with cuBLAS vs the best kernels, beside the weight-read floor at the
measured copy bandwidth; then what ``pick_config`` (the engine's start-up picker) chooses.

    python perf/bench_gemv.py --out perf/results/gemv/bench_gemv.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import asdict

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {"qkv": (4608, 3584), "o": (3584, 3584), "gate_up": (37888, 3584), "down": (3584, 18944),
          "lm_head": (152064, 3584)}
MS = (1, 2, 4, 8, 16)
CALLS = 28
BODY = ("qkv", "o", "gate_up", "down")
DTYPE = torch.bfloat16
DEV = "cuda"


def weight_bytes(n: int, k: int) -> int:
    return n * k * DTYPE.itemsize


def make_weights(n: int, k: int, seed: int) -> list[torch.Tensor]:
    copies = min(CALLS, max(2, int(8e9 // weight_bytes(n, k))))
    g = torch.Generator(device=DEV).manual_seed(seed)
    return [(torch.randn(n, k, device=DEV, generator=g, dtype=DTYPE) * 0.02) for _ in range(copies)]


def _precompile(jobs: list[tuple[str, int, int]]) -> None:
    """Run each (shape, m, candidate index) once: fills Triton's disk cache for the main process."""
    from stages.models import gemv_triton as G

    weights = {}
    for name, m, idx in jobs:
        n, k = SHAPES[name]
        if name not in weights:
            weights[name] = torch.empty(n, k, device=DEV, dtype=DTYPE).normal_()
        try:
            G.gemv(torch.randn(m, k, device=DEV, dtype=DTYPE), weights[name], None, G.candidates(m, n, k)[idx])
        except Exception:  # the main process records the failure
            pass
    torch.cuda.synchronize()


def precompile(procs: int) -> float:
    """Compile every candidate in ``procs`` processes at once (each compile is serial Python work)."""
    from stages.models import gemv_triton as G

    t = time.perf_counter()
    jobs = [(name, m, i) for name, (n, k) in SHAPES.items() for m in MS for i in range(len(G.candidates(m, n, k)))]
    if procs > 1:
        ctx = mp.get_context("spawn")
        with ctx.Pool(procs) as pool:
            pool.map(_precompile, [jobs[i::procs] for i in range(procs)])
    return time.perf_counter() - t


def copy_tbps() -> float:
    """Device-to-device copy bandwidth (read + write) of a 2 GiB buffer, TB/s."""
    src = torch.empty(1 << 30, device=DEV, dtype=DTYPE)
    dst = torch.empty_like(src)
    events = []
    for _ in range(13):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        dst.copy_(src)
        e.record()
        events.append((s, e))
    torch.cuda.synchronize()
    ms = sorted(s.elapsed_time(e) for s, e in events[3:])[5]
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e12


def bench_shape(name: str, weights: list[torch.Tensor], m: int) -> dict:
    from stages.models import gemv_triton as G

    n, k = SHAPES[name]
    nw = len(weights)
    x = torch.randn(m, k, device=DEV, dtype=DTYPE)
    ref = F.linear(x, weights[0]).float()
    tol = 2e-2 + 2e-2 * ref.abs().max().item()
    gb = weight_bytes(n, k)
    cublas = G.graph_time_us(lambda i: F.linear(x, weights[i % nw]), CALLS, warmup=10, reps=50)
    rows = []
    for cfg in G.candidates(m, n, k):
        row = {"config": asdict(cfg)}
        try:
            err = (G.gemv(x, weights[0], None, cfg).float() - ref).abs().max().item()
            us = G.graph_time_us(lambda i, cfg=cfg: G.gemv(x, weights[i % nw], None, cfg), CALLS, warmup=10, reps=50)
            row.update(us=us, tbps=gb / us / 1e6, max_abs_err=err, ok=err <= tol)
        except Exception as e:  # a candidate that does not compile here (e.g. shared memory)
            row.update(error=f"{type(e).__name__}: {str(e)[:200]}", ok=False)
        rows.append(row)
    good = [r for r in rows if r["ok"]]
    best = min(good, key=lambda r: r["us"]) if good else None
    return {"shape": name, "m": m, "n": n, "k": k, "weights": nw, "weight_mb": gb / 1e6,
            "cublas_us": cublas, "cublas_tbps": gb / cublas / 1e6, "candidates": rows,
            "best": best, "speedup_vs_cublas": cublas / best["us"] if best else None}


def bench_body(weights: dict, picked: dict, m: int) -> dict:
    """28 x (qkv, o, gate-up, down) at ``m`` rows in one graph: cuBLAS vs the best kernel per
    shape (cuBLAS where none beat it)."""
    from stages.models import gemv_triton as G

    x = {name: torch.randn(m, SHAPES[name][1], device=DEV, dtype=DTYPE) for name in BODY}

    def layer(i, use):
        for name in BODY:
            w = weights[name][i % len(weights[name])]
            cfg = picked.get(name) if use else None
            if cfg is None:
                F.linear(x[name], w)
            else:
                G.gemv(x[name], w, None, cfg)

    total = sum(weight_bytes(*SHAPES[name]) for name in BODY) * CALLS
    out = {"m": m, "weight_gb": total / 1e9, "picked": {name: asdict(cfg) for name, cfg in picked.items()}}
    for label, use in (("cublas", False), ("ours", True)):
        us = G.graph_time_us(lambda i: layer(i, use), CALLS, warmup=10, reps=50) * CALLS
        out[f"{label}_us"] = us
        out[f"{label}_tbps"] = total / us / 1e6
    out["speedup"] = out["cublas_us"] / out["ours_us"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="perf/results/gemv/bench_gemv.json")
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset of " + ",".join(SHAPES))
    p.add_argument("--compile-procs", type=int, default=8, help="processes compiling the candidates first")
    p.add_argument("--no-pick", action="store_true", help="skip the pick_config check")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_gemv: needs a CUDA device (this machine has none); nothing measured.")
        sys.exit(0)
    from stages.models import gemv_triton as G

    names = [s for s in args.shapes.split(",") if s]
    t0 = time.perf_counter()
    result = {"device": torch.cuda.get_device_name(), "dtype": "bfloat16", "calls_per_graph": CALLS,
              "warmup": 10, "reps": 50, "shapes": []}

    def save():
        result["elapsed_s"] = time.perf_counter() - t0
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    result["copy_tbps"] = copy_tbps()
    print(f"device copy: {result['copy_tbps']:.2f} TB/s (read + write)", flush=True)
    try:
        result["compile_s"] = precompile(args.compile_procs)
        print(f"candidates compiled in {result['compile_s']:.1f} s", flush=True)
    except Exception as e:
        print(f"parallel compile failed ({e}); compiling in the timing loop", flush=True)
    weights, best = {}, {m: {} for m in MS}
    print(f"{'shape':8} {'M':>3} {'cuBLAS us':>10} {'TB/s':>6} {'best us':>9} {'TB/s':>6} {'x cuBLAS':>8} "
          f"{'max err':>8}  best config", flush=True)
    for seed, name in enumerate(names):
        weights[name] = make_weights(*SHAPES[name], seed)
        for m in MS:
            r = bench_shape(name, weights[name], m)
            result["shapes"].append(r)
            b = r["best"]
            if b is None:
                print(f"{name:8} {m:3d} {r['cublas_us']:10.1f} {r['cublas_tbps']:6.2f}   no candidate ran", flush=True)
            else:
                c = b["config"]
                desc = (f"{'dot' if c['dot'] else 'fma'} n{c['block_n']} k{c['block_k']} split{c['split_k']} "
                        f"w{c['num_warps']} s{c['num_stages']}{' prefetch' if c['prefetch'] else ''}")
                print(f"{name:8} {m:3d} {r['cublas_us']:10.1f} {r['cublas_tbps']:6.2f} {b['us']:9.1f} "
                      f"{b['tbps']:6.2f} {r['speedup_vs_cublas']:8.3f} {b['max_abs_err']:8.4f}  {desc}", flush=True)
                if r["speedup_vs_cublas"] > 1 + G._CUBLAS_MARGIN:
                    best[m][name] = G.GemvConfig(**c)
            save()
        if name not in BODY:
            del weights[name]
            torch.cuda.empty_cache()
    if all(name in weights for name in BODY):
        result["body"] = []
        for m in MS:
            body = bench_body(weights, best[m], m)
            floor_us = body["weight_gb"] * 1e9 / (result["copy_tbps"] * 1e12) * 1e6
            body["floor_us_at_copy_bw"] = floor_us
            result["body"].append(body)
            print(f"decode body M={m:2d} (28 x qkv, o, gate-up, down; {body['weight_gb']:.2f} GB): cuBLAS "
                  f"{body['cublas_us']:.0f} us ({body['cublas_tbps']:.2f} TB/s), ours {body['ours_us']:.0f} us "
                  f"({body['ours_tbps']:.2f} TB/s), x{body['speedup']:.3f}; floor at copy bandwidth {floor_us:.0f} us"
                  f" (cuBLAS {body['cublas_us'] / floor_us:.2f}x, ours {body['ours_us'] / floor_us:.2f}x)", flush=True)
            save()
    if not args.no_pick:
        picks = []
        for name in names:
            n, k = SHAPES[name]
            ws = weights.get(name) or [torch.randn(n, k, device=DEV, dtype=DTYPE) * 0.02]
            for m in MS:
                t = time.perf_counter()
                cfg = G.pick_config(m, n, k, DTYPE, DEV, ws)
                picks.append({"shape": name, "m": m, "config": asdict(cfg) if cfg else None,
                              "seconds": time.perf_counter() - t})
                print(f"pick_config {name:8} M={m:2d}: {cfg} ({picks[-1]['seconds']:.1f} s)", flush=True)
        result["pick_config"] = picks
    save()
    print(f"wrote {args.out} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
