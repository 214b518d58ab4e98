"""The bus (bus.codec + bus.sockets) vs raw pyzmq, measured side by side in one run.

(a) Round-trip latency of a small message (10 fields, the shape of a token
    delta) over tcp between two processes: a DEALER here, an echoing ROUTER in a
    child. Ours encodes and decodes at both ends; raw pyzmq sends the same header
    bytes pre-packed and echoes them untouched. Sync (plain zmq) and asyncio
    (zmq.asyncio) flavours, median and p99 over --round-trips after warm-up.
(b) One-way bandwidth of a --mib tensor: ours encodes a torch tensor, sends it
    zero-copy and decodes it to a torch view; raw sends the same buffer with
    ``send(copy=False)`` and receives with ``recv(copy=False)``. The receiver
    answers each transfer with a tiny ack; median over --reps.

Raw and ours run interleaved in blocks against one child process, so both see
the same process placement and the same background noise.

    python perf/bench_bus.py [--round-trips 2000] [--blocks 10] [--mib 64] [--reps 10] \
        [--transport tcp|ipc]

Prints a table (aims: latency <= 1.5x raw, bandwidth >= 80% of raw) and writes
perf/out/bench_bus.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
import timeit
from dataclasses import dataclass
from pathlib import Path

import msgpack
import zmq
import zmq.asyncio

from bus.codec import decode, encode, message
from bus.sockets import AsyncSocket, SyncSocket, free_tcp_address

ROOT = Path(__file__).resolve().parent.parent


# Type ids from the top of the range, clear of the project's own messages.
@message(250)
@dataclass
class TokenDelta:
    request_id: str
    seq: int
    token_ids: list[int]
    text: str
    logprob: float
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    output_tokens: int
    worker: str


@message(251)
@dataclass
class Blob:
    request_id: str
    data: object  # a tensor


@message(252)
@dataclass
class Ack:
    n: int


SAMPLE = TokenDelta(
    "req-6f1c2a9b3d4e", 17, [31415], " hello", -0.25, False, None, 512, 17, "decode-0"
)


# ---------------------------------------------------------------- the echo/ack side (child)
# One child serves raw and ours on two sockets, in the blocks `schedule` lists,
# so both run with the same process placement (on a small box that decides more
# than anything measured).


def _serve(flavour: str, addrs: dict[str, str], schedule: list[tuple[str, int]]) -> None:
    if flavour == "async":
        asyncio.run(_serve_async(addrs, schedule))
        return
    ours = SyncSocket("router", addrs["ours"], bind=True)
    raw = zmq.Context.instance().socket(zmq.ROUTER)
    raw.bind(addrs["raw"])
    for case, n in schedule:
        for i in range(n):
            if case == "raw" and flavour == "sync":
                raw.send_multipart(raw.recv_multipart())
            elif case == "raw":  # bandwidth: take the frame zero-copy, ack it
                ident, _ = raw.recv_multipart(copy=False)
                raw.send_multipart([ident, b"k"])
            elif flavour == "sync":
                ident, msg = ours.recv()
                ours.send(msg, to=ident)
            else:
                ident, msg = ours.recv()
                msg.data.torch()  # the receiver's zero-copy view
                ours.send(Ack(i), to=ident)
    ours.close()
    raw.close(linger=0)


async def _serve_async(addrs: dict[str, str], schedule: list[tuple[str, int]]) -> None:
    ours = AsyncSocket("router", addrs["ours"], bind=True)
    raw = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
    raw.bind(addrs["raw"])
    for case, n in schedule:
        for _ in range(n):
            if case == "raw":
                await raw.send_multipart(await raw.recv_multipart())
            else:
                ident, msg = await ours.recv()
                await ours.send(msg, to=ident)
    ours.close()
    raw.close(linger=0)


def _start(flavour: str, addrs: dict[str, str], schedule: list[tuple[str, int]]) -> mp.Process:
    p = mp.get_context("spawn").Process(target=_serve, args=(flavour, addrs, schedule), daemon=True)
    p.start()
    return p


def _schedule(warmup: int, block: int, blocks: int) -> list[tuple[str, int]]:
    """Warm-up for both, then raw and ours alternating in equal blocks."""
    return [("raw", warmup), ("ours", warmup)] + [("raw", block), ("ours", block)] * blocks


# ---------------------------------------------------------------- the timing side (this process)


def _latency_sync(addrs: dict[str, str], schedule: list[tuple[str, int]]) -> dict[str, list]:
    ours = SyncSocket("dealer", addrs["ours"], bind=False)
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.connect(addrs["raw"])
    payload = encode(SAMPLE)[1]  # the very header bytes ours sends
    clients = {"ours": (lambda: ours.send(SAMPLE), ours.recv),
               "raw": (lambda: raw.send(payload), raw.recv)}
    out: dict[str, list[float]] = {"raw": [], "ours": []}
    for k, (case, n) in enumerate(schedule):
        send, recv = clients[case]
        for _ in range(n):
            t0 = time.perf_counter_ns()
            send()
            recv()
            if k >= 2:  # past the two warm-up blocks
                out[case].append((time.perf_counter_ns() - t0) / 1e3)
    ours.close()
    raw.close(linger=0)
    return out


async def _latency_async(addrs: dict[str, str], schedule: list[tuple[str, int]]) -> dict[str, list]:
    ours = AsyncSocket("dealer", addrs["ours"], bind=False)
    raw = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    raw.connect(addrs["raw"])
    payload = encode(SAMPLE)[1]
    clients = {"ours": (lambda: ours.send(SAMPLE), ours.recv),
               "raw": (lambda: raw.send(payload), raw.recv)}
    out: dict[str, list[float]] = {"raw": [], "ours": []}
    for k, (case, n) in enumerate(schedule):
        send, recv = clients[case]
        for _ in range(n):
            t0 = time.perf_counter_ns()
            await send()
            await recv()
            if k >= 2:
                out[case].append((time.perf_counter_ns() - t0) / 1e3)
    ours.close()
    raw.close(linger=0)
    return out


def _bandwidth(addrs: dict[str, str], schedule: list[tuple[str, int]], tensor) -> dict[str, list]:
    import torch

    ours = SyncSocket("dealer", addrs["ours"], bind=False)
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.connect(addrs["raw"])
    msg = Blob("req-0", tensor)
    buf = tensor.reshape(-1).view(torch.uint8).numpy().data
    clients = {"ours": (lambda: ours.send(msg), ours.recv),
               "raw": (lambda: raw.send(buf, copy=False), raw.recv)}
    out: dict[str, list[float]] = {"raw": [], "ours": []}
    for k, (case, n) in enumerate(schedule):
        send, recv = clients[case]
        for _ in range(n):
            t0 = time.perf_counter()
            send()
            recv()
            if k >= 2:
                out[case].append(time.perf_counter() - t0)
    ours.close()
    raw.close(linger=0)
    return out


def _codec_us() -> dict[str, float]:
    """Encode and decode of SAMPLE alone, in a hot loop (best of 5)."""
    frames = encode(SAMPLE)
    n = 20_000
    best = lambda fn: min(timeit.repeat(fn, number=n, repeat=5)) / n * 1e6  # noqa: E731
    return {"encode_us": best(lambda: encode(SAMPLE)), "decode_us": best(lambda: decode(frames))}


def _addr(transport: str, tmp: str, name: str) -> str:
    return free_tcp_address() if transport == "tcp" else f"ipc://{tmp}/{name}"


def _stats(us: list[float]) -> dict:
    us = sorted(us)
    return {"median_us": statistics.median(us), "p99_us": us[int(0.99 * (len(us) - 1))]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--round-trips", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--blocks", type=int, default=10, help="raw/ours alternate in this many blocks")
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--transport", choices=("tcp", "ipc"), default="tcp")
    ap.add_argument("--out", default=str(ROOT / "perf/out/bench_bus.json"))
    args = ap.parse_args()

    import torch

    tmp = tempfile.mkdtemp(prefix="epd-bench-bus-")
    block = max(1, args.round_trips // args.blocks)
    lat: dict[str, dict[str, list[float]]] = {}
    for flavour in ("sync", "async"):
        addrs = {c: _addr(args.transport, tmp, f"{flavour}-{c}") for c in ("raw", "ours")}
        schedule = _schedule(args.warmup, block, args.blocks)
        server = _start(flavour, addrs, schedule)
        if flavour == "sync":
            lat[flavour] = _latency_sync(addrs, schedule)
        else:
            lat[flavour] = asyncio.run(_latency_async(addrs, schedule))
        server.join(10)

    tensor = torch.randn(args.mib * 2**20 // 4)  # float32, args.mib MiB
    addrs = {c: _addr(args.transport, tmp, f"bw-{c}") for c in ("raw", "ours")}
    schedule = _schedule(2, 1, args.reps)
    server = _start("bw", addrs, schedule)
    bw = _bandwidth(addrs, schedule, tensor)
    server.join(10)

    result: dict = {"command": " ".join(["python perf/bench_bus.py", *sys.argv[1:]]),
                    "transport": args.transport, "latency": {}}
    print(f"\nbus vs raw pyzmq ({args.transport}, {os.cpu_count()} cpus; "
          f"{block * args.blocks} round trips and {args.reps} transfers each, interleaved)")
    print(f"{'':30}{'raw':>10}{'ours':>10}{'ours/raw':>10}")
    for flavour in ("sync", "async"):
        raw, ours = _stats(lat[flavour]["raw"]), _stats(lat[flavour]["ours"])
        row = result["latency"][flavour] = {"raw": raw, "ours": ours}
        for key in ("median_us", "p99_us"):
            row[f"ours_over_raw_{key[:-3]}"] = ratio = ours[key] / raw[key]
            label = f"rtt {flavour} {key[:-3]} (us)"
            print(f"{label:30}{raw[key]:10.1f}{ours[key]:10.1f}{ratio:10.2f}")
    gbps = {c: args.mib * 2**20 / statistics.median(bw[c]) / 1e9 for c in ("raw", "ours")}
    result["bandwidth"] = {"mib": args.mib, "raw_GBps": gbps["raw"], "ours_GBps": gbps["ours"],
                           "ours_over_raw": gbps["ours"] / gbps["raw"]}
    label = f"{args.mib} MiB one-way (GB/s)"
    print(f"{label:30}{gbps['raw']:10.2f}{gbps['ours']:10.2f}{gbps['ours'] / gbps['raw']:10.2f}")
    result["codec_hot"] = codec = _codec_us()
    print(f"codec alone, hot loop: encode {codec['encode_us']:.2f} us, "
          f"decode {codec['decode_us']:.2f} us (10-field message)")
    print("aims: latency ours/raw <= 1.5, bandwidth ours/raw >= 0.8")
    result["env"] = {"python": platform.python_version(), "pyzmq": zmq.__version__,
                     "libzmq": zmq.zmq_version(), "msgpack": ".".join(map(str, msgpack.version)),
                     "cpus": os.cpu_count(), "machine": platform.machine()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
