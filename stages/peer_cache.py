"""A stage worker's half of the cluster cache: a component ``StageWorker`` owns and calls.

- Reports what its caches gained and lost to the router's cluster index every
  ``CACHE_EVENTS_S`` (``KvCacheEvent`` from the engine's prefix cache,
  ``EmbeddingCacheEvent`` from the embeddings an encode worker publishes).
- Encode role: keeps embeddings pullable by pixel hash within a byte budget.
- Prefill/decode: takes images as pulled embeddings, falling back to the raw
  image (encoded here) when a pull fails or its shape is wrong.
- Before queueing a prompt, asks who holds more of its blocks and pulls them
  (``fetch_prefix``); as a holder, copies blocks out for others (``on_prefix_export``).

What it needs from the worker it gets at construction (the engine, the transfer backend, a send
function to the router, a way to report a failed pull, the worker's counters, its event loop and a
few values);
the worker hands it the messages that concern it (``on_prefix_export``, ``on_prefix_answer``) and
tells it when the role changes (``enter_role``).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import TYPE_CHECKING, Awaitable, Callable

from bus import messages as m
from stages.engine.input_processor import PreparedImage
from transfer.base import TransferBackend, TransferError
from transfer.content_cache import ContentCache
from transfer.hash_keys import embedding_key

if TYPE_CHECKING:
    from stages.engine.llm_engine import LLMEngine

log = logging.getLogger("epd.stage")
CACHE_EVENTS_S = 0.1  # how often stored/evicted hashes go to the cluster index
PREFIX_ANSWER_TIMEOUT_S = 2.0  # past this, a prefix is computed here rather than waited for

Send = Callable[[object], Awaitable[None]]  # a message to the router
PullFailed = Callable[[str, dict, Exception], Awaitable[None]]  # (request id, holder, error)


class PeerCache:
    """Embeddings and KV prefix blocks shared with other workers by content hash.

    ``send`` delivers a message to the router; ``pull_failed`` tells the router a peer did not
    deliver; ``counters`` are the worker's (its heartbeats carry them). ``worker_id``,
    ``incarnation`` and the epoch of the last ``enter_role`` tag the cache events."""

    def __init__(self, engine: LLMEngine, transfer: TransferBackend, send: Send, pull_failed: PullFailed,
                 counters: Counter[str], loop: asyncio.AbstractEventLoop, *, worker_id: str, incarnation: str,
                 role: str, epoch: int, pull_timeout: float):
        self.engine, self.transfer, self._send, self._pull_failed = engine, transfer, send, pull_failed
        self.counters, self.loop = counters, loop
        self.worker_id, self.incarnation = worker_id, incarnation
        self.pull_timeout = pull_timeout
        text_cfg = getattr(engine.hf_config, "text_config", None) or engine.hf_config
        self.embed_dim = text_cfg.hidden_size  # an image embedding row must be this wide
        self.embed_events: list[tuple[bool, object]] = []  # (stored?, ImageRef | hash) for the index
        self.prefix_answers: dict[str, asyncio.Future] = {}  # request id -> PrefixAnswer awaited
        self.published: ContentCache | None = None
        self.enter_role(role, epoch)

    def enter_role(self, role: str, epoch: int) -> None:
        """Per-role state: an encoder keeps its embeddings pullable (``published``) and records no
        KV events; the other roles record KV events for the router's cluster index."""
        if self.published is not None:  # leaving encode: its embeddings are no longer offered
            for h in self.published.keys():
                self.transfer.drop(embedding_key(h))
        self.published = ContentCache(self.engine.config.encoder_cache_mb << 20)
        self.embed_events.clear()
        blocks = self.engine.blocks
        if role == "encode":
            blocks.events = None
        else:
            blocks.record_events()  # a fresh queue: the old role's events are not sent
        self.epoch = epoch

    async def report_events(self) -> None:
        """Tell the router's cluster index what this worker's caches gained and lost (runs forever)."""
        while True:
            await asyncio.sleep(CACHE_EVENTS_S)
            events = self.engine.blocks.events  # a role switch may replace it (or turn it off)
            if events:
                stored, evicted = [], []
                while events:
                    is_stored, h = events.popleft()  # the engine thread appends concurrently
                    hx = f"{h:032x}"
                    if is_stored:
                        stored.append(hx)
                    elif hx in stored:  # came and went within one batch
                        stored.remove(hx)
                    else:
                        evicted.append(hx)
                await self._send(m.KvCacheEvent(self.worker_id, self.incarnation, stored, evicted, self.epoch))
            if self.embed_events:
                batch, self.embed_events = self.embed_events, []
                await self._send(m.EmbeddingCacheEvent(
                    self.worker_id, self.incarnation, [x for ok, x in batch if ok],
                    [x for ok, x in batch if not ok], self.epoch))

    # ---- embeddings ---------------------------------------------------------------------------
    async def request_images(self, msg: m.GenerateRequest) -> list:
        """The request's images: pulled embeddings where refs came, raw bytes otherwise.

        A failed or mismatched pull falls back to the raw image (encoded here) when it came too.
        """
        if not msg.image_refs:
            return list(msg.images)

        async def one(i: int, ref: m.ImageRef):
            raw = msg.images[i] if i < len(msg.images) else None
            if not ref.content_hash:
                if raw is None:
                    raise ValueError(f"image {i} came with neither an embedding reference nor its bytes")
                return raw
            try:
                return await self._pull_embedding(ref)
            except TransferError as e:
                await self._pull_failed(msg.request_id, ref.holder, e)
                if raw is None:
                    raise
                log.warning("request %s: image %d: %s; encoding it here", msg.request_id, i, e)
                self.counters["embedding_pull_fallbacks"] += 1
                return raw

        return list(await asyncio.gather(*(one(i, r) for i, r in enumerate(msg.image_refs))))

    async def _pull_embedding(self, ref: m.ImageRef) -> PreparedImage:
        key = embedding_key(ref.content_hash)
        (emb,) = await self.transfer.pull(ref.holder, key, timeout=self.pull_timeout,
                                          device=str(self.engine.device))
        if emb.ndim != 2 or tuple(emb.shape) != (ref.num_tokens, self.embed_dim):
            raise TransferError(f"{key} holds an embedding of shape {tuple(emb.shape)}; "
                                f"expected ({ref.num_tokens}, {self.embed_dim})")
        grid = tuple(ref.grid_thw) if ref.grid_thw else None
        return PreparedImage(ref.content_hash, ref.num_tokens, grid, emb)

    def publish(self, p: PreparedImage) -> None:
        """Keep encoded embeddings pullable under their content hash, within a byte budget (LRU)."""
        h = p.content_hash
        if h in self.published:
            self.published.get(h)  # most recently used
            return
        self.transfer.put(embedding_key(h), [p.embedding])
        evicted = self.published.put(h, p.embedding)
        if h not in self.published:  # larger than the whole budget: pullable for this request only
            self.loop.call_later(2 * self.pull_timeout, self.transfer.drop, embedding_key(h))
            return
        self.embed_events.append((True, self.ref(p)))
        for old in evicted:
            self.transfer.drop(embedding_key(old))
            self.embed_events.append((False, old))

    def ref(self, p: PreparedImage) -> m.ImageRef:
        """Where another worker pulls this embedding from."""
        return m.ImageRef(p.content_hash, p.num_tokens, list(p.grid_thw) if p.grid_thw else None,
                          self.transfer.card)

    # ---- the prefix cache across workers ----------------------------------------------------
    async def fetch_prefix(self, rid: str, hashes: list[int], local: int):
        """(KV, token ids) of more leading blocks than held here, from whoever holds them; or None."""
        fut = self.loop.create_future()
        self.prefix_answers[rid] = fut
        try:
            await self._send(m.PrefixQuery(rid, [f"{h:032x}" for h in hashes], local))
            ans: m.PrefixAnswer = await asyncio.wait_for(fut, PREFIX_ANSWER_TIMEOUT_S)
        except TimeoutError:
            log.warning("request %s: no prefix answer within %.1f s; computing it", rid, PREFIX_ANSWER_TIMEOUT_S)
            return None
        finally:
            self.prefix_answers.pop(rid, None)
        if not ans.key:
            return None
        if ans.num_blocks <= local:  # the holder had less left than asked: not worth a pull
            await self._send(m.KvTaken(rid, ans.key))
            return None
        try:
            kv, tokens = await self.transfer.pull(ans.holder, ans.key, timeout=self.pull_timeout,
                                                  device=str(self.engine.device))
            return kv, tokens.cpu()
        except (TransferError, ValueError) as e:
            if isinstance(e, TransferError):
                await self._pull_failed(rid, ans.holder, e)
            log.warning("request %s: prefix pull failed (%s); computing it", rid, e)
            self.counters["kv_prefix_fetch_failures"] += 1
            return None
        finally:
            await self._send(m.KvTaken(rid, ans.key))  # the holder may drop its copy now

    async def on_prefix_answer(self, msg: m.PrefixAnswer) -> None:
        fut = self.prefix_answers.get(msg.request_id)
        if fut is not None and not fut.done():
            fut.set_result(msg)
        elif msg.key:  # answered after we stopped waiting: let the holder drop its copy
            await self._send(m.KvTaken(msg.request_id, msg.key))

    async def on_prefix_export(self, msg: m.PrefixExport) -> None:
        """Copy out the asked prefix blocks for another worker (never fails the asker's request)."""
        n = 0
        try:
            hashes = [int(h, 16) for h in msg.block_hashes]
            out = self.engine.export_prefix(hashes)  # here, not between steps: see its docstring
            if out is not None:
                self.transfer.put(msg.key, list(out))
                # Dropped when the asker says it took it, or after a pull's worth of time.
                self.loop.call_later(2 * self.pull_timeout + PREFIX_ANSWER_TIMEOUT_S, self.transfer.drop, msg.key)
                n = out[1].numel() // self.engine.config.block_size
                self.counters["kv_prefix_blocks_exported"] += n
        except Exception:  # noqa: BLE001 - the asker computes instead
            log.exception("exporting a prefix for %s failed", msg.request_id)
        await self._send(m.PrefixExported(msg.request_id, msg.key, n))
