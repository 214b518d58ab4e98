"""Pull bandwidth and latency between two processes: ucx, shm and zmq beside raw ucxx and a copy.

A holder process publishes one float32 tensor per size; this process pulls
each one ``--reps`` times per backend (after a warm-up round), the backends
taking turns in an order that rotates every repetition, and reports the
median. Beside them, taking turns with the pulls:

- raw ucxx: the least a UCX pull can cost. The same UCX settings and
  progress as the ucx backend (endpoints from worker addresses, error handling
  off, ``transfer.ucx_progress``): a 16-byte request, then the payload sent
  from the holder's tensor into a buffer this process allocated once (warm pages);
- ``copy_`` into a preallocated tensor (the memcpy ceiling) and ``clone``
  (allocate + copy: a pull returns a fresh tensor, so it pays the allocation too).

The 4 KiB row is the fixed cost of one pull (latency). The ucx pulls'
tensors die before the next pull, so their buffers come back to the backend's
receive pool (hits and misses go to the JSON). Every holder sleeps between
requests (the ucx one in epoll), so each pull pays its holder's wake-up, as
pulls in a deployment do. ``--device cuda`` puts
the payloads on the GPU in both processes (a KV transfer between two
processes on one GPU) and the copies become device-to-device.

``--loopback N`` measures only the ucx backend's fixed cost, in one process:
``N`` pulls of a 4 KiB tensor from its own store, both ends on one event
loop. It counts the Python and UCX work of a pull on both sides without the
scheduling of two processes, so it holds on a loaded machine where the
two-process figures do not.

    python perf/bench_transfer.py [--sizes-mib 1,4,16,64,256] [--reps 7] [--device cpu|cuda] \
        [--backends ucx,shm,zmq] [--out perf/out/bench_transfer.json]
    python perf/bench_transfer.py --loopback 2000
    python perf/bench_transfer.py --netns [--backends ucx,zmq]   # two "hosts" (root; see --help)
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
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MiB = 1 << 20
LATENCY_BYTES = 4096  # a tiny pull: the fixed cost of one round trip
RAW_REQUEST_TAG = 1 << 62  # out of the ucx backend's tag ranges (its pulls count up from 1 << 16)
RAW_REPLY_TAGS = (1 << 62) + (1 << 40)


def _payload(nbytes: int, device: str) -> torch.Tensor:
    return torch.full((nbytes // 4,), 1.5, dtype=torch.float32, device=device)


def _make_backends(names: list[str], store: dict | None = None) -> list:
    out = []
    for name in names:  # imported here: a GPU box without pyzmq can still run ucx alone
        if name == "ucx":
            from transfer.ucx_backend import UcxBackend
            out.append(UcxBackend(store=store))
        elif name == "shm":
            from transfer.shm_backend import ShmBackend
            out.append(ShmBackend(store=store))
        elif name == "zmq":
            from transfer.zmq_backend import ZmqBackend
            out.append(ZmqBackend("127.0.0.1", store=store))
        else:
            raise SystemExit(f"unknown backend {name!r}")
    return out


async def _endpoint(ucxx, worker_address: bytes):
    remote = ucxx.get_ucx_address_from_buffer(worker_address)
    return await ucxx.create_endpoint_from_worker_address(remote, endpoint_error_handling=False)


def _holder(conn, sizes: list[int], names: list[str], device: str) -> None:
    async def serve() -> None:
        from transfer.ucx_backend import _post_send, _wait_all, start_ucx
        from transfer.ucx_buffers import ucx_buffer
        from transfer.ucx_progress import progress
        from ucxx._lib.arr import Array
        from ucxx.types import Tag, TagMaskFull

        ucxx = start_ucx()
        store: dict = {}
        backends = _make_backends(names, store)
        for b in backends:
            await b.start()
        payloads = {n: _payload(n, device) for n in sizes}
        for n, t in payloads.items():
            store[f"b{n}"] = [t]
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        conn.send({"backends": {b.name: b.address for b in backends},
                   "raw": ucxx.get_worker_address().tobytes()})
        ep = await _endpoint(ucxx, conn.recv())  # the puller's worker address
        raw = {n: ucx_buffer(t) for n, t in payloads.items()}
        request = np.empty(2, dtype=np.uint64)
        # As the backend's server: probe for requests each time the worker was progressed.
        drv = progress(ucxx)
        while True:  # raw ucxx: (size, reply tag) in, the payload out; size 0 stops
            probe = drv.worker.tag_probe(Tag(RAW_REQUEST_TAG), TagMaskFull, True)
            if not probe.matched:
                await drv.event()
                continue
            await _wait_all([drv.worker.tag_recv_with_handle(Array(request), probe)])
            size, tag = int(request[0]), int(request[1])
            if size == 0:
                break
            await _wait_all([_post_send(ep, raw[size], tag)], cuda=device.startswith("cuda"))
        for b in backends:
            await b.close()
        conn.send("stopped")

    asyncio.run(serve())


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


async def _timed_pull(backend, address: str, key: str, device: str) -> float:
    t0 = time.perf_counter()
    out = await backend.pull(address, key, timeout=60, device=device)
    dt = time.perf_counter() - t0
    del out
    return dt


class _Raw:
    """This process's end of raw ucxx: ask for ``size`` bytes, receive them into ``buf``."""

    def __init__(self, ucxx, ep):
        self.ucxx, self.ep = ucxx, ep
        self.tags = iter(range(RAW_REPLY_TAGS, RAW_REPLY_TAGS + (1 << 40)))

    async def fetch(self, size: int, buf) -> float:
        from transfer.ucx_backend import _post_recv, _post_send, _wait_all

        tag = next(self.tags)
        t0 = time.perf_counter()
        request = np.array([size, tag], dtype=np.uint64)
        await _wait_all([_post_recv(self.ep, buf, tag), _post_send(self.ep, request, RAW_REQUEST_TAG)],
                        cuda=not isinstance(buf, np.ndarray))
        return time.perf_counter() - t0

    async def stop(self) -> None:
        from transfer.ucx_backend import _post_send, _wait_all

        await _wait_all([_post_send(self.ep, np.zeros(2, dtype=np.uint64), RAW_REQUEST_TAG)])


