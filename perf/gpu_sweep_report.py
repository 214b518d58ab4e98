"""Markdown tables of ``perf.gpu_sweep`` results: the sweep per deployment and peak memory per stage.

    python -m perf.gpu_sweep_report perf/results/gpu1-qwen25vl-7b/gpu-*.json \\
        [--relaxed 5000,100 ...] [--plot-dir DIR]

Attainment and goodput are given at the SLOs the sweep ran with and, from the same records, at
further (``--relaxed``, repeatable) pairs; goodput is the highest swept rate with >= 90% of
requests inside. ``--plot-dir`` draws attainment vs rate at every pair, the TTFT and TPOT CDFs and
peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from perf.epd_bench import plot
from perf.epd_bench.metrics import goodput


def attainment(records: list[dict], ttft_ms: float, tpot_ms: float) -> float:
    """epd-bench's rule: a request counts when it succeeded and met both bounds."""
    ok = [r for r in records if r["ok"] and r["ttft_ms"] <= ttft_ms and r["tpot_ms"] <= tpot_ms]
    return len(ok) / len(records) if records else 0.0


def slo_pairs(results: list[dict], relaxed: list[tuple[float, float]]) -> list[tuple[float, float]]:
    args = results[0]["args"]
    return [(args["slo_ttft_ms"], args["slo_tpot_ms"]), *relaxed]


def sweep_table(results: list[dict], relaxed: list[tuple[float, float]]) -> str:
    pairs = slo_pairs(results, relaxed)
    head = ("| deployment | rate (req/s) | achieved req/s | out tok/s | TTFT mean / p99 ms | TPOT mean / p99 ms |"
            + "".join(f" in SLO {t:g} / {p:g} ms |" for t, p in pairs))
    lines = [head, "|" + "---|" * (6 + len(pairs))]
    for res in results:
        pts: list[list] = [[] for _ in pairs]
        for run in res["runs"]:
            s, rate = run["summary"], float(run["rate"])
            shares = [attainment(run["records"], *pair) for pair in pairs]
            for p, a in zip(pts, shares):
                p.append((rate, a))
            failed = f" ({s['failed']} failed)" if s["failed"] else ""
            lines.append(f"| {res['system']} | {run['rate']} | {s['request_throughput']:.2f}{failed} "
                         f"| {s['output_throughput']:.0f} | {s['mean_ttft_ms']:.0f} / {s['p99_ttft_ms']:.0f} "
                         f"| {s['mean_tpot_ms']:.1f} / {s['p99_tpot_ms']:.1f} |"
                         + "".join(f" {a:.0%} |" for a in shares))
        lines.append(f"| **{res['system']} goodput** | | | | | |" + "".join(f" **{goodput(p)}** req/s |" for p in pts))
        if res.get("error"):
            lines.append(f"| {res['system']} | error: {res['error'][:120]} |" + " |" * (4 + len(pairs)))
    return "\n".join(lines)


def memory_table(results: list[dict]) -> str:
    lines = ["| deployment | worker | device | GPU MiB after start | GPU MiB peak | host RSS MiB peak |",
             "|" + "---|" * 6]
    for res in results:
        mem = res.get("memory") or {}
        for wid, peak in mem.get("gpu_peak_mib", {}).items():
            if wid == "router":
                continue
            lines.append(f"| {res['system']} | {wid} | {res['placement'].get(wid, '?')} "
                         f"| {mem.get('gpu_at_start_mib', {}).get(wid, '-')} | {peak} "
                         f"| {mem.get('rss_peak_mib', {}).get(wid, '-')} |")
        for idx, peak in mem.get("device_peak_mib", {}).items():
            lines.append(f"| {res['system']} | whole GPU {idx} | | | {peak} | |")
    return "\n".join(lines)


def plot_attainment(results: list[dict], pairs: list[tuple[float, float]], path: Path) -> None:
    plt = plot.plt
    fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 4), squeeze=False)
    for ax, (ttft, tpot) in zip(axes[0], pairs):
        for i, res in enumerate(results):  # markers and dashes apart: equal curves stay visible
            pts = [(float(r["rate"]), 100 * attainment(r["records"], ttft, tpot)) for r in res["runs"]]
            ax.plot(*zip(*pts), marker="osD^v"[i % 5], markersize=9 - 2 * (i % 3),
                    linestyle=("-", "--", ":")[i % 3], label=res["system"])
        ax.axhline(90, color="grey", linestyle=":", linewidth=1)
        ax.set(xlabel="request rate (req/s)", ylabel="requests within SLO (%)", ylim=(-3, 105),
               title=f"TTFT <= {ttft:g} ms, TPOT <= {tpot:g} ms")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_plots(results: list[dict], relaxed: list[tuple[float, float]], out: Path) -> None:
    from perf.gpu_sweep import plot_memory

    out.mkdir(parents=True, exist_ok=True)
    for res in results:
        res["label"] = res["system"]
    plot_attainment(results, slo_pairs(results, relaxed), out / "slo_attainment.png")
    plot.plot_cdf(results, "ttft_ms", "TTFT", out / "ttft_cdf.png")
    plot.plot_cdf(results, "tpot_ms", "TPOT", out / "tpot_cdf.png")
    plot_memory(results, out / "gpu_memory.png")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+")
    ap.add_argument("--relaxed", action="append", default=[], help="another SLO pair: TTFT_MS,TPOT_MS")
    ap.add_argument("--plot-dir", help="write the PNGs here")
    args = ap.parse_args(argv)
    results = [json.loads(Path(p).read_text()) for p in args.results]
    relaxed = [tuple(float(x) for x in pair.split(",")) for pair in args.relaxed]
    print(sweep_table(results, relaxed))
    print()
    print(memory_table(results))
    if args.plot_dir:
        write_plots(results, relaxed, Path(args.plot_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
