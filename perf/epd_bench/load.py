"""Open-loop load: arrivals at a request rate (Poisson or gamma), an optional concurrency cap,
warm-up requests kept out of the figures."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np

from .client import RequestResult, chat_body, make_session, send
from .datasets import Request


def arrival_times(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send offsets (seconds from the start) of ``n`` requests.

    Gaps are gamma(shape=burstiness, scale=1/(rate*burstiness)): mean 1/rate, burstiness 1 is
    Poisson, < 1 burstier, > 1 more even. ``rate=inf`` sends everything at once. As vLLM does,
    the offsets are rescaled so that the last lands at n/rate, which keeps the offered load
    equal across seeds.
    """
    if burstiness <= 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    if rate == float("inf"):
        return [0.0] * n
    if rate <= 0:
        raise ValueError(f"request rate must be > 0, got {rate}")
    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n))
    if n and t[-1] > 0:
        t *= (n / rate) / t[-1]
    return t.tolist()


@dataclass
class LoadResult:
    results: list[RequestResult]
    wall_s: float        # first send -> last finish of the measured requests
    cpu_s: float         # this process's CPU time over the measured run

    @property
    def cpu_share(self) -> float:
        """CPU seconds per wall second (1.0 = one core busy the whole time)."""
        return self.cpu_s / self.wall_s if self.wall_s > 0 else 0.0


async def run_load(base_url: str, model: str, requests: list[Request], rate: float = float("inf"),
                   burstiness: float = 1.0, max_concurrency: int | None = None, warmup: int = 0,
                   seed: int = 0, ignore_eos: bool = True, progress=None, trust_env: bool = False) -> LoadResult:
    """Send ``warmup`` requests (the first ones of ``requests``, not measured), then every request
    at its arrival time; ``progress`` is called once per finished measured request."""
    url = base_url.rstrip("/") + "/v1/chat/completions"
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    async with make_session(limit=max_concurrency or 0, trust_env=trust_env) as session:

        async def one(req: Request) -> RequestResult:
            body = chat_body(req, model, ignore_eos)
            if sem is None:
                return await send(session, url, body, req.n_images)
            async with sem:
                return await send(session, url, body, req.n_images)

        if warmup:
            await asyncio.gather(*(one(requests[i % len(requests)]) for i in range(warmup)))

        offsets = arrival_times(len(requests), rate, burstiness, seed)
        cpu0, t0 = time.process_time(), time.perf_counter()

        async def arrive(req: Request, offset: float) -> RequestResult:
            delay = t0 + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            res = await one(req)
            if progress is not None:
                progress()
            return res

        results = await asyncio.gather(*(arrive(r, o) for r, o in zip(requests, offsets)))
        cpu = time.process_time() - cpu0
    first = min((r.send for r in results), default=t0)
    last = max((r.end for r in results), default=t0)
    return LoadResult(list(results), last - first, cpu)
