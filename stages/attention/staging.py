"""Host-to-device copies of per-step arrays through pinned buffers allocated once.

Pinning a fresh host buffer every step (``tensor.pin_memory()``) cost milliseconds for
buffers of a few hundred KB on the H200 machine; one buffer per call site, grown when
short, makes the copy asynchronous at no allocation cost. A write waits for the
previous copy out of the same buffer (an event), which by then has long finished.
"""

from __future__ import annotations

import numpy as np
import torch


class PinnedStaging:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.buf: torch.Tensor | None = None
        self.view: np.ndarray | None = None
        self.event: torch.cuda.Event | None = None

    def to_device(self, arr: np.ndarray, device: torch.device) -> torch.Tensor:
        """``arr`` (numpy) as a tensor of ``self.dtype`` on ``device``; asynchronous on CUDA."""
        if device.type != "cuda":
            return torch.from_numpy(np.ascontiguousarray(arr)).to(device=device, dtype=self.dtype)
        n = arr.size
        if self.buf is None or self.buf.numel() < n:
            size = max(n, 4096, 2 * (self.buf.numel() if self.buf is not None else 0))
            self.buf = torch.empty(size, dtype=self.dtype).pin_memory()  # the old one is freed safely
            self.view = self.buf.numpy()
        elif self.event is not None:
            self.event.synchronize()
        self.view[:n] = arr.reshape(-1)
        out = self.buf[:n].to(device, non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record()
        return out.view(arr.shape)
