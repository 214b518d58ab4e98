"""The plot of ``perf.bench_autoscale``: per arm, the load (requests in flight by kind) and the
workers per role over time, and the requests that met their SLO."""

from __future__ import annotations

from pathlib import Path

COLORS = {"encode": "tab:orange", "prefill": "tab:blue", "decode": "tab:green", "image": "tab:red",
          "text": "tab:purple"}


def plot_runs(runs: list[dict], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = {}
    for r in runs:  # one run per arm: the first round's
        first.setdefault(r["arm"], r)
    arms = list(first)
    fig, axes = plt.subplots(3, len(arms), figsize=(6.5 * len(arms), 8), sharex=True, squeeze=False)
    for col, arm in enumerate(arms):
        run = first[arm]
        end = run["duration"]
        ts = [i * 0.5 for i in range(int(end / 0.5) + 2)]
        ax = axes[0][col]
        for kind in ("image", "text"):
            rows = [q for q in run["requests"] if q["kind"] == kind]
            ax.plot(ts, [sum(q["send"] <= t < q["end"] for q in rows) for t in ts], color=COLORS[kind],
                    label=f"{kind}-heavy in flight")
        ax.set_title(f"{arm} (round {run['round']}): goodput {run['summary']['all']['goodput_rps']:.2f} req/s, "
                     f"SLO {run['summary']['all']['attainment']:.0%}", fontsize=9)
        ax.set_ylabel("requests")
        ax.legend(fontsize=7)
        ax = axes[1][col]
        for k, role in enumerate(("encode", "prefill", "decode")):
            xs = [t for t, _ in run["roles"]]
            # Nudged apart so that equal counts stay visible as separate lines.
            ys = [sum(1 for r, state in ws.values() if r == role and state == "active") + 0.04 * (k - 1)
                  for _, ws in run["roles"]]
            ax.step(xs, ys, where="post", color=COLORS[role], label=role)
        ax.set_ylabel("active workers")
        ax.set_yticks(range(0, 4))
        ax.legend(fontsize=7)
        ax = axes[2][col]
        for ok, mark in ((True, "o"), (False, "x")):
            rows = [q for q in run["requests"] if q["good"] == ok]
            ax.scatter([q["end"] for q in rows], [q["ttft"] for q in rows], marker=mark, s=12,
                       c=[COLORS[q["kind"]] for q in rows], label="in SLO" if ok else "missed")
        ax.set_yscale("log")
        ax.set_ylabel("TTFT s (at finish)")
        ax.set_xlabel("seconds")
        ax.legend(fontsize=7)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
