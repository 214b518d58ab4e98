"""How tensors and pull messages look on the wire (msgpack, never pickle).

A pull is one request and one reply, both starting with a msgpack map:

- request: ``{"v": 1, "op": "pull", "id": <int>, "key": <str>}``
- reply: ``{"v": 1, "id": <same>, "ok": true, ...}`` followed by the backend's
  payload frames, or ``{"v": 1, "id": <same>, "ok": false, "err": "not_found" |
  "error", "msg": <str>}`` alone.

The ``id`` lets many pulls share one connection and lets a late reply (its
puller gave up) be recognised and cleaned up. A tensor is described by
``(dtype name, shape)``; its bytes are the C-contiguous buffer.

A backend may also send one-way notices, ``{"v": 1, "op": <name>, ...}``
with no reply (the shm backend's ``release`` of a segment).
"""

from __future__ import annotations

import msgpack
import torch

VERSION = 1

# Whitelist: a peer's reply must never make us getattr arbitrary names on torch.
_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in (
        "float16", "bfloat16", "float32", "float64",
        "int8", "int16", "int32", "int64",
        "uint8", "uint16", "uint32", "uint64", "bool",
        "complex64", "complex128",
        "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
    )
    if isinstance(getattr(torch, name, None), torch.dtype)
}
_NAMES = {dt: name for name, dt in _DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    return _NAMES[dtype]


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype on the wire: {name!r}") from None


def check_tensor(t: object) -> None:
    """Raise ``TypeError`` unless ``t`` is a dense tensor of a dtype the wire knows."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"can only publish torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"can only publish dense tensors, got layout {t.layout}")
    if t.dtype not in _NAMES:
        raise TypeError(f"dtype {t.dtype} cannot travel (known: {sorted(_DTYPES)})")


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def host_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a C-contiguous CPU tensor (no copy when it already is one)."""
    t = t.detach().resolve_conj().resolve_neg()
    if t.device.type != "cpu":
        t = t.to("cpu")
    return t.contiguous()


def needs_host_copy(t: torch.Tensor) -> bool:
    return t.device.type != "cpu" or not t.is_contiguous() or t.is_conj() or t.is_neg()


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a C-contiguous CPU tensor as a flat uint8 view (bf16 has no numpy twin)."""
    return t.reshape(-1).view(torch.uint8)


def numel(shape: list[int]) -> int:
    """Elements of a shape from the wire (``ValueError`` unless it is a list of ints >= 0)."""
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise ValueError(f"bad shape on the wire: {shape!r}")
    count = 1
    for s in shape:
        count *= s
    return count


def from_buffer(buf, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    """A tensor over a writable buffer of exactly its bytes (keeps ``buf`` alive, no copy).

    Copies only when the buffer is not aligned to the element size (a zmq frame
    may point into a shared receive buffer at any offset).
    """
    count = numel(shape)
    itemsize = dtype.itemsize
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    raw = torch.frombuffer(buf, dtype=torch.uint8)
    if raw.numel() != count * itemsize:
        raise ValueError(f"buffer holds {raw.numel()} bytes, {dtype}{shape} needs {count * itemsize}")
    if raw.data_ptr() % itemsize:
        raw = raw.clone()
    return raw.view(dtype).view(shape)


def describe(tensors: list[torch.Tensor]) -> list[list]:
    return [[dtype_name(t.dtype), list(t.shape)] for t in tensors]


def pack_request(req_id: int, key: str) -> bytes:
    return msgpack.packb({"v": VERSION, "op": "pull", "id": req_id, "key": key})


def pack_notice(op: str, fields: dict) -> bytes:
    return msgpack.packb({"v": VERSION, "op": op, **fields})


def unpack_request(body: bytes) -> dict:
    """A pull request or a notice (``op`` other than "pull"), checked for shape."""
    req = msgpack.unpackb(body)
    if not isinstance(req, dict) or req.get("v") != VERSION or not isinstance(req.get("op"), str):
        raise ValueError(f"not a v{VERSION} request")
    if req["op"] == "pull" and (not isinstance(req.get("id"), int) or not isinstance(req.get("key"), str)):
        raise ValueError("pull request needs an int id and a str key")
    return req


def pack_reply(header: dict) -> bytes:
    return msgpack.packb({"v": VERSION, **header})


def unpack_reply(body: bytes) -> dict:
    rep = msgpack.unpackb(body)
    if not isinstance(rep, dict) or rep.get("v") != VERSION or not isinstance(rep.get("id"), int):
        raise ValueError(f"not a v{VERSION} pull reply")
    return rep