async def _measure(conn, info: dict, sizes: list[int], names: list[str], reps: int,
                   device: str) -> dict[int, dict[str, float]]:
    """Median seconds per size and method; the methods take turns within each
    repetition so that the machine's noise falls on all of them alike."""
    from transfer.ucx_backend import start_ucx
    from transfer.ucx_buffers import ucx_buffer

    ucxx = start_ucx()
    conn.send(ucxx.get_worker_address().tobytes())
    raw = _Raw(ucxx, await _endpoint(ucxx, info["raw"]))
    backends = _make_backends(names)
    for b in backends:
        await b.start()
    by_name = {b.name: b for b in backends}
    medians: dict[int, dict[str, float]] = {}
    for n in sizes:
        src = _payload(n, device)
        dst = torch.empty_like(src)
        raw_buf = ucx_buffer(torch.empty_like(src))
        key = f"b{n}"
        times: dict[str, list[float]] = {}
        for rep in range(reps + 1):  # the first round warms up connections, pools and pages
            sample = {
                "copy": _timed(lambda: dst.copy_(src), device),
                "clone": _timed(lambda: src.clone(), device),
            }
            # The order rotates: a pull can pay for the tail of the one before it (the holder
            # still finishing its reply), and that must not always fall on the same method.
            pulls = ["raw", *(b.name for b in backends)]
            for name in pulls[rep % len(pulls):] + pulls[:rep % len(pulls)]:
                if name == "raw":
                    sample["raw"] = await raw.fetch(n, raw_buf)
                else:
                    b = by_name[name]
                    sample[name] = await _timed_pull(b, info["backends"][name], key, device)
            if rep:
                for k, v in sample.items():
                    times.setdefault(k, []).append(v)
        medians[n] = {k: statistics.median(v) for k, v in times.items()}
        del src, dst, raw_buf
    await raw.stop()
    for b in backends:
        await b.close()
    return medians


