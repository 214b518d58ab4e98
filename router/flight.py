"""One request in flight at the router: where it is, what its client has been sent, and the
wire messages the core builds from it.

A request runs under an attempt id (``wire_id``): its request id, then ``<id>@r<n>`` after the
n-th recovery; a planned encode's parts run as ``<wire id>#e<j>``. Which workers hold it is not
kept here but in ``router.holdings``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from bus import messages as m
from router.backend import ApiDelta, ApiRequest
from router.plan import Plan


class Superseded(Exception):
    """A send of an attempt that a recovery has replaced meanwhile: dropped."""


@dataclass
class Flight:
    """One request in flight: where it is, what its client has seen, and the queue it reads."""

    req: ApiRequest
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    kv: tuple[str, str] | None = None  # (prefill worker, key) while P still holds the KV
    done: bool = False
    wire_id: str = ""  # the id the current attempt runs under on the workers
    attempt: int = 0  # recoveries so far
    stage: str = ""  # role of the worker running the current stage
    owner: tuple[str, str] | None = None  # (worker id, incarnation) running it
    refs: list[m.ImageRef] = field(default_factory=list)  # the E stage's result
    tokens: list[int] = field(default_factory=list)  # every token the client has been sent
    text_len: int = 0  # characters of the answer the client has been sent
    logprob_sum: float | None = None
    recovering: bool = False
    handovers: int = 0  # recoveries that were role switches' hand-overs, not failures (no budget)
    plan: Plan | None = None  # chosen at admission by the policy (router.plan)

    def __post_init__(self):
        self.wire_id = self.wire_id or self.req.request_id

    def generate_msg(self, prefill_only: bool, refs=(), resume: m.Resume | None = None) -> m.GenerateRequest:
        """The current attempt's ``GenerateRequest``. Raw images ride along with refs: the worker
        encodes one itself if its pull fails."""
        req = self.req
        return m.GenerateRequest(request_id=self.wire_id, sampling=req.sampling, messages=req.messages,
                                 prompt=req.prompt, prompt_token_ids=req.prompt_token_ids,
                                 add_generation_prompt=req.add_generation_prompt, images=list(req.images),
                                 image_refs=list(refs), prefill_only=prefill_only, resume=resume)

    def resume_msg(self) -> m.GenerateRequest:
        """Continue on a decode-capable worker from prompt + every token the client was sent."""
        resume = m.Resume(token_ids=list(self.tokens), text_len=self.text_len,
                          cumulative_logprob=self.logprob_sum)
        return self.generate_msg(False, self.refs, resume)

    def take(self, d: m.TokenDelta) -> ApiDelta:
        """Record a delta of the current attempt as sent to the client; the client's form of it."""
        logprobs = None
        if d.logprobs is not None:
            logprobs = [{"token_id": lp.token_id, "token": lp.token, "logprob": lp.logprob,
                         "top": [{"token_id": t.token_id, "token": t.token, "logprob": t.logprob}
                                 for t in lp.top]} for lp in d.logprobs]
            self.logprob_sum = (self.logprob_sum or 0.0) + sum(lp.logprob for lp in d.logprobs)
        self.tokens += d.token_ids
        self.text_len += len(d.text)
        return ApiDelta(d.text, list(d.token_ids), d.finish_reason, d.prompt_tokens, d.completion_tokens,
                        d.cached_tokens, logprobs)


class Flights(dict[str, Flight]):
    """The requests in flight by request id; ``of`` finds the one a worker's message is about."""

    def of(self, wire_id: str) -> tuple[Flight | None, bool]:
        """The flight an attempt id belongs to, and whether it names the current attempt."""
        flight = self.get(wire_id)
        if flight is None and "@r" in wire_id:
            flight = self.get(base_id(wire_id))
        return flight, flight is not None and flight.wire_id == wire_id

    def request_of(self, wire_id: str) -> ApiRequest | None:
        flight, _ = self.of(wire_id)
        return flight.req if flight is not None else None


def base_id(wire_id: str) -> str:
    """The request id of an attempt id ``<id>@r<n>`` (the id itself when it is the first)."""
    return wire_id.rpartition("@r")[0] if "@r" in wire_id else wire_id
