"""``/tokenize``, ``/detokenize`` and the model card, answered through the workers (a component of
``RouterCore``).

The router process holds no tokenizer (no torch, no transformers), so a tokenize call goes to
the least loaded live worker, whose engine answers with the code that admits requests
(``stages/tokenize_service.py``): the count is what the request would run, images expanded.
A worker that dies or restarts while answering is replaced by another one once; the call never
waits on a dead worker.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Awaitable, Callable

from bus import messages as m
from bus.sockets import PeerGone
from router.backend import ApiError
from router.registry import Registry

_ANSWER_TIMEOUT_S = 60.0  # a live worker answers in milliseconds; this bounds a wedged one
_CHECK_S = 0.25  # how often a waiting call looks at its worker's state


class TokenizeCalls:
    """Tokenize calls on the live workers of ``registry``; ``send(worker id, message)`` delivers
    (raising ``PeerGone``). The core hands it every ``Tokenized`` and ``RequestFailed``
    (``on_answer``) before its own handling."""

    def __init__(self, registry: Registry, send: Callable[[str, object], Awaitable[None]]):
        self.registry, self._send = registry, send
        self._tokenizing: dict[str, asyncio.Future] = {}

    def model_card(self) -> dict:
        """{"root": the workers' model directory, "max_model_len": the smallest context} (None before
        any worker registered)."""
        workers = [w for w in self.registry.workers.values() if w.alive] or list(self.registry.workers.values())
        if not workers:
            return {"root": None, "max_model_len": None}
        return {"root": workers[0].info.model, "max_model_len": min(w.info.max_model_len for w in workers)}

    async def tokenize(self, messages: list[dict] | None, prompt: str | None, images: list[bytes],
                       add_special_tokens: bool | None, add_generation_prompt: bool) -> list[int]:
        msg = m.TokenizeRequest(request_id=f"tok-{uuid.uuid4().hex}", messages=messages, prompt=prompt,
                                images=list(images), add_special_tokens=add_special_tokens,
                                add_generation_prompt=add_generation_prompt)
        return (await self._ask(msg)).token_ids

    async def detokenize(self, token_ids: list[int]) -> str:
        msg = m.DetokenizeRequest(request_id=f"detok-{uuid.uuid4().hex}", token_ids=list(token_ids))
        return (await self._ask(msg)).text

    async def _ask(self, msg) -> m.Tokenized:
        for _ in range(2):  # a second worker when the first one dies while answering
            worker = self._tokenizer_worker()
            fut = asyncio.get_running_loop().create_future()
            self._tokenizing[msg.request_id] = fut
            try:
                await self._send(worker.worker_id, msg)
                deadline = time.monotonic() + _ANSWER_TIMEOUT_S
                incarnation = worker.info.incarnation
                while time.monotonic() < deadline:
                    done, _ = await asyncio.wait((fut,), timeout=_CHECK_S)
                    if done:
                        return fut.result()
                    if not worker.alive or worker.info.incarnation != incarnation:
                        break
                else:
                    raise ApiError(503, f"worker {worker.worker_id} did not answer within "
                                        f"{_ANSWER_TIMEOUT_S:.0f} s", "server_error")
            except PeerGone:
                pass
            finally:
                self._tokenizing.pop(msg.request_id, None)
        raise ApiError(503, "the workers asked to tokenize died while answering", "server_error")

    def _tokenizer_worker(self):
        alive = [w for role in ("mixed", "prefill", "decode", "encode") for w in self.registry.alive(role)]
        if not alive:
            raise ApiError(503, "no worker is available to tokenize (every worker loads the tokenizer)",
                           "server_error")
        return min(alive, key=lambda w: w.load)

    def on_answer(self, msg: m.Tokenized | m.RequestFailed) -> bool:
        """Settle a waiting tokenize call; False when ``msg`` is not an answer to one."""
        fut = self._tokenizing.get(getattr(msg, "request_id", None) or "")
        if fut is None or fut.done():
            return False
        if isinstance(msg, m.Tokenized):
            fut.set_result(msg)
        elif isinstance(msg, m.RequestFailed):
            fut.set_exception(ApiError(msg.status, msg.message, msg.type))
        else:
            return False
        return True
