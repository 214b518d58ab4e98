"""Progress for this process's UCX worker on an asyncio loop: asleep on events, never spinning when idle.

Why not ucxx's own progress modes (0.52):

- ``blocking`` adds a reader for the worker's epoll fd whose callback
  progresses the worker but never re-arms it (``ucp_worker_arm``), and its
  arming task runs once, at start. After the first UCX event the fd stays
  readable for good and the callback runs on every turn of the loop: an idle
  worker that once served a pull kept a core at ~95% (issue 10, item 5).
- ``polling`` spins by design; ``thread`` puts a thread hop and a Python future
  behind every completion (64 MiB between two processes here: 5.2 GB/s, against
  9.8 for ``blocking``, which by then was polling as above) and a thread that
  fights the event loop for the GIL on a 2-core host.

So ucxx starts in ``blocking`` mode (for the epoll fd; no notifier thread) and
one ``Progress`` per event loop takes over from ucxx's reader:

- a *run* progresses the worker, wakes every ``event()`` waiter, then arms the
  worker; ``UCS_ERR_BUSY`` means events came in meanwhile: another run next
  turn. So after every run the worker is armed or another run is queued, and an
  idle loop sleeps in epoll until a message arrives.
- a run is queued when the fd turns readable and on ``kick()`` (a send or
  receive was posted, an endpoint aborted).
- ``wait(requests)`` sleeps on events until the requests it awaits are done,
  re-checking every ``MIN_PAUSE_S`` doubling to ``MAX_PAUSE_S`` in case a
  transport completes without one; a pull from a wedged peer costs a few
  wake-ups a second, not a core. With ``poll_s`` it polls instead (one run per
  turn of the loop) for that long after the start and after each completion:
  copies of device memory (cuda_ipc, cuda_copy) finish in a progress call,
  with no event.

Host memory is never polled: on this 2-core machine, loaded, a 32 KiB to 2 MiB
pull between two processes took 5-24 ms when both ends polled for 2-20 ms
(the poller takes the CPU its peer needs to answer) against 0.3-1.8 ms asleep
on events; 4 KiB, 0.3-0.6 ms either way (``perf/bench_transfer.py``, one run,
alternating).
"""

from __future__ import annotations

import asyncio
import logging
import weakref

log = logging.getLogger(__name__)

POLL_CUDA_S = 0.05  # the polling window of transfers of device memory (see wait)
MIN_PAUSE_S = 0.001
MAX_PAUSE_S = 0.05


class Progress:
    """Drives the UCX worker from one event loop (see the module docstring)."""

    def __init__(self, ucxx, loop: asyncio.AbstractEventLoop):
        from ucxx._lib_async import application_context as appctx

        ctx = ucxx.core._get_ctx()
        if ctx.progress_mode != "blocking":
            raise RuntimeError(f"ucxx runs in {ctx.progress_mode!r} progress mode; the ucx backend needs 'blocking'")
        self.worker, self.loop = ctx.worker, loop
        self.fd = self.worker.epoll_file_descriptor
        self.runs = 0  # how many times the worker was progressed here (tests read it)
        self._queued: asyncio.Handle | None = None
        self._waiters: list[asyncio.Future] = []
        # ucxx's BlockingMode for this loop, if it made one (ucxx.init or create_endpoint on this
        # loop): stop its tasks and take its fd. It stays referenced, because its finalizer
        # removes whatever reader the fd has, and so would remove ours.
        self._replaced = appctx.ProgressTasks.get(loop)
        for task in getattr(self._replaced, "_tasks", ()):
            if task is not None:
                task.cancel()
        appctx.ProgressTasks[loop] = self  # ucxx's continuous_ucx_progress() is a no-op here now
        loop.add_reader(self.fd, self.kick)
        self.kick()

    def kick(self) -> None:
        """Progress the worker on the loop's next turn (once, however often asked before then)."""
        if self._queued is None and not self.loop.is_closed():
            self._queued = self.loop.call_soon(self._run)

    def _run(self) -> None:
        self._queued = None
        self.runs += 1
        try:
            self.worker.progress()
            armed = self.worker.arm()
        except Exception:  # noqa: BLE001 - failures belong to requests; keep progressing, slowly
            log.exception("progressing the UCX worker failed")
            self._queued = self.loop.call_later(MAX_PAUSE_S, self._run)
            armed = True
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)
        if not armed:
            self.kick()  # events arrived since the progress: handle them before sleeping

    async def event(self, timeout: float | None = None) -> None:
        """Until the worker was next progressed (an fd event or a kick), or ``timeout`` seconds."""
        fut = self.loop.create_future()
        self._waiters.append(fut)
        if timeout is None:
            await fut
            return
        handle = self.loop.call_later(timeout, lambda: fut.done() or fut.set_result(None))
        try:
            await fut
        finally:
            handle.cancel()

    async def wait(self, requests: list, poll_s: float = 0.0) -> None:
        """Until every posted request is done (all are in flight at once); raises the first failure.

        Polls for ``poll_s`` after the start and after each completion, then sleeps on events.
        """
        loop = self.loop
        poll_until = loop.time() + poll_s
        pause = 0.0
        for r in requests:
            while not r.completed:
                if loop.time() < poll_until:
                    self.kick()  # polling: one run per turn of the loop
                    await self.event()
                    continue
                pause = min(max(2 * pause, MIN_PAUSE_S), MAX_PAUSE_S)
                await self.event(pause)  # asleep until an event or the pause
                if not r.completed:
                    self.kick()  # a transport may finish without an event: look anyway
                    await self.event()
            r.check_error()
            poll_until, pause = loop.time() + poll_s, 0.0


_drivers: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Progress]" = weakref.WeakKeyDictionary()


def progress(ucxx) -> Progress:
    """The running loop's ``Progress`` (made on first use)."""
    loop = asyncio.get_running_loop()
    drv = _drivers.get(loop)
    if drv is None:
        drv = _drivers[loop] = Progress(ucxx, loop)
    return drv
