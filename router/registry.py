"""Which workers exist, what they are, how loaded, and whether they still live.

A worker is known from its ready message; any message from it counts as a
sign of life; silence past ``heartbeat_timeout`` makes it dead. A worker that
re-registers with a new incarnation is a new peer (it lost all its state).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from bus.messages import Heartbeat, WorkerInfo


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
    in_flight: set[str] = field(default_factory=set)  # request ids the router has sent here

    @property
    def worker_id(self) -> str:
        return self.info.worker_id

    @property
    def role(self) -> str:
        return self.info.role

    @property
    def load(self) -> int:
        """Requests on the worker as far as the router knows (heartbeats lag dispatches)."""
        return max(self.running + self.waiting, len(self.in_flight))


class Registry:
    def __init__(self, heartbeat_timeout: float = 5.0):
        self.heartbeat_timeout = heartbeat_timeout
        self.workers: dict[str, WorkerRecord] = {}

    def register(self, info: WorkerInfo) -> WorkerRecord | None:
        """Add (or replace) a worker; returns the record it replaced, if any."""
        old = self.workers.get(info.worker_id)
        self.workers[info.worker_id] = WorkerRecord(info, time.monotonic(),
                                                    kv_blocks_total=info.num_kv_blocks)
        return old

    def seen(self, worker_id: str) -> WorkerRecord | None:
        rec = self.workers.get(worker_id)
        if rec is not None and rec.alive:
            rec.last_seen = time.monotonic()
        return rec

    def heartbeat(self, hb: Heartbeat) -> WorkerRecord | None:
        rec = self.workers.get(hb.worker_id)
        if rec is None or rec.info.incarnation != hb.incarnation or not rec.alive:
            return None
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
        return [w for w in self.workers.values() if w.alive and w.role == role]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for w in self.workers.values():
            if w.alive:
                out[w.role] = out.get(w.role, 0) + 1
        return out
