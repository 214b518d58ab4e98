"""bus.codec: typed messages, tensor frames, zero-copy, and precise errors for bad input."""

from __future__ import annotations

import enum
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
import zmq

from bus.codec import (
    PROTOCOL_VERSION,
    TensorFrame,
    WireError,
    decode,
    encode,
    message,
    peek_type,
    struct,
)

ROOT = Path(__file__).resolve().parent.parent

# Type ids 200..219 belong to this file (test_bus_sockets uses 220..239).


class Color(enum.IntEnum):
    RED = 1
    BLUE = 2


@struct
@dataclass
class Img:
    hash: str
    offset: int
    embedding: Any = None


@struct
@dataclass
class Params:
    temperature: float = 1.0
    stop: list[str] = field(default_factory=list)


@message(200)
@dataclass
class Request:
    request_id: str
    token_ids: list[int]
    params: Params
    images: list[Img]
    by_hash: dict[str, Img]
    parent: Img | None = None
    shape: tuple[int, ...] = ()
    pair: tuple[Img, int] | None = None
    blob: bytes = b""
    color: Color = Color.RED
    counts: dict[int, float] = field(default_factory=dict)


@message(201)
@dataclass
class Tensors:
    a: Any
    b: Any = None
    many: list[Any] = field(default_factory=list)


@message(202)
@dataclass
class Ping:
    n: int


@message(203)
class Empty:  # no @dataclass: the decorator makes it one
    pass


@struct
class One:
    x: int


@message(204)
class Holder:
    one: One
    ones: list[One]


def _request(**kw) -> Request:
    base = dict(
        request_id="req-1",
        token_ids=[1, 2, 3],
        params=Params(0.5, ["</s>"]),
        images=[Img("h0", 4), Img("h1", 9)],
        by_hash={"h0": Img("h0", 4)},
        parent=Img("p", 0),
        shape=(2, 3),
        pair=(Img("q", 1), 7),
        blob=b"\x00\xff",
        color=Color.BLUE,
        counts={3: 0.5},
    )
    base.update(kw)
    return Request(**base)


# ---------------------------------------------------------------- plain messages


def test_nested_structs_round_trip_with_their_types():
    r = _request()
    frames = encode(r)
    assert len(frames) == 2 and frames[0] == bytes([200])
    d = decode(frames)
    assert d == r
    assert type(d.params) is Params and type(d.images[1]) is Img
    assert type(d.by_hash["h0"]) is Img and type(d.parent) is Img
    assert type(d.shape) is tuple and type(d.pair) is tuple and type(d.pair[0]) is Img
    assert d.color is Color.BLUE and d.blob == b"\x00\xff"


def test_optional_fields_and_defaults_round_trip():
    r = Request("r", [], Params(), [], {})
    d = decode(encode(r))
    assert d == r and d.parent is None and d.pair is None and d.params.stop == []


def test_zero_and_one_field_classes_round_trip():
    assert msgpack.unpackb(encode(Empty())[1]) == [PROTOCOL_VERSION]
    assert decode(encode(Empty())) == Empty()
    h = Holder(One(1), [One(2), One(3)])
    assert msgpack.unpackb(encode(h)[1]) == [PROTOCOL_VERSION, [1], [[2], [3]]]
    assert decode(encode(h)) == h


def test_header_is_version_then_fields_in_order():
    header = msgpack.unpackb(encode(Ping(5))[1])
    assert header == [PROTOCOL_VERSION, 5]


def test_short_header_leaves_trailing_fields_at_defaults():
    # An older sender that does not know the appended fields still decodes.
    header = msgpack.packb([PROTOCOL_VERSION, "r", [1], [1.0, []], [], {}])
    d = decode([bytes([200]), header])
    assert d == Request("r", [1], Params(), [], {})


def test_peek_type_reads_only_the_type_frame():
    assert peek_type([bytes([202]), b"\xc1garbage"]) == 202


# ---------------------------------------------------------------- tensors

TORCH_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool]
SHAPES = [(3, 4), (0, 5), ()]


def _sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 10
    return x > 0 if dtype == torch.bool else x.to(dtype)


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_torch_tensors_round_trip(dtype, shape):
    t = _sample(dtype, shape)
    frames = encode(Tensors(t))
    assert len(frames) == 3
    tf = decode(frames).a
    assert isinstance(tf, TensorFrame)
    assert tf.dtype == str(dtype).removeprefix("torch.") and tf.shape == shape
    back = tf.torch()
    assert back.dtype == dtype and back.shape == t.shape and torch.equal(back, t)


