"""The router's ZeroMQ front for the client SDK (``bus.client``): OpenAI bodies in, deltas out.

Requests are validated by the same code as the HTTP API and run through the
same core; a client that vanishes is treated like an HTTP disconnect.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time

from bus import messages as m
from bus.sockets import AsyncSocket, PeerGone
from router.admin import workers_view
from router.backend import ApiError, Backend
from router.images import ImageResolver
from router.limits import ApiLimits
from router.openai_protocol import parse_chat, parse_completion

log = logging.getLogger("epd.front")


class ClientFront:
    def __init__(self, backend: Backend, limits: ApiLimits, admin_key: str | None = None):
        self.backend, self.limits, self.admin_key = backend, limits, admin_key
        self.resolver = ImageResolver(limits)
        self.running: dict[str, asyncio.Task] = {}

    async def start(self, address: str) -> None:
        self.sock = AsyncSocket("router", address, bind=True)
        self._task = asyncio.create_task(self._loop())

    @property
    def address(self) -> str:
        return self.sock.address

    async def close(self) -> None:
        self._task.cancel()
        for t in self.running.values():
            t.cancel()
        await self.resolver.close()
        self.sock.close()

    async def _loop(self) -> None:
        while True:
            try:
                ident, msg = await self.sock.recv()
            except ValueError as e:
                log.warning("dropping a malformed client message: %s", e)
                continue
            if isinstance(msg, m.ClientRequest):
                task = asyncio.create_task(self._serve(ident, msg))
                self.running[msg.request_id] = task
                task.add_done_callback(lambda _t, rid=msg.request_id: self.running.pop(rid, None))
            elif isinstance(msg, m.ClientAbort):
                task = self.running.get(msg.request_id)
                if task is not None:
                    task.cancel()
            elif isinstance(msg, m.HealthQuery):
                ready, detail = self.backend.health()
                await self._reply(ident, m.HealthReply(ready=ready, detail=detail))
            elif isinstance(msg, m.AdminCall):
                await self._reply_quiet(ident, self._admin(msg))

    def _admin(self, msg: m.AdminCall):
        """The ``/admin`` routes over ZeroMQ (router.admin), behind the same admin key."""
        try:
            if self.admin_key is not None and not hmac.compare_digest((msg.admin_key or "").encode(),
                                                                      self.admin_key.encode()):
                raise ApiError(401, "Incorrect admin key provided.")
            if msg.action == "workers":
                return m.AdminReply(request_id=msg.request_id, body=workers_view(self.backend))
            if msg.action == "switch_role":
                a = msg.args
                return m.AdminReply(request_id=msg.request_id, body=self.backend.switches.request(
                    str(a.get("worker_id")), a.get("role"), a.get("drain_s")))
            raise ApiError(400, f"unknown admin action {msg.action!r}; use 'workers' or 'switch_role'")
        except ApiError as e:
            return m.ClientError(request_id=msg.request_id, status=e.status, message=e.message, type=e.type)

    async def _reply(self, ident: bytes, msg) -> None:
        await self.sock.send(msg, to=ident)

    async def _serve(self, ident: bytes, msg: m.ClientRequest) -> None:
        rid = msg.request_id
        started = False
        try:
            if not isinstance(msg.body, dict):
                raise ApiError(400, "the request body must be an object")
            if msg.kind == "chat":
                parsed = await parse_chat(msg.body, self.backend.served_models, self.limits, self.resolver,
                                          rid, time.time())
            elif msg.kind == "completion":
                parsed = parse_completion(msg.body, self.backend.served_models, self.limits, rid, time.time())
            else:
                raise ApiError(400, f"unknown request kind {msg.kind!r}; use 'chat' or 'completion'")
            if parsed.n != 1:
                raise ApiError(400, "n > 1 is served by the HTTP API; over the SDK send one request per sample",
                               param="n")
            started = True
            async for d in self.backend.generate(parsed.api):
                await self._reply(ident, m.TokenDelta(
                    request_id=rid, text=d.text, token_ids=d.token_ids, finish_reason=d.finish_reason,
                    stop_reason=None, prompt_tokens=d.prompt_tokens, completion_tokens=d.completion_tokens,
                    cached_tokens=d.cached_tokens, logprobs=_logprobs(d.logprobs)))
                if d.finish_reason is not None:
                    started = False
        except ApiError as e:
            started = False  # the backend cleaned up already
            await self._reply_quiet(ident, m.ClientError(request_id=rid, status=e.status, message=e.message,
                                                         type=e.type))
        except (asyncio.CancelledError, PeerGone):
            pass
        except Exception as e:  # noqa: BLE001
            log.exception("client request %s failed", rid)
            await self._reply_quiet(ident, m.ClientError(request_id=rid, status=500, message=f"internal error: {e}",
                                                         type="server_error"))
        finally:
            if started:  # the client aborted or vanished mid-request
                await self.backend.abort(rid)

    async def _reply_quiet(self, ident: bytes, msg) -> None:
        try:
            await self._reply(ident, msg)
        except PeerGone:
            pass


def _logprobs(entries: list[dict] | None) -> list[m.TokenLogprob] | None:
    if entries is None:
        return None
    return [m.TokenLogprob(token_id=e["token_id"], token=e["token"], logprob=e["logprob"],
                           top=[m.TopLogprob(token_id=t["token_id"], token=t["token"], logprob=t["logprob"])
                                for t in e["top"]])
            for e in entries]
