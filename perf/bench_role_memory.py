"""Memory per role: role-aware workers beside today's whole-model ones, one fresh process each.

For each model, one child process per role (encode, prefill, decode) builds the engine as a
worker of that role builds it now, and one builds it with ``role=mixed``: the whole model and a
KV pool, what every worker built before, whatever its role. Each reports the bytes of its
weights and KV pool and its peak RSS (``ru_maxrss``), and the RSS after importing torch and
transformers but before building (the baseline every worker pays); the table gives RSS over that
baseline, once the engine is built and at its peak (loading maps the safetensors pages it reads,
so the peak holds the role's weights twice for a moment). A last child per model
switches one engine encode -> decode -> prefill -> encode and times each switch.

``--shapes-7b`` adds the Qwen2.5-VL-7B shapes: parameter bytes per role in bfloat16, counted on
the meta device (no weights, no forward), and the KV bytes per token.

    python -m perf.bench_role_memory --sizes tiny,small --kv-gb 0.25 --shapes-7b
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROLES = ("encode", "prefill", "decode")
MIB = 1 << 20


def _rss_now_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def child(model: str, role: str, kv_gb: float, switch: bool, device: str, load_format: str) -> dict:
    import gc
    import resource
    import time

    import torch
    import transformers  # noqa: F401 - the baseline includes it, as in every worker

    from stages.engine.config import EngineConfig
    from stages.engine.llm_engine import LLMEngine

    base_kb = _rss_now_kb()
    t0 = time.perf_counter()
    eng = LLMEngine(EngineConfig(model=model, role=role, kv_cache_memory_gb=kv_gb, device=device,
                                 load_format=load_format, cuda_graphs=False))
    build_s = round(time.perf_counter() - t0, 2)
    gc.collect()
    out = dict(eng.runner.memory(), build_s=build_s, base_rss_kb=base_kb, rss_kb=_rss_now_kb(),
               peak_rss_kb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    if eng.device.type == "cuda":
        out["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(eng.device)
    if switch:
        out["switches"] = []
        for r in ("decode", "prefill", "encode"):
            got = eng.switch_role(r)
            if eng.device.type == "cuda":
                got["cuda_bytes"] = torch.cuda.memory_allocated(eng.device)
            out["switches"].append({k: v for k, v in got.items() if k in ("role", "switch_s", "cuda_bytes")})
    return out


def run_child(model: str, role: str, kv_gb: float, switch: bool = False, device: str = "cpu",
              load_format: str = "auto") -> dict:
    cmd = [sys.executable, "-m", "perf.bench_role_memory", "--child", model, role, str(kv_gb),
           "--device", device, "--load-format", load_format]
    if switch:
        cmd.append("--switch")
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    return json.loads(res.stdout.strip().splitlines()[-1])


def shapes_7b() -> list[dict]:
    """Parameter bytes per role of Qwen2.5-VL-7B in bfloat16, counted on the meta device."""
    import tempfile

    import torch

    from stages.attention.backend import get_attention_backend
    from stages.engine.roles import role_parts
    from stages.models.loader import load_hf_config
    from stages.models.make_model import make_model
    from stages.models.registry import model_class

    with tempfile.TemporaryDirectory() as tmp:
        d = make_model("qwen2_5_vl", "7b", Path(tmp) / "q7b", config_only=True, dtype="bfloat16")
        cfg = load_hf_config(d)
    backend = get_attention_backend(torch.device("cpu"), "torch", torch.bfloat16)
    text = cfg.text_config
    kv_per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads) * 2
    rows = []
    for role in (*ROLES, "mixed"):
        with torch.device("meta"):
            m = model_class(cfg.model_type)(cfg, backend, parts=role_parts(role))
        n = sum(p.numel() for p in m.parameters())
        rows.append({"role": role, "params": n, "weights_bytes": 2 * n, "kv_bytes_per_token": kv_per_token})
    return rows


def _row(name: str, role: str, r: dict) -> str:
    peak = f" {r['peak_cuda_bytes'] / MIB:.0f} |" if "peak_cuda_bytes" in r else ""
    return (f"| {name} | {role} | {r['weights_bytes'] / MIB:.1f} | {r['kv_bytes'] / MIB:.1f} | "
            f"{(r['rss_kb'] - r['base_rss_kb']) / 1024:.0f} | {(r['peak_rss_kb'] - r['base_rss_kb']) / 1024:.0f} | "
            f"{r['build_s']} |{peak}")


def table(results: dict) -> str:
    cuda = results.get("device", "cpu").startswith("cuda")
    lines = ["| model | worker | weights MiB | KV pool MiB | RSS after start MiB | peak RSS MiB | build s |"
             + (" peak CUDA MiB |" if cuda else ""), "|---|---|---:|---:|---:|---:|---:|" + ("---:|" if cuda else "")]
    for name, rows in results["cpu"].items():
        for role in ROLES:
            lines.append(_row(name, f"{role} (role-aware)", rows[role]))
        lines.append(_row(name, "any role before (whole model + pool)", rows["mixed"]))
        aware, w = [rows[r] for r in ROLES], rows["mixed"]

        def over(rs, key):
            return sum(r[key] - r["base_rss_kb"] for r in rs) / 1024

        lines.append(f"| {name} | 1e1p1d total, role-aware | {sum(r['weights_bytes'] for r in aware) / MIB:.1f} | "
                     f"{sum(r['kv_bytes'] for r in aware) / MIB:.1f} | {over(aware, 'rss_kb'):.0f} | "
                     f"{over(aware, 'peak_rss_kb'):.0f} | |")
        lines.append(f"| {name} | 1e1p1d total, before | {3 * w['weights_bytes'] / MIB:.1f} | "
                     f"{3 * w['kv_bytes'] / MIB:.1f} | {3 * over([w], 'rss_kb'):.0f} | {3 * over([w], 'peak_rss_kb'):.0f} | |")
        sw = ", ".join(f"-> {s['role']} {s['switch_s']} s" + (f" ({s['cuda_bytes'] / MIB:.0f} MiB held)"
                                                              if "cuda_bytes" in s else "") for s in rows["switches"])
        lines.append(f"| {name} | live switch from encode: {sw} | | | | | |")
    if results.get("7b"):
        lines += ["", "| Qwen2.5-VL-7B shapes (bf16) | params | weights GiB |", "|---|---:|---:|"]
        for r in results["7b"]:
            lines.append(f"| {r['role']} | {r['params'] / 1e9:.3f} B | {r['weights_bytes'] / (1 << 30):.2f} |")
        lines.append(f"| KV per token | | {results['7b'][0]['kv_bytes_per_token'] / 1024:.0f} KiB |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="tiny,small")
    ap.add_argument("--kv-gb", type=float, default=0.25)
    ap.add_argument("--shapes-7b", action="store_true")
    ap.add_argument("--model", action="append", default=[],
                    help="a model directory to measure (instead of --sizes), e.g. a config-only 7b")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--load-format", default="auto", help="dummy for a config-only directory")
    ap.add_argument("--out", default=str(ROOT / "perf" / "results" / "role_memory.json"))
    ap.add_argument("--child", nargs=3, metavar=("MODEL", "ROLE", "KV_GB"), help=argparse.SUPPRESS)
    ap.add_argument("--switch", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        model, role, kv_gb = args.child
        print(json.dumps(child(model, role, float(kv_gb), args.switch, args.device, args.load_format)))
        return 0
    from stages.models.make_model import make_model

    cache = Path(os.environ.get("EPD_CACHE", Path.home() / ".cache" / "epd")) / "models"
    results: dict = {"kv_gb": args.kv_gb, "device": args.device, "cpu": {}}
    models = {Path(m).name: m for m in args.model} or {
        f"llava-{size}": str(make_model("llava", size, cache / f"llava-{size}", seed=0, reuse=True))
        for size in args.sizes.split(",")}
    for name, model in models.items():
        rows: dict = {}
        for role in (*ROLES, "mixed"):  # mixed: the whole model and a pool, what every worker built before
            rows[role] = run_child(model, role, args.kv_gb, device=args.device, load_format=args.load_format)
            print(name, role, rows[role], flush=True)
        rows["switches"] = run_child(model, "encode", args.kv_gb, switch=True, device=args.device,
                                     load_format=args.load_format)["switches"]
        results["cpu"][name] = rows
    if args.shapes_7b:
        results["7b"] = shapes_7b()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
