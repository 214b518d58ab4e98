"""The engine's own thread: sockets never block a step, a step never blocks a socket.

The asyncio side submits work with :meth:`EngineThread.call` (run between
steps, result as an awaitable) and receives every step's outputs through
``on_outputs``, called on the event loop. A prefilled request's handoff is
exported on the engine thread right after the step that finished it, so its
blocks are freed as early as possible.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable

from stages.engine.handoff import Handoff
from stages.engine.llm_engine import LLMEngine
from stages.engine.outputs import RequestOutput

log = logging.getLogger(__name__)


class EngineThread:
    def __init__(self, engine: LLMEngine, loop: asyncio.AbstractEventLoop,
                 on_outputs: Callable[[list[RequestOutput], dict[str, Handoff]], None]):
        self.engine, self.loop, self.on_outputs = engine, loop, on_outputs
        self._calls: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.fatal: BaseException | None = None

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._calls.put(None)
        self.thread.join(timeout=10)

    def call(self, fn: Callable[[LLMEngine], Any]) -> asyncio.Future:
        """Run ``fn(engine)`` on the engine thread; await the result (exceptions propagate)."""
        fut: Future = Future()
        self._calls.put((fn, fut))
        return asyncio.wrap_future(fut, loop=self.loop)

    def _drain(self, block: bool) -> None:
        try:
            item = self._calls.get(block=block, timeout=0.5 if block else None)
        except queue.Empty:
            return
        while item is not None:
            fn, fut = item
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(self.engine))
                except BaseException as e:  # the caller gets it; the engine carries on
                    fut.set_exception(e)
            try:
                item = self._calls.get_nowait()
            except queue.Empty:
                return

    def _run(self) -> None:
        eng = self.engine
        try:
            while not self._stop.is_set():
                self._drain(block=not eng.has_unfinished_requests())
                if not eng.has_unfinished_requests():
                    continue
                outs = eng.step()
                if eng.idle:  # waiting on blocks only a call can free: wait for it, do not spin
                    self._drain(block=True)
                    continue
                handoffs = {o.request_id: eng.export_handoff(o.request_id) for o in outs if o.prefill_done}
                if outs:
                    self.loop.call_soon_threadsafe(self.on_outputs, outs, handoffs)
        except BaseException as e:  # a broken engine must be loud: the worker exits
            log.exception("engine thread died")
            self.fatal = e
            self.loop.call_soon_threadsafe(self.on_outputs, None, None)
