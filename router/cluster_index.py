"""The cluster index: which worker holds which image embedding and which KV block.

Fed by the workers' cache events (``KvCacheEvent``, ``EmbeddingCacheEvent``)
and by encode results; read by dispatch. It may lag a worker by one event
batch (~0.1 s) and may name something already evicted: every user of an entry
verifies it on arrival (shapes, token ids) and falls back to computing.

- KV: chained block hash -> workers holding that block in their prefix cache.
  Because hashes chain, a worker holding the first ``n`` hashes of a prompt
  holds its first ``n`` blocks.
- Embeddings: pixel hash -> (worker -> ImageRef). The router never decodes
  images, so it also remembers which file bytes produced which pixel hash
  (``aliases``, bounded LRU).
"""

from __future__ import annotations

from collections import OrderedDict

from bus.messages import ImageRef

MAX_ALIASES = 100_000


class ClusterIndex:
    def __init__(self, max_aliases: int = MAX_ALIASES):
        self.kv: dict[str, set[str]] = {}  # block hash -> worker ids
        self.kv_of: dict[str, set[str]] = {}  # worker id -> block hashes
        self.emb: dict[str, dict[str, ImageRef]] = {}  # pixel hash -> worker id -> ref
        self.emb_of: dict[str, set[str]] = {}  # worker id -> pixel hashes
        self.aliases: OrderedDict[str, str] = OrderedDict()  # image bytes key -> pixel hash
        self.max_aliases = max_aliases

    # ---- KV blocks ------------------------------------------------------------------------------
    def kv_event(self, worker_id: str, stored: list[str], evicted: list[str]) -> None:
        mine = self.kv_of.setdefault(worker_id, set())
        for h in evicted:
            mine.discard(h)
            holders = self.kv.get(h)
            if holders is not None:
                holders.discard(worker_id)
                if not holders:
                    del self.kv[h]
        for h in stored:
            mine.add(h)
            self.kv.setdefault(h, set()).add(worker_id)

    def longest_prefix(self, hashes: list[str], exclude: str, alive: set[str]) -> tuple[set[str], int]:
        """The alive workers (not ``exclude``) holding the longest leading run of ``hashes``, and its length."""
        if not hashes:
            return set(), 0
        candidates = (self.kv.get(hashes[0], set()) & alive) - {exclude}
        n = 0
        for h in hashes:
            still = candidates & self.kv.get(h, set())
            if not still:
                break
            candidates, n = still, n + 1
        return (candidates if n else set()), n

    # ---- image embeddings -------------------------------------------------------------------------
    def embedding_stored(self, worker_id: str, ref: ImageRef) -> None:
        self.emb.setdefault(ref.content_hash, {})[worker_id] = ref
        self.emb_of.setdefault(worker_id, set()).add(ref.content_hash)

    def embedding_evicted(self, worker_id: str, content_hash: str) -> None:
        holders = self.emb.get(content_hash)
        if holders is not None:
            holders.pop(worker_id, None)
            if not holders:
                del self.emb[content_hash]
        self.emb_of.get(worker_id, set()).discard(content_hash)

    def learn_alias(self, bytes_key: str, content_hash: str) -> None:
        self.aliases[bytes_key] = content_hash
        self.aliases.move_to_end(bytes_key)
        while len(self.aliases) > self.max_aliases:
            self.aliases.popitem(last=False)

    def embedding_for(self, bytes_key: str, alive: set[str]) -> ImageRef | None:
        """A ref to an alive holder of the image whose file hashed to ``bytes_key``, if any."""
        content_hash = self.aliases.get(bytes_key)
        if content_hash is None:
            return None
        self.aliases.move_to_end(bytes_key)
        holders = self.emb.get(content_hash, {})
        for wid in sorted(holders):
            if wid in alive:
                return holders[wid]
        return None

    # ---- workers ------------------------------------------------------------------------------------
    def forget_worker(self, worker_id: str) -> None:
        """A dead or restarted worker holds nothing any more."""
        self.kv_event(worker_id, [], list(self.kv_of.get(worker_id, ())))
        self.kv_of.pop(worker_id, None)
        for h in list(self.emb_of.pop(worker_id, ())):
            self.embedding_evicted(worker_id, h)

    def stats(self) -> dict[str, int]:
        return {"kv_blocks": len(self.kv), "embeddings": len(self.emb), "aliases": len(self.aliases)}
