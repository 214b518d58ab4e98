"""``epd-plan``: which E/P/D split of N devices serves a trace best? Predicted goodput per split.

    epd-plan --devices 3 --dataset random-mm --input-len 32-256 --output-len 16-32 \
        --images-per-request 0-4 --model ~/.cache/epd/models/llava-small \
        --profile step.json --profile encode.json --slo-ttft-ms 1500 --slo-tpot-ms 150

Inputs:
  the trace   epd-bench's: ``--dataset jsonl --jsonl FILE`` (one OpenAI chat body per line,
              cycled to --num-prompts), or ``--dataset random-mm`` with its parameters
              (--input-len, --output-len, --images-per-request, --image-sizes); arrivals are
              epd-bench's (gamma gaps of --burstiness, rescaled to the rate).
  sizes       with --model DIR, prompts are counted as the router counts them (the chat
              template, the family's image-token arithmetic); without it, JSONL prompts are
              estimated (4 characters a token) and each image is --image-tokens tokens.
  costs       --profile FILE (repeatable): a worker's profile from the profile cache
              ($EPD_CACHE/profiles/*.json, written by each worker at start-up) or the JSON of
              the router's GET /admin/workers. The first with "step" prices prefill/decode
              steps, the first with "encode" prices encodes. Default: the newest step and
              encode profiles in the cache (named on stderr). --corrected applies the
              router's online correction shown by /admin/workers (the load of the moment).
  devices     --devices N: every split of N into e/p/d workers (p, d >= 1), and aggregated
              (mixed) workers with or without encoders; or name them with --splits 2e1p1d,3m.

Each split is simulated (``router.plan_sim``: the router's own slo_aware policy and price
model, the workers' step loops) at request rates found by bisection; its goodput is the highest
rate at which >= 90% of requests meet both the TTFT and the TPOT SLO. --rates also prints the
attainment at the rates you would give epd-bench. On one shared host (a CPU box), --host-cores
slows concurrent steps down as they compete for cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

import numpy as np

from perf.epd_bench.datasets import jsonl_requests, parse_range, parse_sizes
from perf.epd_bench.load import arrival_times
from router.plan import Slo
from router.plan_sim import SimRequest, Simulation, Split, all_splits, attainment

GOOD = 0.9  # epd-bench's goodput: the highest rate with >= 90% of requests within the SLO


def profile_dir() -> Path:
    # stages.profiler.cache_dir(), not imported: the router side never imports stages' modules.
    return Path(os.environ.get("EPD_CACHE", Path.home() / ".cache" / "epd")) / "profiles"


def load_profiles(paths: list[str], corrected: bool = False) -> tuple[dict, dict]:
    """(spec with "step", spec with "encode") from profile files or /admin/workers JSON (with
    ``corrected``, times the router's online correction it shows)."""
    specs = []
    if not paths:
        files = sorted(profile_dir().glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
        for kind in ("step", "encode"):
            hit = next((p for p in files if kind in json.loads(p.read_text())), None)
            if hit is None:
                raise SystemExit(f"no {kind} profile in {profile_dir()}: give --profile")
            print(f"epd-plan: {kind} costs from {hit}", file=sys.stderr)
            specs.append(json.loads(hit.read_text()))
    for p in paths:
        doc = json.loads(Path(p).read_text())
        if "workers" not in doc:
            specs.append(doc)
            continue
        # /admin/workers fills what a worker did not measure with the router's defaults: only
        # what it measured (it counts its samples) stands for the hardware.
        for w in doc["workers"]:
            cm = w.get("cost_model") or {}
            specs.append({**cm, "step": cm.get("step") if cm.get("step_samples") else None,
                          "encode": cm.get("encode") if cm.get("encode_samples") else None,
                          "correction": cm.get("correction") if corrected else None})
    step = next((s for s in specs if s.get("step")), None)
    encode = next((s for s in specs if s.get("encode")), None)
    if step is None:
        raise SystemExit("no profile with step costs (a prefill, decode or mixed worker's)")
    if encode is None:
        print("epd-plan: no encode profile; encodes priced by the router's default model", file=sys.stderr)
    return step, encode or {}


class Sizer:
    """Prompt and image tokens as the router counts them (``router.request_size``)."""

    def __init__(self, model: str | None, image_tokens: int):
        self.prompt = self.images = None
        self.image_tokens = image_tokens
        if model:
            from router.request_size import ImageTokens, PromptSizer

            self.prompt = PromptSizer(model)
            self.images = ImageTokens(Path(model), json.loads(Path(model, "config.json").read_text()))

    def chat(self, body: dict) -> SimRequest:
        from router.images import ImageResolver
        from router.limits import ApiLimits
        from router.openai_protocol import parse_chat
        from router.request_size import estimate

        limits = ApiLimits()
        body = {**body, "model": "plan"}
        parsed = asyncio.run(parse_chat(body, ["plan"], limits, ImageResolver(limits), "plan"))
        size = self.prompt.count(parsed.api) if self.prompt else estimate(parsed.api)
        if not self.prompt:  # estimate() assumes 576 tokens an image
            size.prompt_tokens += (self.image_tokens - 576) * len(size.image_tokens)
            size.image_tokens = [self.image_tokens] * len(size.image_tokens)
        out = parsed.api.sampling.get("max_tokens")
        if out is None:  # the server would answer up to the context's end: no length to simulate
            raise SystemExit("a chat body without max_tokens: give --output-len (as epd-bench does)")
        return SimRequest(size.prompt_tokens, list(size.image_tokens), int(out))

    def image(self, width: int, height: int) -> int:
        if self.images is None:
            return self.image_tokens
        if self.images.fixed is not None:
            return self.images.fixed
        from perf.epd_bench.datasets import noise_image_url
        from router.images import decode_data_url

        url = noise_image_url(width, height, np.random.default_rng(0))
        return self.images.count(decode_data_url(url, 0, "image"))

    def template(self) -> int:
        """Tokens a one-message chat adds around its text (the random-mm prompts' frame)."""
        return self.chat({"messages": [{"role": "user", "content": ""}], "max_tokens": 1}).prompt_tokens


def build_trace(args, sizer: Sizer) -> list[SimRequest]:
    if args.dataset == "jsonl":
        if not args.jsonl:
            raise SystemExit("--dataset jsonl needs --jsonl FILE")
        out_len = parse_range(args.output_len) if args.output_len else None
        return [sizer.chat(r.body) for r in jsonl_requests(args.jsonl, args.num_prompts, out_len)]
    # random-mm: the same draws as epd-bench's generator (lengths, image counts and sizes).
    rng = np.random.default_rng(args.seed)
    inp, outp = parse_range(args.input_len), parse_range(args.output_len or "32")
    imgs, sizes = parse_range(args.images_per_request), parse_sizes(args.image_sizes)
    frame = sizer.template() if sizer.prompt else 8
    per_size = {s: sizer.image(*s) for s in sizes}
    out = []
    for _ in range(args.num_prompts):
        n_in = int(rng.integers(inp[0], inp[1] + 1))
        n_out = int(rng.integers(outp[0], outp[1] + 1))
        n_img = int(rng.integers(imgs[0], imgs[1] + 1))
        toks = [per_size[sizes[int(rng.integers(0, len(sizes)))]] for _ in range(n_img)]
        out.append(SimRequest(frame + n_in + sum(toks), toks, n_out))
    return out


class SplitRunner:
    """Runs one split at given rates; the goodput by bisection."""

    def __init__(self, args, trace: list[SimRequest], step: dict, encode: dict):
        self.args, self.trace, self.step, self.encode = args, trace, step, encode
        self.slo = Slo(args.slo_ttft_ms / 1e3, args.slo_tpot_ms / 1e3)

    def attainment(self, split: Split, rate: float) -> float:
        a = self.args
        arrivals = arrival_times(len(self.trace), rate, a.burstiness, a.seed)
        reqs = [SimRequest(r.prompt_tokens, r.image_tokens, r.output_tokens, t) for r, t in zip(self.trace, arrivals)]
        threads = a.threads or max(1, int(a.host_cores or 1) // split.devices)
        sim = Simulation(split, self.step, self.encode, a.policy, self.slo, a.handoff_ms / 1e3, a.hop_ms / 1e3,
                         a.host_cores, threads)
        return attainment(sim.run(reqs), self.slo)

    def goodput(self, split: Split) -> float:
        lo, hi = 0.0, self.args.max_rate
        if self.attainment(split, 1e-3) < GOOD:
            return 0.0
        if self.attainment(split, hi) >= GOOD:
            return hi
        lo = 1e-3
        while hi / lo > 1.02:  # to 2%
            mid = (lo * hi) ** 0.5
            lo, hi = (mid, hi) if self.attainment(split, mid) >= GOOD else (lo, mid)
        return lo


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="epd-plan", description=__doc__.split("\n\n")[0],
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, help="devices (one worker each) to split")
    ap.add_argument("--splits", help="comma list of splits instead: 2e1p1d, 1e1m, 2m (m: mixed/aggregated)")
    ap.add_argument("--dataset", choices=("random-mm", "jsonl"), default="random-mm")
    ap.add_argument("--jsonl", help="jsonl: one OpenAI chat body per line (epd-bench's format)")
    ap.add_argument("--input-len", default="64", help="random-mm: text tokens, N or LO-HI")
    ap.add_argument("--output-len", default=None, help="output tokens, N or LO-HI (random-mm default 32; "
                                                       "jsonl: overrides max_tokens as epd-bench does)")
    ap.add_argument("--images-per-request", default="1", help="random-mm: N or LO-HI")
    ap.add_argument("--image-sizes", default="112x112", help="random-mm: WxH list")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the arrival gaps (1 = Poisson)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", help="model directory: count tokens as the router does")
    ap.add_argument("--image-tokens", type=int, default=576, help="tokens per image without --model")
    ap.add_argument("--profile", action="append", default=[], help="profile JSON or /admin/workers JSON (repeat)")
    ap.add_argument("--corrected", action="store_true",
                    help="with /admin/workers JSON: apply the router's online correction (actual / predicted) "
                         "to the profiles: the costs as the running deployment sees them")
    ap.add_argument("--policy", default="slo_aware", help="router policy: slo_aware, least_loaded, round_robin")
    ap.add_argument("--slo-ttft-ms", type=float, required=True)
    ap.add_argument("--slo-tpot-ms", type=float, required=True)
    ap.add_argument("--rates", help="also print the attainment at these req/s (comma list)")
    ap.add_argument("--max-rate", type=float, default=1000.0, help="bisection's upper bound, req/s")
    ap.add_argument("--handoff-ms", type=float, default=5.0, help="P -> D KV handoff per request")
    ap.add_argument("--hop-ms", type=float, default=0.0, help="added to each request's arrival (HTTP + router)")
    ap.add_argument("--host-cores", type=float, help="all workers share this many cores (a CPU host)")
    ap.add_argument("--threads", type=int, help="threads per worker with --host-cores (default: cores / workers)")
    ap.add_argument("--json", help="write the table here as JSON")
    args = ap.parse_args(argv)
    if args.splits:
        splits = [Split.parse(s) for s in args.splits.split(",")]
    elif args.devices:
        splits = all_splits(args.devices)
    else:
        ap.error("give --devices N or --splits")
    step, encode = load_profiles(args.profile, args.corrected)
    trace = build_trace(args, Sizer(args.model, args.image_tokens))
    planner = SplitRunner(args, trace, step, encode)
    rates = [float(r) for r in args.rates.split(",")] if args.rates else []
    rows = []
    for split in splits:
        row = {"split": split.name, "devices": split.devices, "goodput_rps": round(planner.goodput(split), 3),
               "attainment": {r: round(planner.attainment(split, r), 3) for r in rates}}
        rows.append(row)
    rows.sort(key=lambda r: -r["goodput_rps"])
    n_img = sum(len(r.image_tokens) for r in trace) / len(trace)
    print(f"trace: {len(trace)} requests, mean prompt {np.mean([r.prompt_tokens for r in trace]):.0f} tokens, "
          f"{n_img:.2f} images, output {np.mean([r.output_tokens for r in trace]):.0f} tokens; "
          f"SLO TTFT {args.slo_ttft_ms:g} ms, TPOT {args.slo_tpot_ms:g} ms; policy {args.policy}")
    head = f"{'split':>8} {'devices':>7} {'goodput req/s':>14}" + "".join(f" {'@' + format(r, 'g'):>7}" for r in rates)
    print(head)
    for row in rows:
        print(f"{row['split']:>8} {row['devices']:>7} {row['goodput_rps']:>14.3f}"
              + "".join(f" {row['attainment'][r]:>7.0%}" for r in rates))
    best = rows[0]
    print(f"recommended: {best['split']} ({best['goodput_rps']:.3f} req/s at >= 90% within SLO)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "splits": rows, "recommended": best["split"]},
                                              indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
