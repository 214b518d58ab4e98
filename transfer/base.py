"""The interface every byte-moving backend implements, and its errors.

A worker *publishes* tensors under a string key (an image's content hash, a
request id for KV blocks) with ``put``; a peer that learned the key and the
worker's ``address`` over the bus *pulls* them. Control messages never carry
tensor bytes; backends do.

Invariants every backend keeps:

- ``put`` keeps a reference, not a copy: the caller must not write to a
  published tensor until it is dropped (a pull may read it at any moment).
  Tensors may live on any device; a pull ships their contiguous bytes, so
  dtype and shape survive the trip but strides and device do not.
- ``pull`` returns fresh tensors owned by the caller, on ``device``, never
  views of memory a peer can still write.
- ``pull`` always ends within ``timeout`` (plus the local copy of bytes that
  did arrive): a dead or wedged peer surfaces as ``TransferTimeout``, a peer
  that answers without the key as ``KeyNotFound``; anything else is a
  ``TransferError`` with the reason.
- ``put``/``drop``/``pull``/``start``/``close`` are called from one asyncio
  event loop's thread; ``put``/``drop`` are single dict operations, so the
  engine thread may call them too.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from transfer.wire import check_tensor


class TransferError(RuntimeError):
    """A pull failed; the message says which peer, which key and why."""


class TransferTimeout(TransferError):
    """The peer did not answer within the pull's timeout (dead, wedged or unreachable)."""


class KeyNotFound(TransferError):
    """The peer answered but holds nothing under the key (never put, or dropped)."""


class TransferBackend(ABC):
    """One transport: a server that answers pulls of published keys, and a puller.

    Backends of one worker may share one ``store`` (key -> tensors) so that a
    key published once is served by each of them.
    """

    name: ClassVar[str]  # "ucx" | "shm" | "zmq"

    def __init__(self, store: dict[str, list[torch.Tensor]] | None = None):
        self._store: dict[str, list[torch.Tensor]] = {} if store is None else store
        self.bytes_sent = 0  # payload bytes served to pullers
        self.bytes_received = 0  # payload bytes pulled from peers
        self.pulls_served = 0  # successful answers (KeyNotFound not counted)
        self.pulls_done = 0  # successful pulls by this worker

    @abstractmethod
    async def start(self) -> None:
        """Bind and start serving; afterwards ``address`` is valid."""

    @property
    @abstractmethod
    def address(self) -> str:
        """How a peer reaches this worker's store (sent over the bus)."""

    def put(self, key: str, tensors: list[torch.Tensor]) -> None:
        """Publish ``tensors`` under ``key`` (replacing what was there); keeps references."""
        tensors = list(tensors)
        for t in tensors:
            check_tensor(t)  # fail here, at the holder, rather than at every puller
        self._store[key] = tensors

    def drop(self, key: str) -> None:
        """Forget ``key``; pulls already being answered still complete. Idempotent."""
        self._store.pop(key, None)

    def __contains__(self, key: str) -> bool:
        return key in self._store

    @abstractmethod
    async def pull(
        self, peer_address: str, key: str, *, timeout: float, device: str = "cpu"
    ) -> list[torch.Tensor]:
        """Fetch the tensors a peer published under ``key`` (see the module invariants)."""

    @abstractmethod
    async def close(self) -> None:
        """Stop serving and pulling; release every socket and buffer. Idempotent."""

    def stats(self) -> dict[str, int]:
        return {
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "pulls_served": self.pulls_served,
            "pulls_done": self.pulls_done,
        }
