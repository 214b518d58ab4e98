"""Every message on the epd bus, one dataclass each (``bus.codec`` puts them on the wire).

Type ids: 1-19 worker -> router, 20-39 router -> worker, 40-59 client SDK <-> router
(``bus.client_messages``, re-exported here), 60+ control broadcasts. Tensors (KV, embeddings) never ride these messages between
workers: they move through ``transfer/``; messages carry the keys and the holder's
addresses.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any

from bus.codec import message, struct

ROLES = ("encode", "prefill", "decode", "mixed")
MAX_TIMINGS = 64  # step / encode timings per heartbeat
# Cache counters a worker's heartbeat carries (``Heartbeat.counters``); the router
# exports each as ``epd:<name>_total{worker,role}``.
CACHE_COUNTERS = {
    "kv_prefix_blocks_fetched": "Prompt KV blocks pulled from another worker instead of computed.",
    "kv_prefix_blocks_exported": "Prompt KV blocks copied out for another worker.",
    "kv_prefix_fetch_failures": "Prefix pulls that failed (the prefix was computed instead).",
    "embedding_pull_fallbacks": "Image embeddings whose pull failed, so the image was encoded here.",
}


# ---- pieces ------------------------------------------------------------------------------------
@struct
class WorkerInfo:
    """What only the worker knows, announced once it is ready."""

    worker_id: str
    incarnation: str  # new on every start: a restarted worker is a new peer
    role: str
    model: str
    device: str
    max_model_len: int
    num_kv_blocks: int
    block_size: int
    is_multimodal: bool
    transfer: dict[str, str]  # backend name -> address, plus "host_id"
    pid: int
    # The worker's measured costs (``stages.profiler``): "step" and/or "encode" coefficients of
    # ``bus.step_cost``'s features, "token_budget", "max_num_seqs", "kv_capacity_tokens", "source".
    cost_model: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0  # role epoch: +1 per live role switch (``SwitchRole``); older messages are dropped


@struct
class ImageRef:
    """An encoded image: where its embedding can be pulled from, and its shape in tokens."""

    content_hash: str
    num_tokens: int
    grid_thw: list[int] | None
    holder: dict[str, str]  # the encode worker's transfer addresses


@struct
class HandoffImage:
    content_hash: str
    offset: int
    length: int
    grid_thw: list[int] | None = None


@struct
class HandoffHeader:
    """A prefilled request, minus its tensors (KV and embeddings wait at the holder)."""

    prompt_token_ids: list[int]
    output_token_ids: list[int]
    params: dict
    prompt: str | None = None
    images: list[HandoffImage] = field(default_factory=list)
    sent_text_len: int = 0
    num_cached_tokens: int = 0
    cumulative_logprob: float | None = None
    generator_state: bytes | None = None


@struct
class Resume:
    """What a client has already been sent of a request whose worker died: the new worker
    recomputes the KV of prompt + ``token_ids`` and continues from there (a seeded sampler
    first replays one draw per token, so it draws what the dead worker would have drawn)."""

    token_ids: list[int]
    text_len: int  # characters of the answer already sent
    cumulative_logprob: float | None = None


@struct
class TopLogprob:
    token_id: int
    token: str
    logprob: float


@struct
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[TopLogprob] = field(default_factory=list)


# ---- worker -> router --------------------------------------------------------------------------
@message(1)
class WorkerReady:
    info: WorkerInfo


@message(2)
class Heartbeat:
    worker_id: str
    incarnation: str
    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    images_encoded: int = 0
    prefix_hit_tokens: int = 0
    prefix_query_tokens: int = 0
    transfer_pulls: dict[str, int] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)  # CACHE_COUNTERS by name
    # Timings since the last heartbeat (at most ``MAX_TIMINGS``): [0, *step features, seconds] per
    # engine step, [1, *encode features, seconds] per encode call (``bus.step_cost``).
    timings: list[list[float]] = field(default_factory=list)
    epoch: int = 0  # the role epoch it was sent in (``WorkerInfo.epoch``)


@message(3)
class TokenDelta:
    """New output of one request (the whole of it when ``finish_reason`` is set)."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None


@message(14)
class TokenDeltas:
    """One engine step's deltas, in one message: the router handles each as its own TokenDelta."""

    deltas: list[TokenDelta]


@message(4)
class EncodeDone:
    request_id: str
    images: list[ImageRef]


@message(5)
class PrefillDone:
    """The prefill is over; KV (+ embeddings) wait at ``holder`` under ``kv_key``."""

    request_id: str
    header: HandoffHeader
    kv_key: str
    holder: dict[str, str]


@message(6)
class RequestFailed:
    request_id: str
    status: int  # HTTP status the client should see
    message: str
    type: str = "invalid_request_error"


@message(7)
class KvTaken:
    """The decode worker holds the request's KV now: the prefill may drop its copy."""

    request_id: str
    kv_key: str


