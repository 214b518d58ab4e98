"""How much of a request's prompt each worker's prefix cache already holds, seen from the router.

The plan prices prefill on the tokens a worker must still compute: a worker whose prefix cache
(or, through the cluster cache, another worker's) holds the prompt's first blocks prefills only
the rest, on top of them (``WorkerCost.prefill_s(new, cached)``). The router hashes the prompt's
full blocks as the engine does (``transfer.hash_keys.hash_block``: ``hash(parent, token ids,
extra)`` with ``extra`` naming each image overlapping the block by its pixel hash and the block's
offset into the image's run; the last token never in a hit) and looks the hashes up in the
cluster index (``router/cluster_index.py``), which the workers' ``KvCacheEvent`` batches fill.

The router never decodes an image, so it knows an image's pixel hash only once an encode told it
(the index's ``aliases``): hashing stops at the first block that overlaps an image it has not
seen. The index may lag a worker by one event batch or name an evicted block: a wrong hint costs
a misprediction, never a wrong answer (the worker re-checks every block it reuses).
"""

from __future__ import annotations

from router.cluster_index import ClusterIndex
from router.request_size import RequestSize
from transfer.hash_keys import hash_block, image_bytes_key

PREFIX_PULL_S = 0.005  # a PrefixQuery round trip, the holder's copy-out and the pull (ms on one host)


def block_hashes(size: RequestSize, pixel_hashes: list[str | None], block_size: int) -> list[str]:
    """The hex hashes of the prompt's full blocks a prefix hit could cover, as the workers report
    them, up to the first block overlapping an image whose pixel hash is unknown (None)."""
    ids = size.token_ids
    if ids is None or block_size < 1:
        return []
    images = list(zip(size.image_offsets, size.image_tokens, pixel_hashes))
    out: list[str] = []
    parent = None
    for i in range((len(ids) - 1) // block_size):
        start, end = i * block_size, (i + 1) * block_size
        extra = []
        for offset, length, pixel in images:
            if offset < end and start < offset + length:
                if pixel is None:
                    return out
                extra.append((pixel, start - offset))
        parent = hash_block(parent, ids[start:end], tuple(extra))
        out.append(f"{parent:032x}")
    return out


class PrefixView:
    """One request's prompt blocks against the cluster index: cached tokens per prefill worker."""

    def __init__(self, index: ClusterIndex | None, size: RequestSize, images: list[bytes], remote: bool,
                 alive: set[str]):
        self.index, self.size, self.remote, self.alive = index, size, remote, alive
        self.pixels = [index.aliases.get(image_bytes_key(b)) if index is not None else None for b in images]
        self._hashes: dict[int, list[str]] = {}
        self._best_remote: dict[int, dict[str, int]] = {}

    def hashes(self, block_size: int) -> list[str]:
        if block_size not in self._hashes:
            self._hashes[block_size] = block_hashes(self.size, self.pixels, block_size)
        return self._hashes[block_size]

    def _run(self, hashes: list[str], worker_id: str) -> int:
        """Leading blocks of ``hashes`` the index says ``worker_id`` holds (read only: no LRU touch)."""
        n = 0
        for h in hashes:
            if worker_id not in self.index.kv.get(h, ()):
                break
            n += 1
        return n

    def cached(self, worker_id: str, block_size: int) -> tuple[int, int]:
        """(tokens ``worker_id`` holds itself, tokens it would pull from the best other holder)
        of this prompt's leading blocks; the pull only counts when it adds blocks."""
        if self.index is None or not self.index.kv:
            return 0, 0
        hashes = self.hashes(block_size)
        if not hashes:
            return 0, 0
        local = self._run(hashes, worker_id)
        best = 0
        if self.remote:
            # The longest run any other alive worker holds: what the router's PrefixQuery answer
            # would point this worker at (``ClusterCache.on_prefix_query``).
            runs = self._best_remote.setdefault(block_size, {})
            if not runs:
                for h in hashes[:1]:
                    for w in self.index.kv.get(h, ()):
                        if w in self.alive:
                            runs[w] = self._run(hashes, w)
            best = max((n for w, n in runs.items() if w != worker_id), default=0)
        return local * block_size, max(best - local, 0) * block_size