@pytest.mark.parametrize("dtype", ["float32", "float16", "int64", "bool"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_numpy_arrays_round_trip(dtype, shape):
    a = np.asarray(np.random.default_rng(0).standard_normal(shape) * 10).astype(dtype)
    frames = encode(Tensors(a))
    assert len(frames) == 3
    back = decode(frames).a.numpy()
    assert back.dtype == a.dtype and back.shape == a.shape and np.array_equal(back, a)


def test_non_contiguous_tensors_round_trip():
    t = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    a = np.arange(24, dtype=np.int64).reshape(4, 6)
    msg = Tensors(t.T, t[:, ::2].to(torch.bfloat16), [a.T, a[::2, 1:]])
    d = decode(encode(msg))
    assert torch.equal(d.a.torch(), t.T)
    assert torch.equal(d.b.torch(), t[:, ::2].to(torch.bfloat16))
    assert np.array_equal(d.many[0].numpy(), a.T)
    assert np.array_equal(d.many[1].numpy(), a[::2, 1:])


def test_frame_count_is_two_plus_tensors_wherever_they_sit():
    emb = torch.ones(2, 3)
    r = _request(images=[Img("a", 0, emb), Img("b", 1, np.zeros(4))], parent=Img("p", 0, emb))
    frames = encode(r)
    assert len(frames) == 2 + 3
    d = decode(frames)
    assert d.images[1].embedding.numpy().tolist() == [0.0] * 4
    assert torch.equal(d.parent.embedding.torch(), emb)


def test_contiguous_tensor_is_sent_without_a_copy():
    a = np.arange(1000, dtype=np.float32)
    t = torch.arange(1000, dtype=torch.bfloat16)
    frames = encode(Tensors(a, t))
    assert np.shares_memory(np.frombuffer(frames[2], np.uint8), a)
    assert np.frombuffer(frames[3], np.uint8).ctypes.data == t.data_ptr()


def test_decoded_tensors_view_the_received_zmq_frames():
    ctx = zmq.Context()
    tx, rx = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    tx.bind("inproc://codec-zero-copy")
    rx.connect("inproc://codec-zero-copy")
    try:
        tx.send_multipart(encode(Tensors(np.arange(100_000, dtype=np.float32))), copy=False)
        frames = rx.recv_multipart(copy=False)
        tf = decode(frames).a
        received = np.frombuffer(frames[2].buffer, np.uint8)
        arr = tf.numpy()
        assert np.shares_memory(arr, received)
        assert tf.torch().data_ptr() == received.ctypes.data
        assert arr[-1] == 99_999
    finally:
        tx.close(linger=0)
        rx.close(linger=0)
        ctx.term()


def test_read_only_frames_give_torch_views_without_warning():
    frames = [bytes(f) for f in encode(Tensors(torch.arange(6, dtype=torch.int32)))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = decode(frames).a.torch()
    assert t.tolist() == [0, 1, 2, 3, 4, 5]
    assert t.data_ptr() == np.frombuffer(frames[2], np.uint8).ctypes.data


def test_misaligned_buffer_still_decodes_correctly():
    frames = encode(Tensors(torch.arange(5, dtype=torch.int64)))
    shifted = bytearray(1 + len(frames[2]))
    shifted[1:] = frames[2]
    t = decode([frames[0], frames[1], memoryview(shifted)[1:]]).a.torch()
    assert t.tolist() == [0, 1, 2, 3, 4]


def test_bfloat16_has_no_numpy_view():
    tf = decode(encode(Tensors(torch.ones(2, dtype=torch.bfloat16)))).a
    with pytest.raises(TypeError, match="bfloat16"):
        tf.numpy()


def test_tensor_frames_forward_unchanged():
    first = encode(Tensors(torch.arange(8, dtype=torch.float16), b=np.ones(3)))
    again = encode(decode(first))
    assert [bytes(f) for f in again] == [bytes(f) for f in first]


# ---------------------------------------------------------------- registration and misuse


def test_duplicate_type_id_is_refused():
    with pytest.raises(ValueError, match="taken by .*Ping"):

        @message(202)
        @dataclass
        class Other:
            x: int


def test_type_id_must_fit_one_byte():
    with pytest.raises(ValueError, match="0..255"):
        message(256)


def test_undecorated_nested_dataclass_is_refused_at_encode():
    @dataclass
    class Loose:
        x: int

    with pytest.raises(TypeError, match="@struct"):
        encode(Tensors(Loose(1)))


def test_encoding_an_unregistered_class_is_a_type_error():
    with pytest.raises(TypeError, match="not a @message"):
        encode(Img("h", 0))


# ---------------------------------------------------------------- malformed input


def _header(*values) -> bytes:
    return msgpack.packb(list(values))


@pytest.mark.parametrize(
    "frames, match",
    [
        ([], "empty message"),
        ([b"\x01\x02", b""], "type frame must be 1 byte"),
        ([bytes([199]), _header(1)], "unknown message type 199"),
        ([bytes([202])], "Ping: no header frame"),
        ([bytes([202]), b"\xc1"], "Ping: malformed header"),
        ([bytes([202]), b"\x92\x01"], "Ping: malformed header"),  # truncated
        ([bytes([202]), msgpack.packb({"v": 1, "n": 2})], r"Ping: header is not \[version"),
        ([bytes([202]), _header(2, 5)], "Ping: protocol version 2, expected 1"),
        ([bytes([202]), _header(1, 5, 6)], "Ping: 2 fields, expected 1"),
        ([bytes([202]), _header(1)], "Ping: .*missing 1 required positional argument"),
        ([bytes([200]), _header(1, "r", [], 5, [], {})], "Request: Params: expected an array"),
        ([bytes([200]), _header(1, "r", [], [], [], {}, None, (), None, b"", 9)],
         "Request: 9 is not a valid Color"),
    ],
)
def test_malformed_messages_raise_wire_error(frames, match):
    with pytest.raises(WireError, match=match):
        decode(frames)


def _tensor_msg(dtype="float32", shape=(2,), index=0) -> bytes:
    ref = msgpack.ExtType(1, msgpack.packb([dtype, list(shape), index]))
    return msgpack.packb([1, ref])


@pytest.mark.parametrize(
    "frames, match",
    [
        ([bytes([201]), _tensor_msg()], "no tensor frames"),
        ([bytes([201]), _tensor_msg(), b"\0" * 8, b"\0" * 8], "2 tensor frames, header uses 1"),
        ([bytes([201]), _tensor_msg(index=3), b"\0" * 8], "bad tensor frame index 3"),
        ([bytes([201]), _tensor_msg(), b"\0" * 7], "7 bytes for float32"),
        ([bytes([201]), _tensor_msg(dtype="float128"), b"\0" * 8], "unknown tensor dtype"),
        ([bytes([201]), _tensor_msg(shape=(-2,)), b"\0" * 8], "bad tensor shape"),
        ([bytes([201]), msgpack.packb([1, msgpack.ExtType(9, b"")]), b""], "unknown msgpack ext"),
    ],
)
def test_bad_tensor_references_raise_wire_error(frames, match):
    with pytest.raises(WireError, match=match):
        decode(frames)


def test_random_garbage_never_raises_anything_but_wire_error():
    rng = np.random.default_rng(0)
    good = encode(_request(parent=Img("p", 0, np.ones(3))))
    for _ in range(300):
        header = bytearray(good[1])
        for i in rng.integers(0, len(header), size=3):
            header[i] = rng.integers(0, 256)
        try:
            decode([good[0], bytes(header), good[2]])
        except WireError:
            pass


def test_the_bus_imports_no_torch():
    code = (
        "import sys, numpy as np\n"
        "from dataclasses import dataclass\n"
        "import bus.codec as c, bus.sockets\n"
        "@c.message(1)\n@dataclass\nclass M:\n    x: object\n"
        "c.decode(c.encode(M(np.ones(3)))).x.numpy()\n"
        "assert 'torch' not in sys.modules, 'bus imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_a_steps_token_deltas_round_trip_as_token_deltas():
    from bus import messages as m

    lp = [m.TokenLogprob(7, "a", -0.5, [m.TopLogprob(7, "a", -0.5)])]
    batch = m.TokenDeltas([m.TokenDelta("r1", "a", [7], None, None, 3, 1, 0, lp),
                           m.TokenDelta("r2@r1", "", [], "length", None, 4, 2)])
    frames = encode(batch)
    assert len(frames) == 2  # one header, no tensor frames
    assert decode(frames) == batch
    assert all(type(d) is m.TokenDelta for d in decode(frames).deltas)
