"""Automatic role allocation: every ``interval_s`` the router moves at most one worker to the
stage that most needs it, through the admin switch's own path (``router.role_switch``: drain,
hand-over, epochs, the 409 rules).

Config ``router.autoscale: {enabled, interval_s, cooldown_s, min_per_role, persist, margin,
min_backlog_s, drain_s}`` (off by default). Each interval it reads, per stage (encode, prefill,
decode: roles the deployment has; mixed workers never move):

- the **backlog**: predicted seconds of work each worker holds and has not run (the planner's
  cost models: ``Planner.queue_s`` for encoders and prefill workers; for decode workers the
  tokens still to come times the predicted step of their batch), and what it would be per
  worker with one worker more or one fewer (E/P: the work split over n +- 1; D: the step of the
  batch spread over n +- 1 workers, which is far from linear on a CPU);
- the **SLO attainment** of the requests that finished lately (``PlanMetrics``): TTFT misses
  point at encode/prefill, TPOT misses at decode; when every request with an SLO met it, no move.

:func:`decide` (pure: loads in, decision out) picks the receiver (the stage with the largest
backlog per worker, at least ``min_backlog_s``) and the donor (the stage whose backlog per worker
would be least with one worker fewer, keeping ``min_per_role``), and moves one worker only if
that cuts the receiver's backlog per worker by ``margin`` without making the donor the new worst
stage. Hysteresis: the same move must win ``persist`` intervals in a row. Cool-down: no decision
while a switch runs nor within ``cooldown_s`` after one ends. Each decision is logged with its
reason and counted in ``epd:autoscale_decisions_total{from,to,reason}``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field, fields

from router.backend import ApiError

log = logging.getLogger("epd.router")
STAGES = ("encode", "prefill", "decode")
DEFAULT_MAX_TOKENS = 128  # a request without max_tokens: its decode is guessed this long


@dataclass(frozen=True)
class AutoscaleConfig:
    enabled: bool = False
    interval_s: float = 2.0
    cooldown_s: float = 20.0  # after a switch ends, before the next decision
    min_per_role: int = 1  # never fewer live workers of a stage the deployment has
    persist: int = 3  # intervals the same move must be the best in a row (hysteresis)
    margin: float = 0.3  # the move must cut the receiver's backlog per worker by this share
    min_backlog_s: float = 1.0  # a stage with less predicted work per worker needs no help
    drain_s: float | None = None  # the switch's drain deadline (None: the router's switch_drain_s)

    def __post_init__(self):
        if self.interval_s <= 0 or self.cooldown_s < 0 or self.persist < 1 or self.min_per_role < 1:
            raise ValueError("autoscale: interval_s > 0, cooldown_s >= 0, persist >= 1, min_per_role >= 1")
        if not 0 <= self.margin < 1 or self.min_backlog_s < 0:
            raise ValueError("autoscale: margin in [0, 1), min_backlog_s >= 0")

    @classmethod
    def from_dict(cls, d: dict | bool | None) -> AutoscaleConfig:
        if not isinstance(d, dict):
            return cls(enabled=bool(d))
        known = {f.name for f in fields(cls)}
        bad = set(d) - known
        if bad:
            raise ValueError(f"autoscale: unknown keys {sorted(bad)}; known: {sorted(known)}")
        return cls(**{"enabled": True, **d})


@dataclass
class StageLoad:
    """One stage's predicted backlog per worker now, with one worker more, with one fewer."""

    role: str
    workers: dict[str, float]  # live active worker id -> its own backlog, seconds
    now_s: float
    more_s: float
    less_s: float  # inf when it has one worker

    @property
    def count(self) -> int:
        return len(self.workers)


@dataclass
class Decision:
    worker_id: str
    from_role: str
    to_role: str
    reason: str  # "backlog", "ttft_slo", "tpot_slo": a small label set for /metrics
    detail: str


@dataclass
class ControllerState:
    """What :func:`decide` remembers between intervals."""

    candidate: tuple[str, str] | None = None  # (from, to) of the best move of the last interval
    streak: int = 0
    last_switch_at: float = -math.inf  # a switch was decided or still ran at this time
    hold: str = ""  # why the last interval made no move (for the log and tests)


