"""A byte-budgeted LRU of tensors keyed by content hash.

Encode workers keep image embeddings here (keyed by the hash of the decoded
pixels); the same keys travel on the bus and index the cluster.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class ContentCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.used_bytes = 0
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> torch.Tensor | None:
        t = self._items.get(key)
        if t is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return t

    def put(self, key: str, value: torch.Tensor) -> list[str]:
        """Store ``value``; returns the keys evicted to make room (an item over budget is not kept)."""
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return []
        if key in self._items:
            self._items.move_to_end(key)
            return []
        evicted = []
        while self.used_bytes + size > self.max_bytes:
            old, t = self._items.popitem(last=False)
            self.used_bytes -= t.numel() * t.element_size()
            evicted.append(old)
        self._items[key] = value
        self.used_bytes += size
        return evicted

    def keys(self) -> list[str]:
        return list(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)
