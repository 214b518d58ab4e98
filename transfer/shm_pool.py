"""The holder's segments in /dev/shm, reused from pull to pull.

Fresh tmpfs pages cost more than the copy into them (on the 2-core VM:
~1.8 GB/s to fill a new file, ~6 GB/s to rewrite an existing one), so a
segment a puller has released is written again by a later pull instead of
being unlinked. The holder keeps each segment mapped for its whole life, so
a rewrite is a plain (multi-threaded) ``copy_`` with no page faults.

A segment is *lent* from the reply that names it until the puller's release.
Invariant: a lent segment is never rewritten. If its lease runs out (the
puller died or gave up) it is unlinked, not reused, so even a very late
reader sees the bytes it was promised. Free segments are capped by
``max_free_bytes`` and unlinked after ``lease_s`` unused.

A segment is named ``epd-<pid namespace>-<pid>-<random>``: a holder killed
outright cannot unlink its segments, so every pool sweeps, when it starts,
those whose process is gone (``sweep_dead``).
"""

from __future__ import annotations

import mmap
import os
import re
import secrets
import time
from dataclasses import dataclass, field

SEGMENT_PREFIX = "epd-"
NAME_RE = re.compile(r"^epd-(?P<ns>\d+)-(?P<pid>\d+)-[0-9a-f]{16}$")
_MIN_CAPACITY = 1 << 16


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def owner_prefix(pid: int | None = None) -> str:
    """The name prefix of the segments of process ``pid`` (default: this one)."""
    return f"{SEGMENT_PREFIX}{_pid_namespace()}-{os.getpid() if pid is None else pid}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def sweep_dead(shm_dir: str) -> int:
    """Unlink the segments of processes (of this pid namespace) that no longer exist."""
    ns, removed = str(_pid_namespace()), 0
    for name in os.listdir(shm_dir):
        m = NAME_RE.match(name)
        # Another pid namespace's pids mean nothing here: leave those alone.
        if m and m["ns"] == ns and not _alive(int(m["pid"])):
            unlink(os.path.join(shm_dir, name))
            removed += 1
    return removed


@dataclass(eq=False)
class Segment:
    name: str
    path: str
    capacity: int  # file length; only the pages written are allocated
    fd: int
    mm: mmap.mmap  # the holder's mapping of the whole file
    allocated: int = 0  # bytes [0, allocated) have tmpfs pages (fallocate'd; never punched)
    deadline: float = field(default=float("inf"))  # lent: lease end; free: unlinked if unused by then


def _capacity(size: int) -> int:
    """Size classes are powers of two, so a segment serves any payload of its class."""
    return max(_MIN_CAPACITY, 1 << (size - 1).bit_length())


def unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class SegmentPool:
    """Free and lent segments of one holder; used from the event loop's thread only."""

    def __init__(self, shm_dir: str, lease_s: float, max_free_bytes: int):
        self._dir = shm_dir
        self._lease_s = lease_s
        self._max_free = max_free_bytes
        self._free: dict[int, list[Segment]] = {}
        self._free_bytes = 0
        self._lent: dict[str, Segment] = {}
        self._busy: set[Segment] = set()  # being written: not yet lent, not free

    @property
    def lent(self) -> int:
        return len(self._lent)

    @property
    def free_bytes(self) -> int:
        return self._free_bytes

    def acquire(self, size: int) -> Segment:
        """A segment of at least ``size`` bytes for the caller to write (then ``lend`` or ``discard``)."""
        cap = _capacity(size)
        stack = self._free.get(cap)
        if stack:
            seg = stack.pop()
            self._free_bytes -= cap
        else:
            name = f"{owner_prefix()}{secrets.token_hex(8)}"
            path = os.path.join(self._dir, name)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, cap)  # sparse: pages are allocated by fallocate before each write
                mm = mmap.mmap(fd, cap, flags=mmap.MAP_SHARED)
            except BaseException:
                os.close(fd)
                unlink(path)
                raise
            seg = Segment(name, path, cap, fd, mm)
        self._busy.add(seg)
        return seg

    def lend(self, seg: Segment) -> None:
        self._busy.discard(seg)
        seg.deadline = time.monotonic() + self._lease_s
        self._lent[seg.name] = seg

    def release(self, name: str) -> None:
        """The puller is done reading ``name``: it may be rewritten. Unknown names are ignored."""
        seg = self._lent.pop(name, None)
        if seg is None:
            return
        if self._free_bytes + seg.capacity <= self._max_free:
            seg.deadline = time.monotonic() + self._lease_s
            self._free.setdefault(seg.capacity, []).append(seg)
            self._free_bytes += seg.capacity
        else:
            self._destroy(seg)

    def discard(self, seg: Segment) -> None:
        """Unlink a segment whose write failed (or that must not be reused)."""
        self._busy.discard(seg)
        self._lent.pop(seg.name, None)
        self._destroy(seg)

    def trim(self) -> int:
        """Unlink every free segment (to make room in a full /dev/shm); returns bytes freed."""
        freed = self._free_bytes
        for stack in self._free.values():
            for seg in stack:
                self._destroy(seg)
        self._free.clear()
        self._free_bytes = 0
        return freed

    def expire(self) -> None:
        """Unlink lent segments whose lease has run out (never reuse them) and long-unused free ones."""
        now = time.monotonic()
        for seg in [s for s in self._lent.values() if s.deadline <= now]:
            del self._lent[seg.name]
            self._destroy(seg)
        for cap, stack in self._free.items():
            keep = [s for s in stack if s.deadline > now]
            for seg in stack:
                if seg.deadline <= now:
                    self._free_bytes -= cap
                    self._destroy(seg)
            stack[:] = keep

    def close(self) -> None:
        self.trim()
        for seg in [*self._lent.values(), *self._busy]:
            self._destroy(seg)
        self._lent.clear()
        self._busy.clear()

    @staticmethod
    def _destroy(seg: Segment) -> None:
        unlink(seg.path)
        try:
            os.close(seg.fd)
        except OSError:
            pass
        try:
            seg.mm.close()
        except BufferError:  # a writer still holds a view; the map goes with it
            pass
