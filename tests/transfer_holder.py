"""A holder process for the transfer tests: publishes payloads, then obeys a pipe.

``spawn_holder(payloads, kind, *args)`` starts it (spawn context) and returns
(process, pipe, card); ``payloads(*args)`` must be a module-level function (it
is pickled by reference) returning key -> tensors, the same in every process.
Commands: ``("stats",)`` -> the backend's stats (plus the shm pool's when it
runs shm), ``("stall", seconds)`` -> blocks its event loop as a wedged worker
would, ``("close",)`` -> closes and answers "closed".
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import threading
import time

from transfer.select import make_backend


def _holder(conn, payloads, kind: str, args: tuple) -> None:
    async def main() -> None:
        t = make_backend(kind, "127.0.0.1")
        await t.start()
        for key, tensors in payloads(*args).items():
            t.put(key, tensors)
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def command(msg):
            if msg[0] == "stats":
                stats, shm = t.stats(), t.backend("shm")
                if shm is not None:
                    stats |= {"lent": shm.pool.lent, "free_bytes": shm.pool.free_bytes}
                conn.send(stats)
            elif msg[0] == "stall":
                conn.send("stalling")
                time.sleep(msg[1])
            elif msg[0] == "close":
                loop.create_task(close_and_reply())

        async def close_and_reply():
            await t.close()
            conn.send("closed")
            done.set_result(None)

        def reader():
            while True:
                msg = conn.recv()
                loop.call_soon_threadsafe(command, msg)
                if msg[0] == "close":
                    return

        conn.send(t.card)
        threading.Thread(target=reader, daemon=True).start()
        await done

    asyncio.run(main())


def spawn_holder(payloads, kind: str = "auto", *args):
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_holder, args=(child, payloads, kind, args), daemon=True)
    proc.start()
    if not parent.poll(60):
        proc.kill()
        raise RuntimeError("holder did not start")
    return proc, parent, parent.recv()
