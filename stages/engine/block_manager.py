"""KV block bookkeeping with prefix caching.

Blocks are reference counted. A block whose count drops to zero goes to the
free queue but keeps its content hash, so a later request with the same
prefix can take it back until it is evicted (least recently freed first).

A full block's hash chains its parent's: ``hash(parent, token ids, extra)``,
where ``extra`` names each image overlapping the block by its content hash
and the block's offset into the image's placeholder run — placeholder token
ids are all alike, the pixels are not. A hit is re-checked against the
block's stored token ids before use.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from stages.engine.sequence import Sequence
from transfer.hash_keys import hash_block  # shared with the router, which prices prefix hits by it


def block_extra_keys(seq: Sequence, start: int, end: int) -> tuple:
    return tuple((img.content_hash, start - img.offset) for img in seq.images
                 if img.offset < end and start < img.offset + img.length)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True):
        self.num_blocks, self.block_size, self.enable_caching = num_blocks, block_size, enable_caching
        self.ref_count = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # hash -> block id
        self.prefix_queries = 0  # tokens looked up in the prefix cache
        self.prefix_hits = 0  # tokens found there
        # (stored?, hash) in the order they happened, for the cluster index; a worker turns
        # this on (``record_events``) and drains it. Off in offline use: nobody would drain it.
        self.events: deque[tuple[bool, int]] | None = None

    def record_events(self, limit: int = 1 << 20) -> None:
        self.events = deque(maxlen=limit)

    # ---- accounting -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_queue)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        return max(0, total - len(seq.block_table))

    # ---- prefix cache -----------------------------------------------------------------------
    def _full_block_hashes(self, seq: Sequence, num_tokens: int) -> list[int]:
        """Extend ``seq.block_hashes`` to cover the full blocks among its first ``num_tokens``."""
        bs = self.block_size
        for i in range(len(seq.block_hashes), num_tokens // bs):
            start, end = i * bs, (i + 1) * bs
            parent = seq.block_hashes[i - 1] if i else None
            seq.block_hashes.append(hash_block(parent, seq.token_ids(start, end),
                                               block_extra_keys(seq, start, end)))
        return seq.block_hashes

    def match_prefix(self, seq: Sequence) -> int:
        """Attach cached blocks holding ``seq``'s longest cached prefix; returns tokens covered.

        The last token is always left to compute: its logits are needed.
        """
        if not self.enable_caching or seq.block_table:
            return 0
        bs = self.block_size
        max_blocks = (seq.num_tokens - 1) // bs
        hashes = self._full_block_hashes(seq, max_blocks * bs)
        self.prefix_queries += seq.num_tokens
        for i in range(max_blocks):
            block = self.cached.get(hashes[i])
            if block is None or self.block_tokens[block] != tuple(seq.token_ids(i * bs, (i + 1) * bs)):
                break
            if self.ref_count[block] == 0:
                del self.free_queue[block]
            self.ref_count[block] += 1
            seq.block_table.append(block)
        n = len(seq.block_table) * bs
        self.prefix_hits += n
        return n

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the blocks that ``seq``'s computed tokens have filled since the last call."""
        if not self.enable_caching:
            return
        bs = self.block_size
        n_full = seq.num_computed_tokens // bs
        hashes = self._full_block_hashes(seq, n_full * bs)
        # Blocks before seq.num_registered_blocks were registered by an earlier call and keep their
        # hash while seq holds them: start after them (a loop from 0 cost O(context) per step).
        for i in range(seq.num_registered_blocks, n_full):
            block = seq.block_table[i]
            if self.block_hash[block] is not None:
                continue
            h = hashes[i]
            self.block_hash[block] = h
            self.block_tokens[block] = tuple(seq.token_ids(i * bs, (i + 1) * bs))
            if h not in self.cached:
                self.cached[h] = block
                if self.events is not None:
                    self.events.append((True, h))
        seq.num_registered_blocks = max(seq.num_registered_blocks, n_full)

    # ---- the prefix as other workers see it ---------------------------------------------------
    def prefix_hashes(self, seq: Sequence) -> list[int]:
        """Hashes of the full prompt blocks a prefix hit could cover (never the last token's)."""
        n_blocks = (seq.num_tokens - 1) // self.block_size
        return list(self._full_block_hashes(seq, n_blocks * self.block_size)[:n_blocks])

    def cached_run(self, seq: Sequence) -> int:
        """How many leading prompt blocks of ``seq`` this pool holds now (tokens re-checked)."""
        if not self.enable_caching:
            return 0
        bs, n = self.block_size, 0
        for i, h in enumerate(self.prefix_hashes(seq)):
            block = self.cached.get(h)
            if block is None or self.block_tokens[block] != tuple(seq.token_ids(i * bs, (i + 1) * bs)):
                break
            n += 1
        return n

    def blocks_of(self, hashes: list[int]) -> list[int]:
        """The blocks holding the longest leading run of ``hashes`` held here."""
        out = []
        for h in hashes:
            block = self.cached.get(h)
            if block is None:
                break
            out.append(block)
        return out

    # ---- allocation -------------------------------------------------------------------------
    def can_allocate(self, n_blocks: int) -> bool:
        return n_blocks <= len(self.free_queue)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Give ``seq`` room for ``num_new_tokens`` more tokens; False (and no change) if short."""
        need = self.blocks_needed(seq, num_new_tokens)
        if need > len(self.free_queue):
            return False
        for _ in range(need):
            block, _ = self.free_queue.popitem(last=False)
            self._evict(block)
            self.ref_count[block] = 1
            seq.block_table.append(block)
        return True

    def _evict(self, block: int) -> None:
        h = self.block_hash[block]
        if h is not None:
            if self.cached.get(h) == block:
                del self.cached[h]
                if self.events is not None:
                    self.events.append((False, h))
            self.block_hash[block] = None
            self.block_tokens[block] = None

    def free(self, seq: Sequence) -> None:
        """Drop ``seq``'s references; its tail blocks are queued to be evicted first."""
        for block in reversed(seq.block_table):
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                if self.block_hash[block] is None:
                    self.free_queue[block] = None
                    self.free_queue.move_to_end(block, last=False)  # uncached: reuse first
                else:
                    self.free_queue[block] = None
        seq.block_table = []
        seq.num_registered_blocks = 0

    def reset_prefix_cache(self) -> None:
        for block in list(self.free_queue):
            self._evict(block)