def decide(loads: dict[str, StageLoad], slo: dict[str, tuple[int, int]], state: ControllerState, now: float,
           cfg: AutoscaleConfig, busy: bool = False) -> Decision | None:
    """One interval: the move to make now, or None (``state.hold`` says why).

    ``loads``: the stages the deployment has; ``slo``: metric ("ttft", "tpot") -> (met, missed)
    over the recent window; ``busy``: a role switch is under way.
    """
    if busy:
        state.last_switch_at = now
        return _hold(state, "a switch is under way")
    if now - state.last_switch_at < cfg.cooldown_s:
        return _hold(state, f"cooling down ({now - state.last_switch_at:.1f} of {cfg.cooldown_s:.0f} s)")
    move = _best_move(loads, slo, cfg, state)
    if move is None:
        return _hold(state, state.hold)
    src, dst, reason, detail = move
    if state.candidate == (src, dst):
        state.streak += 1
    else:
        state.candidate, state.streak = (src, dst), 1
    if state.streak < cfg.persist:
        state.hold = f"{src} -> {dst} wanted {state.streak} of {cfg.persist} intervals ({detail})"
        return None
    worker = min(loads[src].workers, key=lambda w: (loads[src].workers[w], w))  # the quickest to drain
    state.candidate, state.streak, state.last_switch_at, state.hold = None, 0, now, ""
    return Decision(worker, src, dst, reason, detail)


def _hold(state: ControllerState, why: str) -> None:
    state.candidate, state.streak, state.hold = None, 0, why
    return None


def _best_move(loads, slo, cfg, state) -> tuple[str, str, str, str] | None:
    ttft_missed, tpot_missed = slo.get("ttft", (0, 0))[1], slo.get("tpot", (0, 0))[1]
    judged = sum(sum(v) for v in slo.values())
    if judged and not ttft_missed and not tpot_missed:
        state.hold = "every recent request met its SLO"
        return None
    receivers, reason = list(loads), "backlog"
    if ttft_missed > tpot_missed:  # late first tokens: encode or prefill queues
        receivers, reason = [r for r in loads if r != "decode"], "ttft_slo"
    elif tpot_missed > ttft_missed:
        receivers, reason = [r for r in loads if r == "decode"], "tpot_slo"
    receivers = [r for r in receivers if loads[r].now_s >= cfg.min_backlog_s and loads[r].now_s > 0]
    if not receivers:
        state.hold = f"no stage has {cfg.min_backlog_s:g} s of predicted work per worker ({_show(loads)})"
        return None
    dst = max(receivers, key=lambda r: (loads[r].now_s, r))
    donors = [r for r in loads if r != dst and loads[r].count - 1 >= cfg.min_per_role]
    if not donors:
        state.hold = f"{dst} needs a worker but every other stage is at min_per_role {cfg.min_per_role}"
        return None
    src = min(donors, key=lambda r: (loads[r].less_s, r))
    gain = 1 - max(loads[dst].more_s, loads[src].less_s) / loads[dst].now_s
    if gain < cfg.margin:
        state.hold = (f"moving a {src} worker to {dst} would cut the worst backlog by {gain:.0%} "
                      f"< margin {cfg.margin:.0%} ({_show(loads)})")
        return None
    detail = (f"{dst} backlog {loads[dst].now_s:.2f} s/worker -> {loads[dst].more_s:.2f}, {src} "
              f"{loads[src].now_s:.2f} -> {loads[src].less_s:.2f}; SLO missed ttft {ttft_missed} tpot {tpot_missed}"
              f" of {judged}")
    return src, dst, reason, detail


def _show(loads) -> str:
    return ", ".join(f"{r} {x.now_s:.2f} s x{x.count}" for r, x in loads.items())


# ---- reading the router ---------------------------------------------------------------------
def read_loads(core, now: float | None = None) -> dict[str, StageLoad]:
    """Each stage's backlog from the router's flights and cost models (stages with a live active
    worker only; a stage mid-switch is seen by its remaining workers)."""
    now = time.monotonic() if now is None else now
    reg, planner, out = core.registry, core.planner, {}
    for role in STAGES:
        recs = reg.alive(role)
        if not recs:
            continue
        if role == "decode":
            out[role] = _decode_load(core, recs)
            continue
        own = {r.worker_id: planner.queue_s(r, now) for r in recs}
        total, n = sum(own.values()), len(recs)
        out[role] = StageLoad(role, own, total / n, total / (n + 1), total / (n - 1) if n > 1 else math.inf)
    return out


