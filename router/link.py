"""The router's sockets: the ROUTER its workers connect to (DEALER) and the control PUB they
subscribe to, with the sends the router's parts use and the background tasks it runs on them.
"""

from __future__ import annotations

import asyncio
import logging

from bus import messages as m
from bus.sockets import AsyncSocket, PeerGone

log = logging.getLogger("epd.router")


class WorkerLink:
    def __init__(self) -> None:
        self.sock: AsyncSocket | None = None
        self.pub: AsyncSocket | None = None
        self._background: set[asyncio.Task] = set()

    def start(self, worker_addr: str, control_addr: str | None = None) -> None:
        self.sock = AsyncSocket("router", worker_addr, bind=True)
        self.pub = AsyncSocket("pub", control_addr, bind=True) if control_addr else None

    @property
    def address(self) -> str:
        return self.sock.address

    async def send(self, wid: str, msg) -> None:
        """Deliver ``msg`` to worker ``wid``; raises PeerGone when its connection is gone."""
        await self.sock.send(msg, to=wid.encode())

    async def send_quiet(self, wid: str, msg) -> None:
        """``send``, where a worker that is gone needs nothing more."""
        try:
            await self.send(wid, msg)
        except PeerGone:
            pass

    async def broadcast(self, msg) -> None:
        """To every worker on the control PUB, best effort (nothing without one)."""
        if self.pub is None:
            return
        try:
            await self.pub.send(msg, to=b"ctl")
        except Exception:  # noqa: BLE001 - a broadcast is best effort
            log.exception("broadcasting %s failed", type(msg).__name__)

    def spawn(self, coro) -> None:
        """Run ``coro`` as a task until it ends or the link closes."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self, shutdown_workers: bool = False) -> None:
        if shutdown_workers and self.pub is not None:
            await self.pub.send(m.Shutdown(reason="router closing"), to=b"ctl")
        for t in list(self._background):
            t.cancel()
        self.sock.close()
        if self.pub is not None:
            self.pub.close()
