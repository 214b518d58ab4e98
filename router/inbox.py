"""The router's end of the worker socket: receive, decode, unbatch, and hand each message to the
handler its type names (the same pattern as the worker's ``stages/worker.py`` ``_recv_loop``).

A handler takes (worker id, message) and returns an awaitable or nothing. One bad message never
stops the loop: a malformed one is dropped, a handler's ``ApiError`` goes to ``on_error`` (the
request's client), anything else is logged.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Awaitable, Callable

from bus import messages as m
from bus.sockets import AsyncSocket
from router.backend import ApiError

log = logging.getLogger("epd.router")

Handler = Callable[[str, Any], "Awaitable[None] | Any"]


class Inbox:
    """``before(worker id, msg)`` runs for every message first (the registry's sign of life)."""

    def __init__(self, handlers: dict[type, Handler], before: Callable[[str, Any], None],
                 on_error: Callable[[Any, ApiError], None]):
        self.handlers, self._before, self._on_error = handlers, before, on_error

    async def run(self, sock: AsyncSocket) -> None:
        while True:
            try:
                ident, msg = await sock.recv()
            except ValueError as e:  # a malformed message: log it, keep serving
                log.warning("dropping a malformed worker message: %s", e)
                continue
            wid = ident.decode() if ident else "?"
            # A step's batch is handled delta by delta: each passes the ownership checks alone.
            for one in msg.deltas if isinstance(msg, m.TokenDeltas) else (msg,):
                await self.handle(wid, one)

    async def handle(self, wid: str, msg) -> None:
        try:
            self._before(wid, msg)
            handler = self.handlers.get(type(msg))
            if handler is not None and inspect.isawaitable(done := handler(wid, msg)):
                await done
        except ApiError as e:
            self._on_error(msg, e)
        except Exception:  # noqa: BLE001 - one bad message never stops the router
            log.exception("error handling %s from %s", type(msg).__name__, wid)