def _decode_load(core, recs) -> StageLoad:
    """Decode: the tokens still to come (mean per sequence) times the step of the batch each worker
    would run if the stage's sequences were spread over n, n + 1 or n - 1 workers."""
    planner, own, seqs, ctx, left = core.planner, {}, 0, 0, []
    for rec in recs:
        b, c = planner.decode_load(rec)
        r = [_left(core.flights.get(rid)) for rid in core.holdings.requests_of(rec.worker_id)]
        own[rec.worker_id] = (sum(r) / len(r) if r else 0.0) * planner.cost(rec).decode_step_s(b, c) if b else 0.0
        seqs, ctx, left = seqs + b, ctx + c, left + r
    n, cost = len(recs), planner.cost(recs[0])
    mean_left = sum(left) / len(left) if left else 0.0

    def per_worker(k: int) -> float:
        if k <= 0:
            return math.inf
        return mean_left * cost.decode_step_s(math.ceil(seqs / k), ctx // k) if seqs else 0.0

    return StageLoad("decode", own, per_worker(n), per_worker(n + 1), per_worker(n - 1))


def _left(flight) -> int:
    if flight is None:
        return 0
    max_tokens = (flight.req.sampling or {}).get("max_tokens") or DEFAULT_MAX_TOKENS
    return max(int(max_tokens) - len(flight.tokens), 0)


@dataclass
class _SloWindow:
    """Met / missed counts of the last ``n`` intervals, from PlanMetrics' counters."""

    n: int
    last: dict[str, tuple[float, float]] = field(default_factory=dict)
    rows: deque = field(default_factory=deque)

    def update(self, plan_metrics) -> dict[str, tuple[int, int]]:
        now = {k: (_count(plan_metrics.attained, k), _count(plan_metrics.missed, k)) for k in ("ttft", "tpot")}
        self.rows.append({k: (v[0] - self.last.get(k, (0, 0))[0], v[1] - self.last.get(k, (0, 0))[1])
                          for k, v in now.items()})
        self.last = now
        while len(self.rows) > self.n:
            self.rows.popleft()
        return {k: (int(sum(r[k][0] for r in self.rows)), int(sum(r[k][1] for r in self.rows))) for k in now}


def _count(counter, metric: str) -> float:
    for fam in counter.collect():
        for s in fam.samples:
            if s.name.endswith("_total") and s.labels.get("metric") == metric:
                return s.value
    return 0.0


class Autoscaler:
    """The router's controller task: reads loads, decides, asks ``core.switches`` for the move."""

    def __init__(self, core, cfg: AutoscaleConfig, registry=None):
        self.core, self.cfg = core, cfg
        self.state = ControllerState()
        self.window = _SloWindow(cfg.persist)
        self.decisions: list[dict] = []  # every decision made (``GET /admin/autoscale``, tests)
        self.counter = None
        if registry is not None:
            from prometheus_client import Counter, Gauge

            self.counter = Counter("epd:autoscale_decisions", "Role moves decided by the autoscaler, by old "
                                   "and new role and reason.", ["from", "to", "reason"], registry=registry)
            self.backlog = Gauge("epd:autoscale_backlog_seconds", "Predicted backlog per worker of each stage, "
                                 "as the autoscaler last read it.", ["role"], registry=registry)

    async def run(self) -> None:
        log.info("autoscale on: every %.1f s, cool-down %.0f s, %d interval(s) to decide, margin %.0f%%, "
                 "min %d per role", self.cfg.interval_s, self.cfg.cooldown_s, self.cfg.persist, self.cfg.margin * 100,
                 self.cfg.min_per_role)
        while True:
            await asyncio.sleep(self.cfg.interval_s)
            try:
                self.step()
            except Exception:  # noqa: BLE001 - one bad interval must not end the controller
                log.exception("autoscale interval failed")

    def step(self, now: float | None = None) -> Decision | None:
        now = time.monotonic() if now is None else now
        loads = read_loads(self.core, now)
        slo = self.window.update(self.core.plan_metrics)
        busy = any(w.switch != "active" for w in self.core.registry.workers.values())
        if self.counter is not None:
            for role, x in loads.items():
                self.backlog.labels(role=role).set(x.now_s)
        d = decide(loads, slo, self.state, now, self.cfg, busy)
        if d is None:
            log.debug("autoscale: no move: %s", self.state.hold)
            return None
        try:
            out = self.core.switches.request(d.worker_id, d.to_role, self.cfg.drain_s)
        except ApiError as e:  # e.g. the worker died meanwhile: the next interval reads again
            log.warning("autoscale: %s -> %s refused: %s", d.worker_id, d.to_role, e)
            self.state.last_switch_at = -math.inf
            return None
        log.info("autoscale: %s %s -> %s (%s): %s; epoch %d", d.worker_id, d.from_role, d.to_role, d.reason,
                 d.detail, out["epoch"])
        if self.counter is not None:
            self.counter.labels(d.from_role, d.to_role, d.reason).inc()
        self.decisions.append({"at": time.time(), "worker_id": d.worker_id, "from": d.from_role, "to": d.to_role,
                               "reason": d.reason, "detail": d.detail})
        return d
