"""The ZeroMQ client SDK: talk to the router's client front without HTTP.

    from bus.client import Client, AsyncClient, image_part

    c = Client("tcp://127.0.0.1:7102", model="tiny-llava")   # epd-serve --sdk-port (default 7102)
    out = c.generate(messages=[{"role": "user", "content": [image_part(png_bytes),
                                                          {"type": "text", "text": "What is it?"}]}],
                     max_tokens=32, temperature=0)
    print(out.text, out.token_ids, out.finish_reason)
    for delta in c.stream(prompt="Once upon a time", max_tokens=16):
        print(delta.text, end="")

Requests carry OpenAI bodies and are validated by the router exactly like
HTTP ones; an error comes back as :class:`ClientRequestError` with the HTTP
status the API would have given. The operator calls of ``/admin`` are here too
(``workers()``, ``switch_role(worker_id, role)``), behind the same admin key
(``admin_key=`` or ``$EPD_ADMIN_KEY``).
"""

from __future__ import annotations

import asyncio
import base64
import os
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator

from bus import messages as m
from bus.sockets import AsyncSocket, SyncSocket


def _silent(address: str, timeout: float) -> TimeoutError:
    return TimeoutError(f"no answer from a router at {address} within {timeout:g} s; is epd-serve (or "
                        f"epd-router) running there? It prints its SDK address on start (--sdk-port, default 7102)")


class ClientRequestError(RuntimeError):
    def __init__(self, status: int, message: str, type: str):
        super().__init__(f"{status} {type}: {message}")
        self.status, self.message, self.type = status, message, type


@dataclass
class Delta:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    logprobs: list | None = None


@dataclass
class Completion:
    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


def image_part(data: bytes, mime: str = "image/png") -> dict:
    """An OpenAI ``image_url`` content part carrying ``data`` inline."""
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{base64.b64encode(data).decode()}"}}


def _body(model, prompt, messages, prompt_token_ids, sampling) -> tuple[str, dict]:
    if (messages is None) == (prompt is None and prompt_token_ids is None):
        raise ValueError("give either messages (chat) or prompt / prompt_token_ids (completion)")
    body = {"model": model, **sampling}
    if messages is not None:
        return "chat", {**body, "messages": messages}
    return "completion", {**body, "prompt": prompt if prompt is not None else prompt_token_ids}


def _delta(msg) -> Delta:
    if isinstance(msg, m.ClientError):
        raise ClientRequestError(msg.status, msg.message, msg.type)
    return Delta(msg.text, list(msg.token_ids), msg.finish_reason, msg.prompt_tokens, msg.completion_tokens,
                 msg.cached_tokens, msg.logprobs)


def _admin_call(action: str, admin_key: str | None, **args) -> m.AdminCall:
    args = {k: v for k, v in args.items() if v is not None}
    return m.AdminCall(uuid.uuid4().hex, action, args, admin_key or os.environ.get("EPD_ADMIN_KEY") or None)


def _admin_body(msg) -> dict:
    if isinstance(msg, m.ClientError):
        raise ClientRequestError(msg.status, msg.message, msg.type)
    return msg.body


def _fold(rid: str, deltas) -> Completion:
    out = Completion(rid)
    for d in deltas:
        out.text += d.text
        out.token_ids += d.token_ids
        out.finish_reason = d.finish_reason
        out.prompt_tokens, out.completion_tokens, out.cached_tokens = d.prompt_tokens, d.completion_tokens, \
            d.cached_tokens
    return out