@message(8)
class KvCacheEvent:
    """Prefix-cache blocks this worker registered or evicted since its last event, in order.

    Hashes are the engine's chained block hashes as 32 hex digits; the router's
    cluster index learns from them who holds which prefix.
    """

    worker_id: str
    incarnation: str
    stored: list[str]
    evicted: list[str]
    epoch: int = 0


@message(9)
class EmbeddingCacheEvent:
    """Image embeddings this encode worker published (pullable) or dropped, by pixel hash."""

    worker_id: str
    incarnation: str
    stored: list[ImageRef]
    evicted: list[str]
    epoch: int = 0


@message(10)
class PrefixQuery:
    """Who else holds this request's prompt blocks? ``local_blocks`` are already here."""

    request_id: str
    block_hashes: list[str]
    local_blocks: int


@message(11)
class PrefixExported:
    """The holder copied ``num_blocks`` leading blocks out under ``key`` (0: none left)."""

    request_id: str
    key: str
    num_blocks: int


@message(12)
class PullFailed:
    """A pull from ``holder`` failed or timed out: the router suspects that worker."""

    request_id: str
    holder: dict[str, str]
    reason: str = ""


@message(13)
class WorkerGaveUp:
    """From a supervisor (``epd-serve``): it stopped restarting a crash-looping worker."""

    worker_id: str
    restarts: int
    reason: str = ""


@message(19)
class Tokenized:
    """The answer to a ``TokenizeRequest`` (``token_ids``) or a ``DetokenizeRequest`` (``text``)."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""


# ---- router -> worker --------------------------------------------------------------------------
@message(20)
class EncodeRequest:
    request_id: str
    images: list[bytes]


@message(21)
class GenerateRequest:
    """Run a request: to the end (mixed) or up to its first token (``prefill_only``)."""

    request_id: str
    sampling: dict
    messages: list[dict] | None = None  # chat; image parts are {"type": "image"}
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    add_generation_prompt: bool = True
    images: list[bytes] = field(default_factory=list)  # raw images, in prompt order
    # Images encoded elsewhere, aligned with ``images`` when both come: the worker pulls
    # each embedding and falls back to encoding the raw image itself if the pull fails
    # (holder dead or evicted). A ref with an empty ``content_hash`` means "encode it here".
    image_refs: list[ImageRef] = field(default_factory=list)
    prefill_only: bool = False
    resume: Resume | None = None  # continue a request whose worker died (never with prefill_only)


@message(22)
class DecodeRequest:
    request_id: str
    header: HandoffHeader
    kv_key: str
    holder: dict[str, str]


@message(23)
class AbortRequest:
    request_id: str


@message(24)
class ReleaseKv:
    kv_key: str


@message(25)
class PrefixExport:
    """To a holder: copy out the longest run of these blocks you still hold, publish it under ``key``."""

    request_id: str
    block_hashes: list[str]
    key: str


@message(26)
class PrefixAnswer:
    """To the asker: pull ``num_blocks`` blocks under ``key`` from ``holder`` (0: compute them)."""

    request_id: str
    key: str
    holder: dict[str, str]
    num_blocks: int


@message(27)
class Ping:
    """The router's sign of life, sent to every worker twice a second. A worker that hears
    nothing for a while reconnects and registers again; a new ``router_id`` means the router
    restarted: what the worker ran for the old one is aborted."""

    router_id: str


@message(28)
class SwitchRole:
    """Become ``role`` once nothing of the old role runs here (the router drained it), then
    announce ``WorkerReady`` with this ``epoch``; the worker keeps its id and incarnation."""

    role: str
    epoch: int


@message(38)
class TokenizeRequest:
    """The prompt ids a request would run (``/tokenize``): a chat (``messages`` with image parts
    standing for ``images``) or a completion ``prompt``. ``add_special_tokens`` None follows the
    engine's rule; a bool is applied to the prompt (or the rendered chat) as given."""

    request_id: str
    messages: list[dict] | None
    prompt: str | None
    images: list[bytes] = field(default_factory=list)
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True


@message(39)
class DetokenizeRequest:
    """Token ids -> text with the model's tokenizer (``/detokenize``)."""

    request_id: str
    token_ids: list[int]


# ---- control broadcasts (PUB/SUB) --------------------------------------------------------------
@message(60)
class Shutdown:
    reason: str = ""


@message(61)
class WorkerGone:
    """A worker died or restarted: peers drop their transfer connections to its old card."""

    worker_id: str
    transfer: dict[str, str]
    reason: str = ""


# The client SDK's messages (40-59) live in their own module; they are part of this vocabulary.
from bus.client_messages import (AdminCall, AdminReply, ClientAbort, ClientError, ClientRequest,  # noqa: E402,F401
                                 HealthQuery, HealthReply)
