"""Which workers exist, what they are, how loaded, and whether they still live.

A worker is known from its ready message; any message from it counts as a
sign of life. Its state:

    alive --(a missed heartbeat, or a peer's failed pull against it)--> suspect
    suspect --(any message; a pull report holds it ``suspect_hold_s``)--> alive
    alive / suspect --(silence past ``heartbeat_timeout``, or its connection gone)--> dead

Suspect workers get no new work; dead ones lose everything they held. A live
role switch (``router.role_switch``) takes a worker through ``draining`` (no new
work of its old role) and ``switching`` (loading its new role) back to
``active``; it counts as a worker that may come back for its new role. A worker
that registers again with a new incarnation is a new peer (it restarted and lost
all its state); with the same incarnation it is the same peer finding a
restarted router. A supervisor may declare a worker given up (crash loop).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from bus.messages import Heartbeat, WorkerInfo
from router.holdings import Holdings


@dataclass
class WorkerRecord:
    info: WorkerInfo
    last_seen: float
    alive: bool = True
    running: int = 0
    waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    images_encoded: int = 0
    prefix_hit_tokens: int = 0
    prefix_query_tokens: int = 0
    transfer_pulls: dict[str, int] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)  # bus.messages.CACHE_COUNTERS
    suspect_until: float = 0.0  # a peer reported a failed pull against it: no new work until then
    suspect_why: str = ""
    switch: str = "active"  # "active", or a role switch under way: "draining", then "switching"
    switch_to: str | None = None  # the role it is switching to
    # Who runs what (shared by every record of a registry): ``in_flight`` and ``load`` read it.
    holdings: Holdings = field(default_factory=Holdings, repr=False, compare=False)

    @property
    def worker_id(self) -> str:
        return self.info.worker_id

    @property
    def role(self) -> str:
        return self.info.role

    @property
    def in_flight(self) -> frozenset[str]:
        """Request ids the router has sent here that run here now (``router.holdings``)."""
        return self.holdings.requests_of(self.worker_id)

    @property
    def load(self) -> int:
        """Requests on the worker as far as the router knows (heartbeats lag dispatches)."""
        return max(self.running + self.waiting, self.holdings.count(self.worker_id))


class Registry:
    def __init__(self, heartbeat_timeout: float = 5.0, suspect_after: float | None = None,
                 suspect_hold_s: float | None = None):
        self.heartbeat_timeout = heartbeat_timeout
        # Heartbeats come every second: two missed make a worker suspect.
        self.suspect_after = suspect_after if suspect_after is not None else min(2.5, heartbeat_timeout / 2)
        self.suspect_hold_s = suspect_hold_s if suspect_hold_s is not None else heartbeat_timeout
        self.workers: dict[str, WorkerRecord] = {}
        self.restarts: dict[str, int] = {}  # worker id -> registrations with a new incarnation
        self.given_up: dict[str, str] = {}  # worker id -> why its supervisor stopped restarting it
        self.holdings = Holdings()  # which worker runs / holds which request

    def register(self, info: WorkerInfo) -> tuple[WorkerRecord, WorkerRecord | None]:
        """Add (or replace) a worker: (its record, the record of an older incarnation it replaced).

        The same incarnation again (the worker reconnected) keeps its record and brings it back."""
        old = self.workers.get(info.worker_id)
        now = time.monotonic()
        if old is not None and old.info.incarnation == info.incarnation:
            if info.epoch < old.info.epoch:  # sent before a role switch it has since announced
                return old, None
            old.info, old.last_seen, old.alive = info, now, True
            return old, None
        if old is not None:
            self.restarts[info.worker_id] = self.restarts.get(info.worker_id, 0) + 1
        self.given_up.pop(info.worker_id, None)
        rec = self.workers[info.worker_id] = WorkerRecord(info, now, kv_blocks_total=info.num_kv_blocks,
                                                          holdings=self.holdings)
        return rec, old

    def state(self, rec: WorkerRecord, now: float | None = None) -> str:
        """"alive", "suspect" or "dead"."""
        if not rec.alive:
            return "dead"
        now = time.monotonic() if now is None else now
        if now < rec.suspect_until or now - rec.last_seen > self.suspect_after:
            return "suspect"
        return "alive"

    def suspect(self, rec: WorkerRecord, why: str) -> None:
        """A peer could not pull from ``rec``: no new work for it for ``suspect_hold_s``."""
        rec.suspect_until = time.monotonic() + self.suspect_hold_s
        rec.suspect_why = why

    def seen(self, worker_id: str) -> WorkerRecord | None:
        rec = self.workers.get(worker_id)
        if rec is not None and rec.alive:
            rec.last_seen = time.monotonic()
        return rec

    def heartbeat(self, hb: Heartbeat) -> WorkerRecord | None:
        rec = self.workers.get(hb.worker_id)
        if rec is None or rec.info.incarnation != hb.incarnation:
            return None
        if hb.epoch != rec.info.epoch:  # of another role epoch: its figures describe another role
            rec.last_seen = time.monotonic()
            return None
        rec.alive = True  # declared dead while only slow: back, holding nothing of before
        rec.last_seen = time.monotonic()
        rec.running, rec.waiting = hb.running, hb.waiting
        rec.kv_blocks_used, rec.kv_blocks_total = hb.kv_blocks_used, hb.kv_blocks_total
        rec.images_encoded = hb.images_encoded
        rec.prefix_hit_tokens, rec.prefix_query_tokens = hb.prefix_hit_tokens, hb.prefix_query_tokens
        rec.transfer_pulls = dict(hb.transfer_pulls)
        rec.counters = dict(hb.counters)
        return rec

    def expire(self) -> list[WorkerRecord]:
        """Mark silent workers dead; returns those that just died."""
        now, dead = time.monotonic(), []
        for rec in self.workers.values():
            if rec.alive and now - rec.last_seen > self.heartbeat_timeout:
                rec.alive = False
                dead.append(rec)
        return dead

    def alive(self, role: str) -> list[WorkerRecord]:
        """Workers of ``role`` that may take new work (neither suspect nor dead nor switching)."""
        now = time.monotonic()
        return [w for w in self.workers.values()
                if w.role == role and w.switch == "active" and self.state(w, now) == "alive"]

    def may_return(self, role: str) -> list[WorkerRecord]:
        """Workers not serving ``role`` now that may still come back to it (not given up): suspect,
        dead or restarting ones of that role, and those switching to it."""
        now = time.monotonic()
        return [w for w in self.workers.values()
                if (w.switch_to or w.role) == role and w.worker_id not in self.given_up
                and (w.switch != "active" or self.state(w, now) != "alive")]

    def health_view(self) -> dict[str, dict]:
        """For ``/health``: worker id -> its role, state, load, incarnation, device, pid, restarts
        (and why it was given up, or is suspect)."""
        now = time.monotonic()
        return {w.worker_id: {"role": w.role, "alive": w.alive, "state": self.state(w, now), "load": w.load,
                              "incarnation": w.info.incarnation, "device": w.info.device, "pid": w.info.pid,
                              "restarts": self.restarts.get(w.worker_id, 0),
                              **({"given_up": self.given_up[w.worker_id]} if w.worker_id in self.given_up else {}),
                              **({"suspect": w.suspect_why} if now < w.suspect_until else {})}
                for w in self.workers.values()}

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for w in self.workers.values():
            if w.alive:
                out[w.role] = out.get(w.role, 0) + 1
        return out