class AsyncClient:
    """Many concurrent requests over one socket; replies are matched by request id."""

    def __init__(self, address: str, model: str | None = None, timeout: float = 300.0,
                 admin_key: str | None = None):
        self.sock = AsyncSocket("dealer", address, bind=False, identity=f"client-{uuid.uuid4().hex}".encode())
        self.address, self.model, self.timeout, self.admin_key = address, model, timeout, admin_key
        self._queues: dict[str, asyncio.Queue] = {}
        self._reader: asyncio.Task | None = None

    def _ensure_reader(self) -> None:
        if self._reader is None:
            self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            _, msg = await self.sock.recv()
            key = "health" if isinstance(msg, m.HealthReply) else msg.request_id
            q = self._queues.get(key)
            if q is not None:
                q.put_nowait(msg)

    async def stream(self, prompt: str | None = None, *, messages: list[dict] | None = None,
                     prompt_token_ids: list[int] | None = None, model: str | None = None,
                     request_id: str | None = None, **sampling) -> AsyncIterator[Delta]:
        kind, body = _body(model or self.model, prompt, messages, prompt_token_ids, sampling)
        rid = request_id or uuid.uuid4().hex
        q: asyncio.Queue = asyncio.Queue()
        self._queues[rid] = q
        self._ensure_reader()
        finished = False
        try:
            await self.sock.send(m.ClientRequest(rid, kind, body))
            while True:
                try:
                    msg = await asyncio.wait_for(q.get(), self.timeout)
                except TimeoutError:
                    raise _silent(self.address, self.timeout) from None
                d = _delta(msg)
                finished = d.finish_reason is not None
                yield d
                if finished:
                    return
        except ClientRequestError:
            finished = True
            raise
        finally:
            self._queues.pop(rid, None)
            if not finished:
                await self.sock.send(m.ClientAbort(rid))

    async def generate(self, prompt: str | None = None, **kwargs) -> Completion:
        rid = kwargs.pop("request_id", None) or uuid.uuid4().hex
        return _fold(rid, [d async for d in self.stream(prompt, request_id=rid, **kwargs)])

    async def abort(self, request_id: str) -> None:
        await self.sock.send(m.ClientAbort(request_id))

    async def health(self) -> tuple[bool, dict]:
        q: asyncio.Queue = asyncio.Queue()
        self._queues["health"] = q
        self._ensure_reader()
        try:
            await self.sock.send(m.HealthQuery())
            try:
                reply = await asyncio.wait_for(q.get(), self.timeout)
            except TimeoutError:
                raise _silent(self.address, self.timeout) from None
            return reply.ready, reply.detail
        finally:
            self._queues.pop("health", None)

    async def workers(self) -> dict:
        """``GET /admin/workers``: every worker's role, state, load and cost model."""
        return await self._admin(_admin_call("workers", self.admin_key))

    async def switch_role(self, worker_id: str, role: str, drain_s: float | None = None) -> dict:
        """``POST /admin/workers/{worker_id}/role``: a live role switch; {worker_id, from, role, epoch,
        state} once it started (ClientRequestError 400 / 401 / 404 / 409 when refused)."""
        return await self._admin(_admin_call("switch_role", self.admin_key, worker_id=worker_id, role=role,
                                             drain_s=drain_s))

    async def _admin(self, call: m.AdminCall) -> dict:
        q: asyncio.Queue = asyncio.Queue()
        self._queues[call.request_id] = q
        self._ensure_reader()
        try:
            await self.sock.send(call)
            try:
                return _admin_body(await asyncio.wait_for(q.get(), self.timeout))
            except TimeoutError:
                raise _silent(self.address, self.timeout) from None
        finally:
            self._queues.pop(call.request_id, None)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        self.sock.close()


class Client:
    """Blocking client: one request at a time per instance (make one per thread)."""

    def __init__(self, address: str, model: str | None = None, timeout: float = 300.0,
                 admin_key: str | None = None):
        self.sock = SyncSocket("dealer", address, bind=False, identity=f"client-{uuid.uuid4().hex}".encode())
        self.address, self.model, self.timeout, self.admin_key = address, model, timeout, admin_key

    def stream(self, prompt: str | None = None, *, messages: list[dict] | None = None,
               prompt_token_ids: list[int] | None = None, model: str | None = None,
               request_id: str | None = None, **sampling) -> Iterator[Delta]:
        kind, body = _body(model or self.model, prompt, messages, prompt_token_ids, sampling)
        rid = request_id or uuid.uuid4().hex
        finished = False
        try:
            self.sock.send(m.ClientRequest(rid, kind, body))
            while True:
                _, msg = self._recv()
                if getattr(msg, "request_id", None) != rid:
                    continue  # a late reply of an earlier, abandoned request
                d = _delta(msg)
                finished = d.finish_reason is not None
                yield d
                if finished:
                    return
        except ClientRequestError:
            finished = True
            raise
        finally:
            if not finished:
                self.sock.send(m.ClientAbort(rid))

    def generate(self, prompt: str | None = None, **kwargs) -> Completion:
        rid = kwargs.pop("request_id", None) or uuid.uuid4().hex
        return _fold(rid, list(self.stream(prompt, request_id=rid, **kwargs)))

    def abort(self, request_id: str) -> None:
        self.sock.send(m.ClientAbort(request_id))

    def health(self) -> tuple[bool, dict]:
        self.sock.send(m.HealthQuery())
        while True:
            _, msg = self._recv()
            if isinstance(msg, m.HealthReply):
                return msg.ready, msg.detail

    def workers(self) -> dict:
        """As :meth:`AsyncClient.workers`."""
        return self._admin(_admin_call("workers", self.admin_key))

    def switch_role(self, worker_id: str, role: str, drain_s: float | None = None) -> dict:
        """As :meth:`AsyncClient.switch_role`."""
        return self._admin(_admin_call("switch_role", self.admin_key, worker_id=worker_id, role=role,
                                       drain_s=drain_s))

    def _admin(self, call: m.AdminCall) -> dict:
        self.sock.send(call)
        while True:
            _, msg = self._recv()
            if getattr(msg, "request_id", None) == call.request_id:
                return _admin_body(msg)

    def _recv(self):
        try:
            return self.sock.recv(timeout=self.timeout)
        except TimeoutError:
            raise _silent(self.address, self.timeout) from None

    def close(self) -> None:
        self.sock.close()
