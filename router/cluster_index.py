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
  (``aliases``).

Every map is bounded (``router.cluster_cache`` in the configs): when one is
full, its least recently stored or hit entry goes. Forgetting an entry only
loses a hint (a recompute at most), while the workers' pools alone would let
the router mirror every KV block of every worker (~23 MB per 65,536-block pool: the soak's RSS growth).
Invariant: ``kv_of[w]`` holds exactly the hashes ``h`` with ``w in kv[h]``, and
``emb_of[w]`` the pixel hashes ``h`` with ``w in emb[h]``.
"""

from __future__ import annotations

from collections import Counter, OrderedDict

from bus.messages import ImageRef

MAX_KV_ENTRIES = 100_000  # ~46 MB at ~480 B each (hash, holder set, LRU links, reverse map)
MAX_EMBEDDING_ENTRIES = 20_000
MAX_ALIASES = 100_000

KINDS = ("kv_blocks", "embeddings", "aliases")  # the ``kind`` label of the index's metrics


class ClusterIndex:
    def __init__(self, max_kv_entries: int = MAX_KV_ENTRIES, max_embedding_entries: int = MAX_EMBEDDING_ENTRIES,
                 max_aliases: int = MAX_ALIASES):
        if min(max_kv_entries, max_embedding_entries, max_aliases) < 1:
            raise ValueError("cluster-index bounds must be at least 1")
        # Each OrderedDict runs from least to most recently stored or hit.
        self.kv: OrderedDict[str, set[str]] = OrderedDict()  # block hash -> worker ids
        self.kv_of: dict[str, set[str]] = {}  # worker id -> block hashes
        self.emb: OrderedDict[str, dict[str, ImageRef]] = OrderedDict()  # pixel hash -> worker id -> ref
        self.emb_of: dict[str, set[str]] = {}  # worker id -> pixel hashes
        self.aliases: OrderedDict[str, str] = OrderedDict()  # image bytes key -> pixel hash
        self.capacity = {"kv_blocks": max_kv_entries, "embeddings": max_embedding_entries, "aliases": max_aliases}
        self.evictions: Counter[str] = Counter({kind: 0 for kind in KINDS})

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
        # Children before parents, so that a chain's head is the newest and a full index drops
        # tails first: a block whose parent is forgotten can never be part of a hit.
        for h in reversed(stored):
            mine.add(h)
            holders = self.kv.get(h)
            if holders is None:
                self.kv[h] = {worker_id}
            else:
                holders.add(worker_id)
                self.kv.move_to_end(h)
        while len(self.kv) > self.capacity["kv_blocks"]:
            h, holders = self.kv.popitem(last=False)
            for wid in holders:
                self.kv_of[wid].discard(h)
            self.evictions["kv_blocks"] += 1

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
        for h in reversed(hashes[:n]):  # a hit: the run is recent again, its head newest
            self.kv.move_to_end(h)
        return (candidates if n else set()), n

    # ---- image embeddings -------------------------------------------------------------------------
    def embedding_stored(self, worker_id: str, ref: ImageRef) -> None:
        holders = self.emb.get(ref.content_hash)
        if holders is None:
            holders = self.emb[ref.content_hash] = {}
        else:
            self.emb.move_to_end(ref.content_hash)
        holders[worker_id] = ref
        self.emb_of.setdefault(worker_id, set()).add(ref.content_hash)
        while len(self.emb) > self.capacity["embeddings"]:
            h, gone = self.emb.popitem(last=False)
            for wid in gone:
                self.emb_of[wid].discard(h)
            self.evictions["embeddings"] += 1

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
        while len(self.aliases) > self.capacity["aliases"]:
            self.aliases.popitem(last=False)
            self.evictions["aliases"] += 1

    def embedding_for(self, bytes_key: str, alive: set[str]) -> ImageRef | None:
        """A ref to an alive holder of the image whose file hashed to ``bytes_key``, if any."""
        content_hash = self.aliases.get(bytes_key)
        if content_hash is None:
            return None
        self.aliases.move_to_end(bytes_key)
        holders = self.emb.get(content_hash, {})
        for wid in sorted(holders):
            if wid in alive:
                self.emb.move_to_end(content_hash)
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
