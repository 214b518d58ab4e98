"""Buffers as ucxx takes them, and the pool that receives land in.

ucxx sends and receives host memory as numpy arrays and device memory as
objects with ``__cuda_array_interface__``; these helpers give a tensor's bytes
either way. ``fresh`` allocates a pull's destination: CUDA tensors and host ones
of 1 MiB or more come from ``recv_pool`` (see ``RecvPool``).
"""

from __future__ import annotations

import threading
import weakref

import numpy as np
import torch

from transfer.wire import byte_view, numel


class _CudaBytes:
    """A contiguous CUDA tensor's bytes as ucxx takes device memory (``__cuda_array_interface__``).

    Our own, not the tensor's: torch's refuses tensors that require grad and has
    no typestr for bf16; a flat uint8 view needs neither.
    """

    def __init__(self, flat: torch.Tensor):
        self.tensor = flat  # keeps the memory alive while UCX uses it
        self.nbytes = flat.numel()
        self.__cuda_array_interface__ = {"shape": (flat.numel(),), "typestr": "|u1", "strides": None,
                                         "data": (flat.data_ptr(), False), "version": 3}


def ucx_buffer(t: torch.Tensor):
    """The bytes of a C-contiguous tensor as ucxx sends and receives them (host: numpy, no copy)."""
    flat = byte_view(t)
    return _CudaBytes(flat) if flat.is_cuda else flat.numpy()


def send_buffer(t: torch.Tensor):
    """What ucxx sends for ``t``: its contiguous bytes (CUDA stays on the device)."""
    return ucx_buffer(t.detach().resolve_conj().resolve_neg().contiguous())


def inline_bytes(buf) -> bytes:
    """A send buffer's bytes for the reply header (a device copy for CUDA: ~10 us, not a message)."""
    return buf.tensor.cpu().numpy().tobytes() if isinstance(buf, _CudaBytes) else buf.tobytes()


def fresh(dtype: torch.dtype, shape: list[int], dev: torch.device) -> torch.Tensor:
    """An uninitialised tensor to receive into: CUDA ones and big host ones come from the pool."""
    n = numel(shape) * dtype.itemsize
    if n == 0 or (dev.type == "cpu" and n < _POOLED_BYTES):
        return torch.empty(shape, dtype=dtype, device=dev)
    return recv_pool.take(n, dev).view(dtype).view(shape)


class _CudaLease(_CudaBytes):
    """A pooled CUDA buffer's first ``n`` bytes, as ``torch.as_tensor`` wraps device memory."""

    def __init__(self, base: torch.Tensor, n: int):
        super().__init__(base[:n])


class RecvPool:
    """Receive buffers, per device, that come back when the caller's tensors die.

    A pull must return fresh tensors, but fresh memory costs: on the host,
    first-touch page faults (~2.8 GB/s here against ~10 GB/s for UCX); on a
    GPU, a destination UCX has not seen yet (cuda_ipc registers each new
    buffer). Buffers are rounded up to a size class (at most 1/8 larger) and
    lent as a tensor over their first ``n`` bytes whose storage holds a lease
    object (a numpy view on the host, a ``__cuda_array_interface__`` on a GPU);
    a finalizer on the lease returns the buffer once the tensor and all its
    views are gone, up to ``max_bytes`` kept free per device. Only then can
    anything write to it again.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._free: dict[tuple[torch.device, int], list] = {}
        self._free_bytes: dict[torch.device, int] = {}
        self._lock = threading.Lock()  # the last reference may die on the engine thread
        self.hits = self.misses = 0

    @staticmethod
    def size_class(n: int) -> int:
        step = max(1 << max(n.bit_length() - 4, 0), 4096)
        return -(-n // step) * step

    def take(self, n: int, dev: torch.device = torch.device("cpu")) -> torch.Tensor:
        """A uint8 tensor of ``n`` bytes on ``dev``, uninitialised."""
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        size = self.size_class(n)
        with self._lock:
            free = self._free.get((dev, size))
            base = free.pop() if free else None
            if base is not None:
                self._free_bytes[dev] -= size
                self.hits += 1
            else:
                self.misses += 1
        if dev.type == "cpu":
            base = np.empty(size, dtype=np.uint8) if base is None else base
            lease = base[:n]
            out = torch.frombuffer(lease, dtype=torch.uint8)
        else:
            base = torch.empty(size, dtype=torch.uint8, device=dev) if base is None else base
            lease = _CudaLease(base, n)
            out = torch.as_tensor(lease, device=dev)  # its storage keeps the lease alive
        weakref.finalize(lease, self._give_back, dev, base)
        return out

    def _give_back(self, dev: torch.device, base) -> None:
        with self._lock:
            kept = self._free_bytes.get(dev, 0)
            if kept + base.nbytes <= self.max_bytes:
                self._free.setdefault((dev, base.nbytes), []).append(base)
                self._free_bytes[dev] = kept + base.nbytes


_POOLED_BYTES = 1 << 20  # host buffers below this come from malloc, whose free lists are as good
recv_pool = RecvPool(1 << 30)
