"""A worker's side of a live role switch (the router's side: ``router.role_switch``).

``SwitchRole(role, epoch)`` comes once the router has drained the worker: it sends no
more work of the old role and has handed over what ran past its deadline. The worker

1. waits for its engine to finish what is left (at most ``IDLE_WAIT_S``; anything still
   there after that is orphaned -- the router dropped or moved it -- and is aborted);
2. on the engine thread: ``LLMEngine.switch_role`` where the engine has it (it loads what
   the new role needs and frees the rest); an engine without it holds the whole model, so
   every role already runs on it as is;
3. measures its costs for the new role (``stages.profiler``, cached on disk);
4. sets up the per-role state of its peer cache (``stages.peer_cache.PeerCache.enter_role``) and
   announces ``WorkerReady`` with the new role and epoch. Heartbeats and cache events carry the epoch.
"""

from __future__ import annotations

import asyncio
import logging
import time

from bus import messages as m
from stages import profiler

log = logging.getLogger("epd.stage")
IDLE_WAIT_S = 10.0


class RoleSwitchMixin:
    """Needs from its host: ``engine``, ``threads``, ``sock``, ``info``, ``role``, ``epoch``,
    ``peer_cache``, ``args``, ``stop``."""

    async def _switch_role(self, msg: m.SwitchRole) -> None:
        try:
            await self._switch(msg)
        except Exception:  # noqa: BLE001 - half a switch leaves the engine in no known role
            log.exception("role switch to %s failed; the worker exits (its supervisor starts it again)", msg.role)
            self.stop()

    async def _switch(self, msg: m.SwitchRole) -> None:
        if msg.epoch <= self.epoch:
            log.warning("ignoring a switch to %s of epoch %d (at epoch %d)", msg.role, msg.epoch, self.epoch)
            return
        t0 = time.perf_counter()
        old = self.role
        deadline = time.monotonic() + IDLE_WAIT_S
        while await self.threads.call(lambda e: e.has_unfinished_requests() or bool(e.handoffs)):
            if time.monotonic() > deadline:
                left = await self.threads.call(lambda e: [*e.requests, *e.handoffs])
                log.warning("role switch: aborting %d request(s) the router no longer waits for", len(left))
                await self.threads.call(lambda e: [e.abort_request(r) for r in left])
                break
            await asyncio.sleep(0.05)
        idle = time.perf_counter() - t0

        def switch(e):
            figures = e.switch_role(msg.role) if hasattr(e, "switch_role") else {}
            return figures, profiler.profile(e, msg.role, use_cache=not self.args.no_profile_cache)

        figures, cost_model = await self.threads.call(switch)
        self.peer_cache.enter_role(msg.role, msg.epoch)
        self.role, self.epoch = msg.role, msg.epoch
        eng = self.engine
        self.info = m.WorkerInfo(self.info.worker_id, self.info.incarnation, msg.role, self.info.model,
                                 str(eng.device), eng.max_model_len, eng.runner.num_blocks, eng.config.block_size,
                                 self.info.is_multimodal, self.info.transfer, self.info.pid, cost_model, self.epoch)
        await self.sock.send(m.WorkerReady(self.info))
        log.info("role switch %s -> %s (epoch %d) in %.2f s (%.2f s waiting for the engine to idle)%s", old,
                 msg.role, self.epoch, time.perf_counter() - t0, idle, f": {figures}" if figures else "")
