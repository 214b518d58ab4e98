"""A deployment simulated in virtual time: the router's own policy dispatches a trace over
E/P/D workers whose steps cost what their profiled cost models say (``epd-plan`` sweeps it).

What is simulated (discrete events on one clock):

- the router: at each arrival the real ``router.policy`` plans the request through the real
  ``router.plan.Planner`` (its queue, TTFT and TPOT prices), over worker records kept as the
  core keeps them (``Holdings``: a worker runs a stage from its dispatch to its result;
  ``plan.started`` when it got it);
  the core's order follows: the E parts in parallel, then P once every image is encoded (plus
  a pull each), then D after the KV handoff;
- an encode worker: one request's images at a time, first come first served
  (``WorkerCost.encode_s``);
- a prefill, decode or mixed worker: the engine's step loop. A step takes waiting prompts in
  token-budget chunks (first come first served) and one token of every running sequence, and
  costs ``bus.step_cost.predict`` of their summed features; a prompt's own images (no encoder)
  are encoded in its first chunk. A prompt's last chunk gives its first token; a decode worker
  takes handed-over sequences at its next step, up to ``max_num_seqs``.

Not simulated: prefix and image cache hits (each request is new, as epd-bench sends them),
preemption for KV space, the router's learned TTFT/TPOT offsets (zero: no real residual here),
and the HTTP/ZeroMQ hops beyond ``hop_s`` per request. A cost spec may carry the router's
online ``correction`` (actual / predicted per kind, as ``GET /admin/workers`` shows it). ``host_cores`` models workers that share
one host's cores (this CPU): a step started while k workers of ``threads`` each are busy runs
``max(1, k * threads / host_cores)`` times slower.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from dataclasses import dataclass, field

from bus.messages import WorkerInfo
from bus.step_cost import STEP_FEATURES, predict
from router.cost_model import WorkerCost
from router.holdings import Holdings
from router.plan import PULL_S, Plan, Planner, Slo
from router.policy import PlanInputs, make_policy
from router.registry import WorkerRecord
from router.request_size import RequestSize


@dataclass
class SimRequest:
    prompt_tokens: int  # images expanded
    image_tokens: list[int]  # per image
    output_tokens: int
    arrival: float = 0.0


@dataclass(frozen=True)
class Split:
    """Workers of each role; one device each."""

    encode: int = 0
    prefill: int = 0
    decode: int = 0
    mixed: int = 0

    @property
    def devices(self) -> int:
        return self.encode + self.prefill + self.decode + self.mixed

    @property
    def name(self) -> str:
        parts = [(self.encode, "e"), (self.prefill, "p"), (self.decode, "d"), (self.mixed, "m")]
        return "".join(f"{n}{r}" for n, r in parts if n)

    @classmethod
    def parse(cls, text: str) -> Split:
        """"2e1p1d", "1e1m", "2m" (mixed: aggregated workers)."""
        counts, num = {}, ""
        for ch in text.strip().lower():
            if ch.isdigit():
                num += ch
            elif ch in "epdm" and num:
                counts[{"e": "encode", "p": "prefill", "d": "decode", "m": "mixed"}[ch]] = int(num)
                num = ""
            else:
                raise ValueError(f"bad split {text!r}: want e.g. 2e1p1d, 1e1m or 2m")
        split = cls(**counts)
        if num or not (split.mixed or (split.prefill and split.decode)) or (split.mixed and (split.prefill or split.decode)):
            raise ValueError(f"bad split {text!r}: needs mixed workers, or prefill and decode workers")
        return split


def all_splits(devices: int) -> list[Split]:
    """Every way to fill ``devices``: e/p/d counts (p, d >= 1), and mixed workers with 0+ encoders."""
    out = []
    for e in range(devices - 1):
        for p in range(1, devices - e):
            out.append(Split(e, p, devices - e - p, 0))
    out += [Split(e, 0, 0, devices - e) for e in range(devices)]
    return out


@dataclass
class _Flight:
    """One request in the simulation (as ``router.flight.Flight``: ``plan`` and ``tokens`` are what
    the Planner reads)."""

    rid: str
    req: SimRequest
    plan: Plan | None = None
    tokens: list = field(default_factory=list)  # output tokens so far (their count is what matters)
    encodes_left: int = 0
    prefill_left: int = 0
    prefill_done: int = 0
    own_images: list[int] = field(default_factory=list)  # images the prefill worker encodes itself
    first_token: float | None = None
    done: float | None = None


class _Clock:
    def __init__(self):
        self.now = 0.0
        self._events: list = []
        self._seq = itertools.count()

    def at(self, t: float, fn, *args) -> None:
        heapq.heappush(self._events, (t, next(self._seq), fn, args))

    def run(self) -> None:
        while self._events:
            self.now, _, fn, args = heapq.heappop(self._events)
            fn(*args)


class _SimPlanner(Planner):
    """The router's Planner on the simulation's clock (it reads ``time.monotonic`` otherwise)."""

    def __init__(self, registry, flights, slo, clock: _Clock):
        super().__init__(registry, flights, slo)
        self.clock = clock

    def queue_s(self, rec, now=None):
        return super().queue_s(rec, self.clock.now)


class _Registry:
    def __init__(self):
        self.workers: dict[str, WorkerRecord] = {}


class _Worker:
    """One simulated worker: its record (what the router sees) and its queues."""

    def __init__(self, sim: Simulation, wid: str, role: str, spec: dict):
        self.sim, self.role = sim, role
        info = WorkerInfo(worker_id=wid, incarnation="sim", role=role, model="", device="sim", max_model_len=1 << 20,
                          num_kv_blocks=1 << 20, block_size=16, is_multimodal=True, transfer={}, pid=0,
                          cost_model=spec)
        self.rec = WorkerRecord(info=info, last_seen=0.0, holdings=sim.holdings)
        self.cost = WorkerCost(spec)
        # The router's online correction (actual / predicted, from a GET /admin/workers), if given.
        self.cost.correction.update(spec.get("correction") or {})
        self.max_seqs = int(spec.get("max_num_seqs") or 256)
        self.busy = False
        self.waiting: deque[_Flight] = deque()  # encode jobs, or prompts to prefill
        self.joining: deque[_Flight] = deque()  # handed-over sequences (decode)
        self.running: list[_Flight] = []

    @property
    def wid(self) -> str:
        return self.rec.worker_id

    def kick(self) -> None:
        if not self.busy:
            self._start()

    def _start(self) -> None:
        now, slow = self.sim.clock.now, self.sim.slowdown(self)
        if self.role == "encode":
            if not self.waiting:
                return
            f = self.waiting.popleft()
            mine = [i for i, w in enumerate(f.plan.encoders) if w == self.wid]
            s = self.cost.encode_s(len(mine), sum(f.req.image_tokens[i] for i in mine))
            self.busy = True
            self.sim.clock.at(now + s * slow, self._encoded, f)
            return
        while self.joining and len(self.running) < self.max_seqs:
            self.running.append(self.joining.popleft())
        chunks, budget, new, attn, encode = [], self.cost.budget, 0.0, 0.0, 0.0
        for f in self.waiting:
            if budget <= 0 or len(self.running) + len(chunks) >= self.max_seqs:
                break
            n = min(f.prefill_left, budget)
            chunks.append((f, n))
            new, attn, budget = new + n, attn + n * (f.prefill_done + n / 2), budget - n
            if f.prefill_done == 0 and f.own_images:
                encode += self.cost.encode_s(len(f.own_images), sum(f.req.image_tokens[i] for i in f.own_images))
        if not chunks and not self.running:
            return
        dctx = sum(f.req.prompt_tokens + len(f.tokens) for f in self.running)
        feats = (1.0, new, attn / 1e3, float(len(self.running)), dctx / 1e3)
        # Corrected as the router corrects a step: by its prefill ratio when it computes prompt tokens.
        fix = self.cost.correction["prefill" if new else "decode"]
        s = predict(self.cost.step, feats, STEP_FEATURES) * fix + encode
        self.busy = True
        self.sim.clock.at(now + s * slow, self._stepped, chunks, list(self.running))

    def _encoded(self, f: _Flight) -> None:
        self.busy = False
        self.sim.holdings.remove(f.rid, self.wid)
        f.encodes_left -= 1
        if f.encodes_left == 0:  # every image encoded: the prefill stage starts after its pulls
            self.sim.clock.at(self.sim.clock.now + PULL_S * len(f.req.image_tokens), self.sim.to_prefill, f)
        self._start()

    def _stepped(self, chunks, decoding) -> None:
        now = self.sim.clock.now
        self.busy = False
        for f, n in chunks:
            f.prefill_left -= n
            f.prefill_done += n
            if f.prefill_left == 0:
                self.waiting.remove(f)
                f.first_token = now
                f.tokens.append(0)
                if self.role == "prefill":
                    self.sim.holdings.remove(f.rid, self.wid)
                if f.req.output_tokens <= 1:
                    self.sim.finish(f, self)
                elif self.role == "mixed":
                    self.joining.append(f)
                else:
                    self.sim.clock.at(now + self.sim.handoff_s, self.sim.to_decode, f)
        for f in decoding:
            f.tokens.append(0)
            if len(f.tokens) >= f.req.output_tokens:
                self.running.remove(f)
                self.sim.finish(f, self)
        self.rec.running = len(self.running) + len(self.joining)
        self._start()


class Simulation:
    """One split under one policy: ``run(requests)`` -> the flights with their times."""

    def __init__(self, split: Split, step_spec: dict, encode_spec: dict, policy: str = "slo_aware",
                 slo: Slo | None = None, handoff_s: float = 0.005, hop_s: float = 0.0,
                 host_cores: float | None = None, threads: int = 1):
        self.clock = _Clock()
        self.registry = _Registry()
        self.holdings = Holdings()  # who runs what: the planner's queues read it
        self.flights: dict[str, _Flight] = {}
        self.slo = slo or Slo()
        self.planner = _SimPlanner(self.registry, self.flights, self.slo, self.clock)
        self.policy = make_policy(policy)
        self.handoff_s, self.hop_s = handoff_s, hop_s
        self.host_cores, self.threads = host_cores, threads
        self.workers: dict[str, _Worker] = {}
        fix = {"prefill": (step_spec.get("correction") or {}).get("prefill", 1.0),
               "decode": (step_spec.get("correction") or {}).get("decode", 1.0),
               "encode": (encode_spec.get("correction") or {}).get("encode", 1.0)}
        both = {"step": step_spec.get("step"), "encode": encode_spec.get("encode"), "correction": fix,
                **{k: step_spec[k] for k in ("token_budget", "max_num_seqs") if k in step_spec}}
        for role, n in (("encode", split.encode), ("prefill", split.prefill), ("decode", split.decode),
                        ("mixed", split.mixed)):
            # A prefill worker that must encode (no encoders) prices it like the encoders' profile.
            spec = {**both, "step": None} if role == "encode" else both
            for i in range(n):
                w = _Worker(self, f"{role}-{i}", role, spec)
                self.workers[w.wid] = w
                self.registry.workers[w.wid] = w.rec
        self._by_role = {r: [w.rec for w in self.workers.values() if w.role == r]
                         for r in ("encode", "prefill", "decode", "mixed")}

    def slowdown(self, worker: _Worker) -> float:
        if not self.host_cores:
            return 1.0
        busy = 1 + sum(1 for w in self.workers.values() if w.busy and w is not worker)
        return max(1.0, busy * self.threads / self.host_cores)

    def run(self, requests: list[SimRequest]) -> list[_Flight]:
        for i, r in enumerate(requests):
            self.clock.at(r.arrival + self.hop_s, self._arrive, _Flight(f"r{i}", r))
        self.clock.run()
        return [self.flights[f"r{i}"] for i in range(len(requests))]

    def _arrive(self, f: _Flight) -> None:
        self.flights[f.rid] = f
        req = f.req
        size = RequestSize(req.prompt_tokens, list(req.image_tokens), exact=False)
        prefills = self._by_role["prefill"] or self._by_role["mixed"]
        x = PlanInputs(req=None, size=size, todo=list(range(len(req.image_tokens))), encoders=self._by_role["encode"],
                       prefills=prefills, decodes=self._by_role["decode"], slo=self.slo,
                       max_tokens=req.output_tokens)
        f.plan = self.policy.plan(self.planner, x)
        f.plan.admitted_at = self.clock.now
        parts = {}
        for i, wid in enumerate(f.plan.encoders):
            if wid is not None:
                parts.setdefault(wid, []).append(i)
        if not parts:
            f.own_images = list(range(len(req.image_tokens)))
            self.to_prefill(f)
            return
        f.encodes_left = len(parts)
        for wid in parts:
            self._send(wid, f)
            self.workers[wid].waiting.append(f)
            self.workers[wid].kick()

    def _send(self, wid: str, f: _Flight) -> None:
        self.holdings.add(f.rid, wid)
        f.plan.started[wid] = self.clock.now

    def to_prefill(self, f: _Flight) -> None:
        w = self.workers[f.plan.prefill]
        f.prefill_left = f.req.prompt_tokens
        self._send(w.wid, f)
        w.waiting.append(f)
        w.kick()

    def to_decode(self, f: _Flight) -> None:
        w = self.workers[f.plan.decode]
        self._send(w.wid, f)
        w.joining.append(f)
        w.rec.running = len(w.running) + len(w.joining)
        w.kick()

    def finish(self, f: _Flight, w: _Worker) -> None:
        f.done = self.clock.now
        self.holdings.remove(f.rid, w.wid)


def attainment(flights: list[_Flight], slo: Slo) -> float:
    """The share of requests whose TTFT and TPOT (as epd-bench measures them) meet the SLO."""
    good = 0
    for f in flights:
        ttft = f.first_token - f.req.arrival
        n = len(f.tokens)
        tpot = (f.done - f.first_token) / (n - 1) if n > 1 else 0.0
        good += (slo.ttft_s is None or ttft <= slo.ttft_s) and (slo.tpot_s is None or tpot <= slo.tpot_s)
    return good / len(flights) if flights else 0.0
