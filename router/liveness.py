"""Keeping the registry true to the workers: registrations (a new incarnation is a restart),
heartbeats, a supervisor giving a worker up, peers' failed pulls, and the check every half
second that expires silent workers and pings the others (a closed connection shows at once).

A component of ``RouterCore``. Whatever an incarnation held when it died or restarted is the
core's to move: ``lost(rec, why)`` tells it. ``registered(rec, old_role)`` is told of every
``WorkerReady`` taken (a role switch waits for one).
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable

from bus import messages as m
from bus.sockets import PeerGone
from router.plan import Planner
from router.registry import Registry, WorkerRecord

log = logging.getLogger("epd.router")

# These mind the worker's liveness themselves (or come from its supervisor).
_NOT_SEEN = (m.WorkerReady, m.WorkerGaveUp, m.Heartbeat, m.PullFailed)


class Liveness:
    def __init__(self, registry: Registry, planner: Planner, send: Callable[[str, object], Awaitable[None]],
                 router_id: str, lost: Callable[[WorkerRecord, str], None],
                 registered: Callable[[WorkerRecord, str | None], None]):
        self.registry, self.planner, self._send, self.router_id = registry, planner, send, router_id
        self._lost, self._registered = lost, registered

    # ---- the worker's messages ----------------------------------------------------------------
    def seen(self, wid: str, msg) -> None:
        """Any other message from a worker is a sign of life."""
        if not isinstance(msg, _NOT_SEEN):
            self.registry.seen(wid)

    async def on_ready(self, wid: str, msg: m.WorkerReady) -> None:
        prev = self.registry.workers.get(wid)
        old_role = prev.role if prev is not None else None
        rec, old = self.registry.register(msg.info)
        if rec.info is not msg.info:
            return  # of a role epoch it has left since
        self._registered(rec, old_role)
        self.planner.on_ready(msg.info)
        if old is not None:
            self._lost(old, "it restarted")
        log.info("worker %s registered: %s on %s%s", wid, msg.info.role, msg.info.device,
                 "" if old is None else f" (restart {self.registry.restarts.get(wid, 0)})")

    async def on_gave_up(self, wid: str, msg: m.WorkerGaveUp) -> None:
        self.registry.given_up[msg.worker_id] = msg.reason or f"{msg.restarts} restarts"
        log.error("worker %s given up by its supervisor: %s", msg.worker_id, msg.reason)

    def on_heartbeat(self, wid: str, msg: m.Heartbeat) -> WorkerRecord | None:
        """The record it updated (None: of an unknown incarnation or another role epoch)."""
        was_dead = (rec := self.registry.workers.get(msg.worker_id)) is not None and not rec.alive
        rec = self.registry.heartbeat(msg)
        self.planner.on_heartbeat(msg)
        if rec is not None and was_dead:
            log.warning("worker %s is back (it was only silent)", wid)
        return rec

    async def on_pull_failed(self, wid: str, msg: m.PullFailed) -> None:
        for rec in self.registry.workers.values():
            if rec.alive and rec.info.transfer == msg.holder:
                log.warning("worker %s is suspect: %s could not pull from it (%s)", rec.worker_id, wid, msg.reason)
                self.registry.suspect(rec, f"{wid} could not pull from it: {msg.reason}")

    # ---- deaths -------------------------------------------------------------------------------
    async def check(self) -> None:
        """Expire silent workers; ping the others."""
        for rec in self.registry.expire():  # marked dead there: what it held is lost all the same
            self._dead(rec, f"no heartbeat for {self.registry.heartbeat_timeout:.0f} s")
        ping = m.Ping(router_id=self.router_id)
        for rec in [w for w in self.registry.workers.values() if w.alive]:
            try:
                await self._send(rec.worker_id, ping)
            except PeerGone:
                self.died(rec, "its connection closed")

    def died(self, rec: WorkerRecord, why: str) -> None:
        if rec.alive:
            rec.alive = False
            self._dead(rec, why)

    def _dead(self, rec: WorkerRecord, why: str) -> None:
        log.error("%s worker %s is dead: %s", rec.role, rec.worker_id, why)
        self._lost(rec, why)