def _size(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // 1024} KiB"


async def _loopback(pulls: int, device: str) -> list[float]:
    from transfer.ucx_backend import UcxBackend

    ucx = UcxBackend()
    await ucx.start()
    ucx.put("k", [_payload(LATENCY_BYTES, device)])
    times = []
    for _ in range(pulls + 20):  # the first ones make the endpoint and warm the pools
        times.append(await _timed_pull(ucx, ucx.address, "k", device))
    await ucx.close()
    return times[20:]


# -- two "hosts": network namespaces on one bridge (tests/netns_util.py), TCP between them --------

def _netns_backends(names: list[str], addr: str, store: dict | None = None) -> list:
    from transfer.ucx_backend import UcxBackend
    from transfer.zmq_backend import ZmqBackend

    known = {"ucx": lambda: UcxBackend(store=store), "zmq": lambda: ZmqBackend(addr, store=store)}
    if not set(names) <= set(known):
        raise SystemExit("--netns measures ucx and zmq (shm cannot cross hosts)")
    return [known[n]() for n in names]


def _netns_holder(sizes: list[int], names: list[str], addr: str) -> None:
    """In the holder's namespace: publish, print the addresses, serve until stdin closes."""
    async def serve() -> None:
        store: dict = {}
        backends = _netns_backends(names, addr, store)
        for b in backends:
            await b.start()
        for n in sizes:
            store[f"b{n}"] = [_payload(n, "cpu")]
        print(json.dumps({b.name: b.address for b in backends}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        for b in backends:
            await b.close()

    asyncio.run(serve())


async def _netns_pull(card: dict, sizes: list[int], names: list[str], addr: str, reps: int) -> dict:
    """In the puller's namespace: median seconds per size and backend, the order rotating."""
    backends = {b.name: b for b in _netns_backends(names, addr)}
    for b in backends.values():
        await b.start()
    medians: dict[int, dict[str, float]] = {}
    for n in sizes:
        times: dict[str, list[float]] = {}
        for rep in range(reps + 1):
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                dt = await _timed_pull(backends[name], card[name], f"b{n}", "cpu")
                if rep:
                    times.setdefault(name, []).append(dt)
        medians[n] = {k: statistics.median(v) for k, v in times.items()}
    for b in backends.values():
        await b.close()
    return medians


def _netns(args, sizes: list[int], names: list[str]) -> dict:
    """Holder and puller in two namespaces joined by a veth bridge: what pulls cost between hosts."""
    import subprocess

    from tests.netns_util import Lan, unavailable

    why = unavailable()
    if why:
        raise SystemExit(f"--netns: {why}")
    lan = Lan(str(os.getpid() % 10000), ["holder", "puller"]).up()
    # One kernel: UCX would take its shared-memory transports, which hosts apart never have.
    env = {**os.environ, "UCX_TLS": "^sm", "PYTHONPATH": str(ROOT)}
    common = [sys.executable, str(Path(__file__).resolve()), "--sizes-mib", args.sizes_mib,
              "--backends", ",".join(names), "--reps", str(args.reps)]
    holder = subprocess.Popen([*lan.exec_argv("holder"), *common, "--netns-role", "holder",
                               "--netns-addr", lan.addr["holder"]],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
    try:
        card = holder.stdout.readline()
        if not card:
            raise RuntimeError("the holder did not start")
        puller = subprocess.run([*lan.exec_argv("puller"), *common, "--netns-role", "puller",
                                 "--netns-addr", lan.addr["puller"], "--netns-card", card.strip()],
                                capture_output=True, text=True, env=env, timeout=900)
        if puller.returncode:
            raise RuntimeError(f"the puller failed:\n{puller.stderr[-3000:]}")
        return {int(k): v for k, v in json.loads(puller.stdout.strip().splitlines()[-1]).items()}
    finally:
        holder.stdin.close()
        try:
            holder.wait(30)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait()
        lan.down()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mib", default="1,4,16,64,256")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--device", default="cpu", help="where the payloads live in both processes (cpu, cuda)")
    ap.add_argument("--backends", default=None, help="comma list of ucx,shm,zmq (default: all on cpu, ucx on cuda)")
    ap.add_argument("--out", default=None, help="default: perf/out/bench_transfer[_cuda].json")
    ap.add_argument("--loopback", type=int, default=0, metavar="N",
                    help="only the ucx fixed cost: N pulls of 4 KiB from this process's own store")
    ap.add_argument("--netns", action="store_true",
                    help="holder and puller on two hosts: network namespaces joined by a veth bridge "
                         "(root; TCP only; ucx and zmq)")
    ap.add_argument("--netns-role", choices=("holder", "puller"), help=argparse.SUPPRESS)
    ap.add_argument("--netns-addr", help=argparse.SUPPRESS)
    ap.add_argument("--netns-card", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.netns_role:
        names = args.backends.split(",")
        sizes = [LATENCY_BYTES] + [int(float(s) * MiB) for s in args.sizes_mib.split(",")]
        if args.netns_role == "holder":
            _netns_holder(sizes, names, args.netns_addr)
        else:
            card = json.loads(args.netns_card)
            print(json.dumps(asyncio.run(_netns_pull(card, sizes, names, args.netns_addr, args.reps))))
        return
    if args.netns:
        names = (args.backends or "ucx,zmq").split(",")
        sizes = [LATENCY_BYTES] + [int(float(s) * MiB) for s in args.sizes_mib.split(",")]
        medians = _netns(args, sizes, names)
        print(f"{'size':>8} |" + "".join(f" {k + ' GB/s':>9} {k + ' ms':>8} |" for k in names))
        for n in sizes:
            print(f"{_size(n):>8} |" + "".join(f" {n / medians[n][k] / 1e9:9.2f} {medians[n][k] * 1e3:8.3f} |"
                                             for k in names))
        out = Path(args.out or ROOT / "perf/out/bench_transfer_netns.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"command": " ".join([Path(sys.executable).name, *sys.argv]),
                                   "note": "median seconds per pull between two network namespaces (TCP)",
                                   "reps": args.reps, "medians": medians}, indent=2) + "\n")
        print(f"wrote {out}")
        return
    if args.loopback:
        times = sorted(asyncio.run(_loopback(args.loopback, args.device)))
        q = [times[int(f * (len(times) - 1))] * 1e3 for f in (0.1, 0.5, 0.9)]
        print(f"ucx loopback pull of 4 KiB ({args.device}, {len(times)} pulls): "
              f"p10 {q[0]:.3f} ms, median {q[1]:.3f} ms, p90 {q[2]:.3f} ms")
        return
    cuda = args.device.startswith("cuda")
    names = (args.backends or ("ucx" if cuda else "ucx,shm,zmq")).split(",")
    sizes = [LATENCY_BYTES] + [int(float(s) * MiB) for s in args.sizes_mib.split(",")]
    out = Path(args.out or ROOT / f"perf/out/bench_transfer{'_cuda' if cuda else ''}.json")

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    holder = ctx.Process(target=_holder, args=(child, sizes, names, args.device), daemon=True)
    holder.start()
    try:
        if not parent.poll(120):
            raise RuntimeError("the holder process did not start")
        info = parent.recv()
        medians = asyncio.run(_measure(parent, info, sizes, names, args.reps, args.device))
        if parent.poll(30):
            parent.recv()
    finally:
        holder.join(30)
        if holder.is_alive():
            holder.kill()

    pool = {}
    if "ucx" in names:  # the ucx pulls' destinations: reused once the previous pull's tensor died
        from transfer.ucx_buffers import recv_pool
        pool = {"hits": recv_pool.hits, "misses": recv_pool.misses}
    methods = ["copy", "clone", "raw", *names]
    rows = []
    for n in sizes:
        row = {"bytes": n, **{f"{k}_s": medians[n][k] for k in methods}}
        for k in methods:
            row[f"{k}_gbps"] = n / row[f"{k}_s"] / 1e9
        for k in names:
            row[f"{k}_vs_raw"] = row["raw_s"] / row[f"{k}_s"]
        rows.append(row)

    head = f"{'size':>8} | {'copy GB/s':>9} {'clone GB/s':>10} | {'raw GB/s':>8} {'raw ms':>8} |"
    head += "".join(f" {k + ' GB/s':>9} {k + ' ms':>8} |" for k in names)
    print(head + "".join(f" {k}/raw" for k in names))
    for r in rows:
        line = (f"{_size(r['bytes']):>8} | {r['copy_gbps']:9.2f} {r['clone_gbps']:10.2f} | "
                f"{r['raw_gbps']:8.2f} {r['raw_s'] * 1e3:8.3f} |")
        line += "".join(f" {r[f'{k}_gbps']:9.2f} {r[f'{k}_s'] * 1e3:8.3f} |" for k in names)
        print(line + "".join(f" {r[f'{k}_vs_raw']:6.2f}" for k in names))

    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
               "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    if cuda:
        machine["gpu"] = torch.cuda.get_device_name()
    try:
        import ucxx
        machine["ucxx"], machine["ucx"] = ucxx.__version__, ucxx.__ucx_version__
    except Exception:  # noqa: BLE001 - only for the record
        pass
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine,
        "device": args.device,
        "reps": args.reps,
        "note": "median seconds per pull of one float32 tensor between two processes on one host; "
                "raw = raw ucxx request + payload into a preallocated buffer; copy/clone are in-process "
                "baselines measured in the same run",
        "rows": rows,
        "recv_pool": pool,
    }, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
