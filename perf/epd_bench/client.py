"""The streaming chat client: one aiohttp session, every SSE chunk timed.

Timing follows ``vllm bench serve`` (openai-chat backend) so that both give the same figures:
TTFT is the first chunk carrying content, ITL the gaps between content chunks, e2e ends at the
last chunk carrying a choice (the ``[DONE]`` line and the usage chunk carry no token), and the
output token count comes from the usage chunk.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import aiohttp

from .datasets import Request


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    send: float = 0.0          # perf_counter() when the request left
    ttft: float = 0.0          # seconds
    e2e: float = 0.0           # seconds, send -> last token chunk (-> the failure if not ok)
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    n_images: int = 0

    @property
    def end(self) -> float:
        return self.send + self.e2e

    @property
    def tpot(self) -> float:
        """vLLM's TPOT: (e2e - ttft) / (output_tokens - 1); 0 for one token or fewer."""
        if self.output_tokens <= 1:
            return 0.0
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def make_session(limit: int = 0, trust_env: bool = False) -> aiohttp.ClientSession:
    """One session for the whole run; ``limit`` caps open connections (0 = no cap).

    ``trust_env`` (proxy variables, ~/.netrc) is off by default: aiohttp then reads netrc in a
    worker thread on every request, inside the timed window. ``vllm bench serve`` turns it on,
    which is why its TTFT reads ~2 ms higher than ours on a loaded 2-core host.
    """
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit, ttl_dns_cache=300),
                                 trust_env=trust_env, timeout=aiohttp.ClientTimeout(total=6 * 3600),
                                 read_bufsize=1 << 20)


def chat_body(req: Request, model: str, ignore_eos: bool) -> dict:
    body = dict(req.body, model=model, stream=True, stream_options={"include_usage": True})
    if ignore_eos:
        body["ignore_eos"] = True
    return body


async def send(session: aiohttp.ClientSession, url: str, body: dict, n_images: int = 0) -> RequestResult:
    """POST one streamed chat request to ``url`` and time its chunks; never raises."""
    out = RequestResult(n_images=n_images)
    out.send = last = time.perf_counter()
    got_token = False
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                out.error = f"HTTP {resp.status}: {(await resp.text())[:500]}"
                out.e2e = time.perf_counter() - out.send
                return out
            buf = b""
            async for data in resp.content.iter_any():
                now = time.perf_counter()
                buf += data
                *events, buf = buf.split(b"\n\n")
                for event in events:
                    for line in event.split(b"\n"):
                        if not line.startswith(b"data:"):
                            continue  # blank lines, ": ping" comments
                        payload = line[5:].strip()
                        if payload == b"[DONE]":
                            continue
                        chunk = json.loads(payload)
                        if "error" in chunk:
                            raise RuntimeError(f"error event: {json.dumps(chunk['error'])[:500]}")
                        if choices := chunk.get("choices"):
                            if choices[0].get("delta", {}).get("content"):
                                if got_token:
                                    out.itl.append(now - last)
                                else:
                                    out.ttft = now - out.send
                                    got_token = True
                                last = now
                            elif got_token:
                                last = now  # a finish_reason-only chunk still ends the request
                        if usage := chunk.get("usage"):
                            out.output_tokens = int(usage.get("completion_tokens") or 0)
                            out.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        if not got_token:
            out.error = "the stream ended without a content chunk"
            out.e2e = time.perf_counter() - out.send
            return out
        out.e2e = last - out.send
        if not out.output_tokens:  # a server without include_usage: one token per content chunk
            out.output_tokens = len(out.itl) + 1
        out.ok = True
    except Exception as e:  # noqa: BLE001 - every failure is a recorded result, not a crash
        out.ok = False
        out.error = f"{type(e).__name__}: {e}"[:500]
        out.e2e = time.perf_counter() - out.send
    return out
