"""Charts of several ``epd-bench`` results files on one figure each: SLO attainment vs rate,
TTFT CDF, TPOT CDF.

    python -m perf.epd_bench.plot ours.json vllm.json --out perf/out/plots
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def load(paths: list[str]) -> list[dict]:
    out = []
    for p in paths:
        res = json.loads(Path(p).read_text())
        res.setdefault("system", Path(p).stem)
        out.append(res)
    names = [r["system"] for r in out]
    for p, res in zip(paths, out):  # two files of one system: tell them apart by file name
        res["label"] = res["system"] if names.count(res["system"]) == 1 else f"{res['system']} ({Path(p).stem})"
    return out


def _rate(run: dict) -> float:
    return float(run["rate"])


def plot_slo(results: list[dict], path: Path) -> bool:
    """Attainment vs rate; ``inf`` sits one step past the largest finite rate."""
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for res in results:
        runs = [r for r in res["runs"] if "slo_attainment" in r["summary"]]
        if not runs:
            continue
        finite = [_rate(r) for r in runs if np.isfinite(_rate(r))]
        inf_x = (max(finite) * 1.5) if finite else 1.0
        pts = sorted((_rate(r) if np.isfinite(_rate(r)) else inf_x, 100 * r["summary"]["slo_attainment"])
                     for r in runs)
        ax.plot(*zip(*pts), marker="o", label=res["label"])
        drawn = True
    if not drawn:
        plt.close(fig)
        return False
    args = results[0].get("args", {})
    ax.axhline(90, color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="request rate (req/s; rightmost point = inf if swept)", ylabel="requests within SLO (%)",
           title=f"SLO attainment (TTFT <= {args.get('slo_ttft_ms')} ms, TPOT <= {args.get('slo_tpot_ms')} ms)",
           ylim=(0, 105))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_cdf(results: list[dict], key: str, label: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for res in results:
        for run in res["runs"]:
            vals = np.sort([rec[key] for rec in run["records"] if rec["ok"] and (key != "tpot_ms" or rec["output_tokens"] > 1)])
            if vals.size:
                ax.step(vals, np.arange(1, vals.size + 1) / vals.size, where="post",
                        label=f"{res['label']} @ {run['rate']} req/s")
    ax.set(xlabel=f"{label} (ms)", ylabel="fraction of requests", title=f"{label} CDF", ylim=(0, 1.02))
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", help="epd-bench results JSON files")
    ap.add_argument("--out", default=".", help="directory for the PNGs")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = load(args.results)
    written = []
    if plot_slo(results, out / "slo_attainment.png"):
        written.append(out / "slo_attainment.png")
    plot_cdf(results, "ttft_ms", "TTFT", out / "ttft_cdf.png")
    plot_cdf(results, "tpot_ms", "TPOT", out / "tpot_cdf.png")
    written += [out / "ttft_cdf.png", out / "tpot_cdf.png"]
    for p in written:
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
