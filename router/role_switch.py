"""Live role switching: a worker becomes encode, prefill or decode without a restart.

``POST /admin/workers/{id}/role`` -> :meth:`RoleSwitcher.request` (202 with the new epoch):

    active --request--> draining    no new work of its old role (``Registry.alive`` skips it);
                                    what it runs finishes. Past ``drain_s``, requests it still
                                    holds are handed over through the recovery path (a decode
                                    resumes on another decode worker from prompt + tokens sent:
                                    the attempt id changes, so the old owner's late output is
                                    dropped and no token is lost or duplicated)
    draining --nothing left--> switching    ``SwitchRole(role, epoch)`` to the worker: it waits
                                    for its engine to idle, loads what the new role needs, frees
                                    the rest, profiles its costs for the role, and announces
                                    ``WorkerReady`` with the new role and epoch
    switching --WorkerReady(epoch)--> active in the new role: the cluster index forgets what it
                                    held, the planner takes its new cost model, work resumes

Refused (409) when the worker is the last live one of its role, is not alive, already has
that role, or is switching already. Messages of an older epoch (heartbeats, cache events,
a late ``WorkerReady``) are dropped (``router.registry``, ``router.cluster_cache``). A worker
that dies while switching is handled like any dead worker; its supervisor restarts it in
the role of its command line.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

from bus import messages as m
from router.backend import ApiError
from router.cluster_index import ClusterIndex
from router.flight import Flight, Flights
from router.registry import Registry, WorkerRecord

log = logging.getLogger("epd.router")

SWITCHABLE = ("encode", "prefill", "decode")
POLL_S = 0.05


class RoleSwitcher:
    """A component of ``RouterCore``. It reads the registry, the flights and ``Holdings``; it tells
    the worker through ``send(worker id, message)``, runs its switches as tasks through ``spawn``,
    and moves a request off a draining worker through ``hand_over(flight, stage, why)`` (the core's
    recovery path, not charged to the request's retry budget). ``expected`` is the deployment's
    roles that ``/health`` waits for (a switch moves one); ``worker_metrics`` forgets a worker's
    series of its old role."""

    def __init__(self, registry: Registry, flights: Flights, index: ClusterIndex,
                 send: Callable[[str, object], Awaitable[None]], spawn: Callable[[Awaitable], None],
                 hand_over: Callable[[Flight, str, str], Awaitable[None]], expected: dict[str, int],
                 worker_metrics=None, drain_s: float = 30.0, ready_timeout_s: float = 600.0):
        self.registry, self.holdings, self.flights, self.index = registry, registry.holdings, flights, index
        self._send, self._spawn, self._hand_over_one = send, spawn, hand_over
        self.expected, self.worker_metrics = expected, worker_metrics
        self.drain_s = drain_s  # past this, what the worker still holds is handed over
        self.ready_timeout_s = ready_timeout_s  # a worker silent this long after SwitchRole: given up
        self.metrics = None  # router.metrics.RoleSwitchMetrics, set by the server
        self._ready: dict[str, tuple[int, asyncio.Future]] = {}  # worker id -> (epoch, its announcement)

    # ---- the admin call -------------------------------------------------------------------------
    def request(self, worker_id: str, role: str, drain_s: float | None = None) -> dict:
        """Start switching ``worker_id`` to ``role``; raises ApiError 400 / 404 / 409."""
        if role not in SWITCHABLE:
            raise ApiError(400, f"'role' must be one of {', '.join(SWITCHABLE)}, not {role!r}", param="role")
        if drain_s is not None and not (isinstance(drain_s, (int, float)) and 0 <= drain_s <= 3600):
            raise ApiError(400, "'drain_s' must be a number of seconds in [0, 3600]", param="drain_s")
        reg = self.registry
        rec = reg.workers.get(worker_id)
        if rec is None:
            raise ApiError(404, f"no worker {worker_id!r}", code="worker_not_found")
        if rec.switch != "active":
            raise ApiError(409, f"a switch of {worker_id} to {rec.switch_to} is already under way ({rec.switch})",
                           code="switch_in_progress")
        if reg.state(rec) != "alive" or worker_id in reg.given_up:
            raise ApiError(409, f"{worker_id} is {reg.state(rec)}: only a live worker can switch", code="not_alive")
        if rec.role == role:
            raise ApiError(409, f"{worker_id} is a {role} worker already", code="same_role")
        if rec.role not in SWITCHABLE:
            raise ApiError(409, f"{worker_id} is a {rec.role} worker; only encode, prefill and decode workers "
                                f"switch", code="not_switchable")
        if not [w for w in reg.alive(rec.role) if w is not rec]:
            raise ApiError(409, f"{worker_id} is the last live {rec.role} worker: switching it would leave "
                                f"no {rec.role} worker", code="last_of_role")
        epoch = rec.info.epoch + 1
        rec.switch, rec.switch_to = "draining", role
        self._spawn(self._run(rec, role, epoch, self.drain_s if drain_s is None else float(drain_s)))
        log.info("role switch: %s %s -> %s (epoch %d), draining", worker_id, rec.role, role, epoch)
        return {"worker_id": worker_id, "from": rec.role, "role": role, "epoch": epoch, "state": rec.switch}

    # ---- the switch ---------------------------------------------------------------------------
    async def _run(self, rec: WorkerRecord, role: str, epoch: int, drain_s: float) -> None:
        wid, incarnation, old = rec.worker_id, rec.info.incarnation, rec.role
        t0 = time.monotonic()
        handed, fut = False, None
        try:
            while self._holds(rec, strict=not handed):
                if not self._same(rec, incarnation):
                    return
                if not handed and time.monotonic() - t0 > drain_s:
                    handed = True
                    self._hand_over(rec)
                self._forget_finished(rec)
                await asyncio.sleep(POLL_S)
            drained = time.monotonic() - t0
            if not self._same(rec, incarnation):
                return
            rec.switch = "switching"
            # What it held in its old role is about to be freed: no more hints that point at it.
            self.index.forget_worker(wid)
            fut = asyncio.get_running_loop().create_future()
            self._ready[wid] = (epoch, fut)
            await self._send(wid, m.SwitchRole(role=role, epoch=epoch))
            ready_by = time.monotonic() + self.ready_timeout_s
            while not fut.done():  # a worker that dies meanwhile ends the switch (its record says why)
                if not self._same(rec, incarnation):
                    return
                if time.monotonic() > ready_by:
                    raise asyncio.TimeoutError
                await asyncio.wait({fut}, timeout=0.5)
            total = time.monotonic() - t0
            log.info("role switch: %s %s -> %s (epoch %d) in %.2f s (drain %.2f s%s)", wid, old, role, epoch,
                     total, drained, ", requests handed over" if handed else "")
            if self.metrics is not None:
                self.metrics.done(old, role, drained, total)
        except asyncio.TimeoutError:
            log.error("role switch: %s did not announce itself as %s within %.0f s", wid, role, self.ready_timeout_s)
        except Exception:  # noqa: BLE001 - the worker stays as it was; logged
            log.exception("role switch of %s failed", wid)
        finally:
            if self._ready.get(wid, (None, None))[1] is fut:
                self._ready.pop(wid, None)
            if self.registry.workers.get(wid) is rec:
                rec.switch, rec.switch_to = "active", None

    def _same(self, rec: WorkerRecord, incarnation: str) -> bool:
        """Still the live incarnation the switch began with (a death or restart ends the switch)."""
        return self.registry.workers.get(rec.worker_id) is rec and rec.alive and \
            rec.info.incarnation == incarnation

    def _holds(self, rec: WorkerRecord, strict: bool) -> bool:
        """Work of its old role still on ``rec``: requests it runs, KV parked for a decode, or (an
        encoder, ``strict``) embeddings a prefill is still to pull."""
        if self.holdings.count(rec.worker_id):
            return True
        wid, card = rec.worker_id, rec.info.transfer
        for f in self.flights.values():
            if f.done:
                continue
            if (f.kv is not None and f.kv[0] == wid) or (f.owner is not None and f.owner[0] == wid):
                return True
            if strict and f.stage in ("encode", "prefill") and any(r.holder == card for r in f.refs):
                return True
        return False

    def _hand_over(self, rec: WorkerRecord) -> None:
        """Past the drain deadline: every request ``rec`` still runs or parks KV for moves elsewhere
        through the recovery path (not charged to its retry budget). An encoder's embeddings that
        a prefill has yet to pull are not waited for: that prefill encodes the raw image instead."""
        wid, n = rec.worker_id, 0
        for f in list(self.flights.values()):
            if f.done:
                continue
            holds = (f.kv is not None and f.kv[0] == wid) or (f.owner is not None and f.owner[0] == wid)
            if holds and f.stage != "encode":
                n += 1
                self._spawn(self._hand_over_one(f, f.stage, f"{wid} is switching role"))
        log.warning("role switch: %s still held work after the drain deadline; %d request(s) handed over", wid, n)

    def _forget_finished(self, rec: WorkerRecord) -> None:
        for rid in self.holdings.requests_of(rec.worker_id):
            f = self.flights.get(rid)
            if f is None or f.done:  # finished or left while it drained
                self.holdings.remove(rid, rec.worker_id)

    # ---- the worker's messages ----------------------------------------------------------------
    def on_ready(self, rec: WorkerRecord, old_role: str | None) -> None:
        """A ``WorkerReady`` was registered: if it is the announcement a switch waits for (its
        epoch), the worker serves its new role from now on."""
        want = self._ready.get(rec.worker_id)
        if want is None or rec.info.epoch != want[0] or want[1].done():
            return
        rec.kv_blocks_total, rec.kv_blocks_used, rec.running, rec.waiting = rec.info.num_kv_blocks, 0, 0, 0
        self.index.forget_worker(rec.worker_id)  # events of the old role that came meanwhile
        exp = self.expected  # /health waits for the roles a deployment expects: one moved
        if old_role and exp.get(old_role):
            exp[old_role] -= 1
            exp[rec.role] = exp.get(rec.role, 0) + 1
        if self.worker_metrics is not None and hasattr(self.worker_metrics, "forget_role") and old_role:
            self.worker_metrics.forget_role(rec.worker_id, old_role)
        want[1].set_result(None)

    def view(self, rec: WorkerRecord) -> dict:
        """For ``GET /admin/workers``: the switch state and epoch."""
        return {"role_state": rec.switch, "epoch": rec.info.epoch,
                **({"switching_to": rec.switch_to} if rec.switch_to else {})}
