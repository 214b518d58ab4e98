"""bus.sockets over real sockets: ROUTER/DEALER across processes, PUB/SUB, PUSH/PULL, dead peers."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from bus.codec import WireError, encode, message, peek_type
from bus.sockets import AsyncSocket, PeerGone, SyncSocket, free_tcp_address

# Type ids 220..239 belong to this file (test_bus_codec uses 200..219).
# No torch here: the spawned children import this module and should start fast.


@message(220)
@dataclass
class Hello:
    worker: str


@message(221)
@dataclass
class Work:
    n: int
    data: Any = None


@message(222)
@dataclass
class Done:
    n: int
    total: float


def _spawn(target, *args) -> mp.Process:
    p = mp.get_context("spawn").Process(target=target, args=args, daemon=True)
    p.start()
    return p


# ---------------------------------------------------------------- children


def _worker(addr: str, identity: bytes) -> None:
    """A DEALER worker: says hello, then answers Work with Done until n < 0."""
    with SyncSocket("dealer", addr, bind=False, identity=identity) as s:
        s.send(Hello(identity.decode()))
        while True:
            _, work = s.recv(timeout=20)
            if work.n < 0:
                return
            s.send(Done(work.n, float(work.data.numpy().sum())))


def _hello_then_exit(addr: str, identity: bytes) -> None:
    with SyncSocket("dealer", addr, bind=False, identity=identity) as s:
        s.send(Hello(identity.decode()))
        time.sleep(0.2)  # let the message leave before the socket closes (LINGER is 0)


# ---------------------------------------------------------------- tests


def test_router_dealer_request_reply_between_processes():
    async def main(addr: str) -> None:
        router = AsyncSocket("router", addr, bind=True)
        child = _spawn(_worker, addr, b"worker-7")
        try:
            identity, hello = await router.recv(timeout=20)
            assert identity == b"worker-7" and hello == Hello("worker-7")
            for n in range(3):
                data = np.arange(1000, dtype=np.float32) * n
                await router.send(Work(n, data), to=identity)
                who, done = await router.recv(timeout=10)
                assert who == b"worker-7" and done == Done(n, float(data.sum()))
            await router.send(Work(-1), to=identity)
        finally:
            router.close()
            child.join(10)
        assert child.exitcode == 0

    asyncio.run(main(free_tcp_address()))


def test_router_send_to_a_vanished_peer_raises_peer_gone():
    with SyncSocket("router", free_tcp_address(), bind=True) as router:
        with pytest.raises(PeerGone) as err:  # never connected
            router.send(Work(0), to=b"nobody")
        assert err.value.identity == b"nobody"

        child = _spawn(_hello_then_exit, router.address, b"short-lived")
        identity, _ = router.recv(timeout=20)
        router.send(Work(1), to=identity)  # still connected: accepted
        child.join(10)
        # The router learns of the disconnect asynchronously; it must surface within seconds.
        deadline = time.monotonic() + 5
        with pytest.raises(PeerGone):
            while time.monotonic() < deadline:
                router.send(Work(2), to=identity)
                time.sleep(0.01)


def test_pub_sub_delivers_by_topic_prefix():
    addr = free_tcp_address()
    with SyncSocket("pub", addr, bind=True) as pub, \
            SyncSocket("sub", addr, bind=False, topics=[b"decode."]) as sub:
        # A subscription takes a moment to reach the publisher (the slow-joiner problem).
        deadline = time.monotonic() + 10
        while True:
            pub.send(Work(0), to=b"decode.sync")
            try:
                topic, _ = sub.recv(timeout=0.05)
                break
            except TimeoutError:
                assert time.monotonic() < deadline, "subscription never took effect"
        while True:  # drain the sync messages
            try:
                sub.recv(timeout=0.1)
            except TimeoutError:
                break
        pub.send(Work(1), to=b"prefill.0")  # filtered out by the subscriber
        pub.send(Work(2), to=b"decode.3")
        pub.send(Work(3))  # empty topic: matches only a b"" subscription
        topic, msg = sub.recv(timeout=5)
        assert (topic, msg) == (b"decode.3", Work(2))
        with pytest.raises(TimeoutError):
            sub.recv(timeout=0.2)
        sub.subscribe(b"")
        deadline = time.monotonic() + 10
        while True:
            pub.send(Work(4), to=b"other")
            try:
                assert sub.recv(timeout=0.05) == (b"other", Work(4))
                break
            except TimeoutError:
                assert time.monotonic() < deadline


def test_push_pull_over_ipc_carries_tensors(tmp_path):
    addr = f"ipc://{tmp_path}/push-pull"

    async def main() -> None:
        pull = AsyncSocket("pull", addr, bind=True)
        push = AsyncSocket("push", addr, bind=False)
        try:
            big = np.arange(300_000, dtype=np.int64).reshape(1000, 300)  # above the copy threshold
            for n in range(3):
                await push.send(Work(n, big[:, n::3]))  # non-contiguous
            for n in range(3):
                prefix, msg = await pull.recv(timeout=10)
                assert prefix is None and msg.n == n
                assert np.array_equal(msg.data.numpy(), big[:, n::3])
        finally:
            push.close()
            pull.close()

    asyncio.run(main())


def test_malformed_message_raises_wire_error_and_socket_stays_usable():
    addr = free_tcp_address()
    with SyncSocket("pull", addr, bind=True) as pull, SyncSocket("push", addr, bind=False) as push:
        push.send_frames([b"\xee", b"\x91\x01"])  # unknown type
        push.send_frames([encode(Hello("x"))[0], b"\xc1"])  # garbage header
        push.send(Hello("ok"))
        with pytest.raises(WireError, match="unknown message type 238"):
            pull.recv(timeout=10)
        with pytest.raises(WireError, match="Hello: malformed header"):
            pull.recv(timeout=10)
        assert pull.recv(timeout=10) == (None, Hello("ok"))


def test_a_hop_forwards_frames_it_routes_by_type_without_decoding():
    a, b = free_tcp_address(), free_tcp_address()
    with SyncSocket("pull", a, bind=True) as hop_in, SyncSocket("push", b, bind=True) as hop_out, \
            SyncSocket("push", a, bind=False) as src, SyncSocket("pull", b, bind=False) as dst:
        src.send(Work(5, np.ones(100_000)))
        _, frames = hop_in.recv_frames(timeout=10)
        assert peek_type(frames) == 221 and len(frames) == 3
        hop_out.send_frames(frames)
        _, msg = dst.recv(timeout=10)
        assert msg.n == 5 and msg.data.numpy().sum() == 100_000


def test_bind_to_any_port_reports_the_real_address_and_recv_times_out():
    with SyncSocket("router", "tcp://127.0.0.1:*", bind=True) as router:
        assert router.address.startswith("tcp://127.0.0.1:") and not router.address.endswith("*")
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            router.recv(timeout=0.1)
        assert time.monotonic() - t0 < 2


def test_misuse_is_refused():
    addr = free_tcp_address()
    with pytest.raises(ValueError, match="socket kind"):
        SyncSocket("req", addr, bind=True)
    with pytest.raises(ValueError, match="topics apply"):
        SyncSocket("pull", addr, bind=True, topics=[b"x"])
    with SyncSocket("router", addr, bind=True) as router:
        with pytest.raises(ValueError, match="needs to=identity"):
            router.send(Hello("x"))
        with pytest.raises(OSError, match="cannot bind"):
            SyncSocket("router", addr, bind=True)
    with SyncSocket("push", addr, bind=False) as push:
        with pytest.raises(ValueError, match="takes no `to`"):
            push.send(Hello("x"), to=b"a")
