"""Segment bytes: where each tensor sits in a segment, and the copies in and out.

The holder writes through its long-lived mapping of a pooled segment; the
puller reads with ``preadv`` (small) or a short-lived mapping (large, or into
a GPU tensor).
"""

from __future__ import annotations

import mmap
import os

import numpy as np
import torch

from transfer.base import TransferError
from transfer.shm_pool import Segment
from transfer.ucx_buffers import fresh
from transfer.wire import byte_view, dtype_from_name, nbytes, needs_host_copy, numel

_ALIGN = 64


def layout(tensors: list[torch.Tensor]) -> tuple[list[int], int]:
    """Each tensor's offset (64-byte aligned, in order) and the segment size."""
    offsets, end = [], 0
    for t in tensors:
        offsets.append(end)
        end += -(-nbytes(t) // _ALIGN) * _ALIGN
    return offsets, end


def write_segment(seg: Segment, fd: int, tensors: list[torch.Tensor], offsets: list[int], size: int) -> None:
    """Copy ``tensors`` into the holder's mapping of ``seg``; closes ``fd`` (a dup owned by this call).

    ``posix_fallocate`` first: a mapped write to a page tmpfs cannot supply is a
    SIGBUS, so a full /dev/shm must fail here, as ENOSPC, instead.
    """
    whole = None
    try:
        if size > seg.allocated:
            os.posix_fallocate(fd, 0, size)
            seg.allocated = size
        # numpy (not torch.frombuffer) pins the map: closing it under this view fails loudly.
        whole = torch.from_numpy(np.frombuffer(seg.mm, dtype=np.uint8, count=size))
        for t, off in zip(tensors, offsets):
            n = nbytes(t)
            if not n:
                continue
            if needs_host_copy(t):
                # copy_ reads any device and any strides: no separate host/contiguous copy.
                whole[off:off + n].view(t.dtype).view(t.shape).copy_(t.detach())
            else:
                # One memcpy on this thread: torch's copy_ would wake its OpenMP team,
                # whose spinning steals the core the puller needs next (2-core VM).
                np.copyto(whole[off:off + n].numpy(), byte_view(t.detach()).numpy())
    finally:
        del whole
        os.close(fd)


def check_layout(layout: list, size: int) -> list[tuple[torch.dtype, list[int], int, int]]:
    out = []
    for (dtype_s, shape), off in layout:
        dtype = dtype_from_name(dtype_s)
        n = dtype.itemsize * numel(shape)
        if not isinstance(off, int) or off < 0 or off + n > size:
            raise ValueError(f"tensor at {off}+{n} lies outside the {size}-byte segment")
        out.append((dtype, list(shape), off, n))
    return out


_MAPPED_COPY_BYTES = 32 << 20  # from here a 2-thread copy_ beats one preadv (fresh pages fault faster)


def read_segment(path: str, size: int, items: list, device: str) -> list[torch.Tensor]:
    """Copy the tensors out of a segment into fresh tensors on ``device``.

    Big ones come from the receive pool the ucx backend uses too (``ucx_buffers.fresh``):
    pages already touched. Fresh pages cost more than the copy (64 MiB: ~0.9 GB/s
    into new memory against ~8 GB/s for the copy here).
    """
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        raise TransferError(f"segment {path} is gone (holder closed, or its lease ran out)") from None
    mm = whole = None
    try:
        out = []
        for dtype, shape, off, n in items:
            t = fresh(dtype, shape, torch.device(device))
            if n and t.device.type == "cpu" and n < _MAPPED_COPY_BYTES:
                view = memoryview(byte_view(t).numpy())
                while view:
                    got = os.preadv(fd, [view], off)
                    if not got:
                        raise TransferError(f"segment {path} is shorter than its layout")
                    view, off = view[got:], off + got
            elif n:
                if mm is None:
                    mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
                    # numpy (not torch.frombuffer) pins the map: closing it under a live view fails loudly.
                    whole = torch.from_numpy(np.frombuffer(mm, dtype=np.uint8, count=size))
                t.copy_(whole[off:off + n].view(dtype).view(shape))
            out.append(t)
        return out
    finally:
        os.close(fd)
        del whole
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # a view lives on in a traceback; the map goes when it does
                pass
