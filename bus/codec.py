"""Typed wire messages: dataclasses <-> ZeroMQ multipart frames.

A message on the wire is::

    [type byte, header, *tensor frames]

* the type byte names the message class, so a hop can route with `peek_type`
  without decoding;
* the header is msgpack ``[version, field_1, ..., field_n]``: the protocol
  version, then the fields in declaration order. Nested `@struct` dataclasses
  are arrays of their fields the same way. (Positional, not a map: for a
  10-field message the keys would triple the bytes and quadruple decode time.)
  A header shorter than the class leaves the trailing fields at their defaults,
  so appending a defaulted field keeps old senders working;
* every tensor in the fields becomes a msgpack ExtType holding
  ``(dtype, shape, index)`` and travels as frame ``2 + index``: its raw bytes,
  sent without a copy when it is contiguous and on the host.

Tensors decode to `TensorFrame` views over the received buffers, whatever the
field's annotation says. Torch is never imported at module level: the router
process loads no torch.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import sys
import types
import typing
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, TypeVar

import msgpack
import numpy as np

_packb = msgpack.packb
_unpackb = msgpack.unpackb

PROTOCOL_VERSION = 1

_TENSOR_EXT = 1  # msgpack ExtType code of a tensor reference

# The dtype vocabulary shared by numpy and torch (torch names without "torch.").
_ITEMSIZE: dict[str, int] = {
    "bool": 1, "uint8": 1, "int8": 1, "int16": 2, "uint16": 2, "int32": 4,
    "uint32": 4, "int64": 8, "uint64": 8, "float16": 2, "bfloat16": 2,
    "float32": 4, "float64": 8, "complex64": 8, "complex128": 16,
    "float8_e4m3fn": 1, "float8_e5m2": 1, "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1,
}
# Those numpy can view without torch; the rest (bfloat16, float8) need `.torch()`.
_NP_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name) for name in _ITEMSIZE if not name.startswith(("bfloat", "float8"))
}

T = TypeVar("T")


class WireError(ValueError):
    """A received message cannot be decoded (bad version, unknown type, bad header or frames)."""


@dataclass(frozen=True, slots=True, eq=False)
class TensorFrame:
    """A received tensor: dtype name, shape, and its bytes (a view of the frame, no copy).

    The arrays `numpy` and `torch` return alias the receive buffer. `encode`
    accepts a TensorFrame too, so a hop can forward a tensor untouched.
    """

    dtype: str
    shape: tuple[int, ...]
    buffer: memoryview

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes

    def numpy(self) -> np.ndarray:
        """A numpy view of the buffer (zero-copy). bfloat16/float8 raise: use `torch()`."""
        dt = _NP_DTYPES.get(self.dtype)
        if dt is None:
            raise TypeError(f"numpy has no dtype {self.dtype!r}; use TensorFrame.torch()")
        return np.frombuffer(self.buffer, dtype=dt).reshape(self.shape)

    def torch(self, device: Any = None) -> Any:
        """A torch tensor over the buffer (zero-copy on cpu), moved to `device` if given."""
        import torch

        dt = getattr(torch, self.dtype)
        if self.buffer.nbytes == 0:  # frombuffer rejects empty buffers
            t = torch.empty(self.shape, dtype=dt)
        else:
            if self.buffer.readonly:
                # A bytes frame is read-only; torch warns, then shares it anyway.
                # Like the numpy view, the tensor must be treated as read-only.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    raw = torch.frombuffer(self.buffer, dtype=torch.uint8)
            else:
                raw = torch.frombuffer(self.buffer, dtype=torch.uint8)
            if raw.data_ptr() % _ITEMSIZE[self.dtype]:
                # libzmq may place a small frame at any offset of its receive buffer.
                raw = raw.clone()
            # Through uint8 every dtype (bfloat16, float8) reinterprets the same way.
            t = raw.view(dt).view(self.shape)
        return t if device is None else t.to(device)

    def __repr__(self) -> str:
        return f"TensorFrame(dtype={self.dtype!r}, shape={self.shape}, nbytes={self.nbytes})"


# ---------------------------------------------------------------- registration

_MESSAGES: dict[int, type] = {}


def _register_fields(cls: type) -> type:
    # `@message(7)` / `@struct` alone also make the class a dataclass.
    if not dataclasses.is_dataclass(cls):
        cls = dataclass(cls)
    names = tuple(f.name for f in dataclasses.fields(cls))
    cls.__wire_fields__ = names
    # attrgetter returns a bare value for one name (and needs one); the wire wants a tuple.
    if len(names) > 1:
        cls.__wire_values__ = attrgetter(*names)
    elif names:
        cls.__wire_values__ = lambda obj, name=names[0]: (getattr(obj, name),)
    else:
        cls.__wire_values__ = lambda obj: ()
    cls.__wire_plain__ = True  # until a value needs the encode hook (see `encode`)
    return cls


def struct(cls: type[T]) -> type[T]:
    """Mark a dataclass as a nested wire struct (no type byte; a field of a message)."""
    return _register_fields(cls)


def message(type_id: int) -> Callable[[type[T]], type[T]]:
    """Register a dataclass as a top-level wire message with a unique one-byte type id."""
    if type(type_id) is not int or not 0 <= type_id <= 255:
        raise ValueError(f"message type id must be an int in 0..255, got {type_id!r}")

    def register(cls: type[T]) -> type[T]:
        cls = _register_fields(cls)
        old = _MESSAGES.get(type_id)
        # Re-running the same definition (a module reload) replaces it; anything else clashes.
        if old is not None and _qualname(old) != _qualname(cls):
            raise ValueError(
                f"message type id {type_id} of {_qualname(cls)} is taken by {_qualname(old)}"
            )
        cls.__wire_type__ = type_id
        cls.__wire_type_byte__ = bytes([type_id])
        _MESSAGES[type_id] = cls
        _DECODERS.pop(old, None)
        return cls

    return register


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# ---------------------------------------------------------------- encoding


def _tensor_bytes(obj: Any) -> tuple[str, tuple[int, ...], Any] | None:
    """(dtype, shape, contiguous flat byte buffer) of an array/tensor, or None if not one."""
    if isinstance(obj, np.ndarray):
        name = obj.dtype.name
        if name not in _NP_DTYPES:
            raise TypeError(f"cannot send a numpy array of dtype {obj.dtype}")
        if not obj.dtype.isnative:
            obj = obj.astype(obj.dtype.newbyteorder("="))
        # ascontiguousarray copies only when needed; a uint8 view makes any dtype bytes.
        return name, obj.shape, np.ascontiguousarray(obj).reshape(-1).view(np.uint8).data
    if isinstance(obj, TensorFrame):
        return obj.dtype, obj.shape, obj.buffer
    torch = sys.modules.get("torch")  # never imported -> obj cannot be a tensor
    if torch is not None and isinstance(obj, torch.Tensor):
        name = str(obj.dtype).removeprefix("torch.")
        if name not in _ITEMSIZE:
            raise TypeError(f"cannot send a torch tensor of dtype {obj.dtype}")
        t = obj.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        # numpy has no bfloat16/float8: a flat uint8 view carries any dtype's bytes.
        flat = t.contiguous().reshape(-1).view(torch.uint8)
        return name, tuple(obj.shape), flat.numpy().data
    return None


def encode(msg: Any) -> list[bytes | memoryview]:
    """Frames of a `@message` instance: [type byte, header, *tensor frames].

    Tensor frames are views of the tensors' memory (zero-copy when contiguous
    and on the host): do not modify a sent tensor until the peer has it.
    """
    cls = type(msg)
    tb = getattr(cls, "__wire_type_byte__", None)
    if tb is None:
        raise TypeError(f"{cls.__qualname__} is not a @message")
    values = (PROTOCOL_VERSION, *cls.__wire_values__(msg))
    if cls.__wire_plain__:
        # Most messages hold only msgpack-native values: skip building the hook.
        try:
            return [tb, _packb(values)]
        except TypeError:
            cls.__wire_plain__ = False  # it carries structs or tensors: hook from now on
    tensors: list[Any] = []
    header = _packb(values, default=_Hook(cls, tensors))
    return [tb, header, *tensors]


class _Hook:
    """msgpack `default`: structs to field arrays, tensors to ExtType refs + frames."""

    def __init__(self, cls: type, tensors: list[Any]):
        self.cls = cls
        self.tensors = tensors

    def __call__(self, obj: Any) -> Any:
        values = getattr(type(obj), "__wire_values__", None)
        if values is not None:  # a nested @struct
            return values(obj)
        found = _tensor_bytes(obj)
        if found is not None:
            dtype, shape, buf = found
            self.tensors.append(buf)
            ref = _packb((dtype, shape, len(self.tensors) - 1))
            return msgpack.ExtType(_TENSOR_EXT, ref)
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, enum.Enum):
            return obj.value
        if dataclasses.is_dataclass(obj):
            raise TypeError(f"nested dataclass {type(obj).__qualname__} must be decorated @struct")
        raise TypeError(f"cannot encode a {type(obj).__qualname__} in {self.cls.__qualname__}")


# ---------------------------------------------------------------- decoding

_Conv = Callable[[Any], Any]
# class -> ((field index, converter), ...) for the fields msgpack does not rebuild alone.
_DECODERS: dict[type, tuple[tuple[int, _Conv], ...]] = {}


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:
        # An annotation that does not resolve here (e.g. `torch.Tensor` imported under
        # TYPE_CHECKING) stays unconverted; the others still resolve.
        ns = vars(sys.modules[cls.__module__])
        out = {}
        for f in dataclasses.fields(cls):
            try:
                out[f.name] = eval(f.type, ns) if isinstance(f.type, str) else f.type
            except Exception:
                out[f.name] = Any
        return out


def _converter(tp: Any) -> _Conv | None:
    """How to rebuild a decoded msgpack value as a `tp`; None when it already is one."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is None:
        if isinstance(tp, type) and hasattr(tp, "__wire_fields__"):
            return lambda v: _build(tp, v)
        if tp is tuple or isinstance(tp, type) and issubclass(tp, enum.Enum):
            return tp
        return None
    if origin in (typing.Union, types.UnionType):
        arms = [a for a in args if a is not type(None)]
        convs = [c for c in map(_converter, arms) if c is not None]
        if not convs:
            return None
        if len(arms) > 1:
            raise TypeError(f"cannot decode {tp}: a struct or enum in a union with other types")
        c = convs[0]
        return lambda v: None if v is None else c(v)
    if origin is tuple and not (len(args) == 2 and args[1] is ...):
        cs = [_converter(a) for a in args]  # tuple[A, B]: one converter per position
        if not any(cs):
            return tuple
        return lambda v: tuple(x if c is None else c(x) for c, x in zip(cs, v, strict=True))
    if origin in (list, Sequence):  # msgpack arrays already decode as lists
        c = _converter(args[0]) if args else None
        return None if c is None else (lambda v: [c(x) for x in v])
    if origin is tuple:  # tuple[X, ...]
        c = _converter(args[0])
        return tuple if c is None else (lambda v: tuple(c(x) for x in v))
    if origin in (dict, Mapping):
        c = _converter(args[1]) if len(args) == 2 else None
        return None if c is None else (lambda v: {k: c(x) for k, x in v.items()})
    return None


def _decoder(cls: type) -> tuple[tuple[int, _Conv], ...]:
    convs = _DECODERS.get(cls)
    if convs is None:  # once per class: type hints are slow to resolve
        hints = _hints(cls)
        built = ((i, _converter(hints.get(n, Any))) for i, n in enumerate(cls.__wire_fields__))
        convs = _DECODERS[cls] = tuple((i, c) for i, c in built if c is not None)
    return convs


def _build(cls: type, values: Any, start: int = 0) -> Any:
    """An instance of `cls` from `values[start:]`, its fields in declaration order."""
    if type(values) is not list:
        raise WireError(f"{cls.__qualname__}: expected an array, got {type(values).__name__}")
    n = len(values) - start
    if n > len(cls.__wire_fields__):
        raise WireError(f"{cls.__qualname__}: {n} fields, expected {len(cls.__wire_fields__)}")
    try:
        for i, conv in _decoder(cls):
            if i < n:
                values[start + i] = conv(values[start + i])
        return cls(*values[start:]) if start else cls(*values)
    except WireError as e:
        raise WireError(f"{cls.__qualname__}: {e}") from None
    except Exception as e:  # missing fields, wrong shapes, the class's own checks
        raise WireError(f"{cls.__qualname__}: {e}") from e


def peek_type(frames: list[Any]) -> int:
    """The message type id of `frames`, without decoding the header."""
    if not frames:
        raise WireError("empty message")
    # Frames are bytes, memoryviews or zmq.Frames: all offer len() and the buffer protocol.
    if len(frames[0]) != 1:
        raise WireError(f"type frame must be 1 byte, got {len(frames[0])}")
    return bytes(frames[0])[0]


def _no_tensors(code: int, data: bytes) -> Any:
    raise WireError("header references a tensor but the message has no tensor frames")


class _TensorRefs:
    """msgpack ext_hook: turns tensor references into TensorFrames over frames[2:]."""

    def __init__(self, frames: list[Any]):
        self.frames = frames
        self.n = len(frames) - 2
        self.used = 0  # bit i set once tensor frame i is referenced

    def __call__(self, code: int, payload: bytes) -> TensorFrame:
        if code != _TENSOR_EXT:
            raise WireError(f"unknown msgpack ext type {code}")
        dtype, shape, index = _unpackb(payload)
        if type(index) is not int or not 0 <= index < self.n or self.used >> index & 1:
            raise WireError(f"bad tensor frame index {index!r} ({self.n} tensor frames)")
        size = _ITEMSIZE.get(dtype)
        if size is None:
            raise WireError(f"unknown tensor dtype {dtype!r}")
        if type(shape) is not list or not all(type(d) is int and d >= 0 for d in shape):
            raise WireError(f"bad tensor shape {shape!r}")
        buf = memoryview(self.frames[2 + index])
        if buf.nbytes != math.prod(shape) * size:
            raise WireError(f"tensor {index}: {buf.nbytes} bytes for {dtype}{shape}")
        self.used |= 1 << index
        return TensorFrame(dtype, tuple(shape), buf)


def decode(frames: list[Any]) -> Any:
    """Rebuild a message from its frames (`bytes`, `memoryview` or `zmq.Frame`).

    Anything malformed raises `WireError`, never another exception.
    """
    cls = _MESSAGES.get(peek_type(frames))
    if cls is None:
        raise WireError(f"unknown message type {peek_type(frames)}")
    if len(frames) < 2:
        raise WireError(f"{cls.__qualname__}: no header frame")
    refs = _TensorRefs(frames) if len(frames) > 2 else None
    try:
        values = _unpackb(frames[1], ext_hook=refs or _no_tensors, strict_map_key=False)
    except WireError as e:
        raise WireError(f"{cls.__qualname__}: {e}") from None
    except Exception as e:
        raise WireError(f"{cls.__qualname__}: malformed header: {e!r}") from e
    if type(values) is not list or not values:
        raise WireError(f"{cls.__qualname__}: header is not [version, *fields]: {values!r:.80}")
    if values[0] != PROTOCOL_VERSION:
        raise WireError(
            f"{cls.__qualname__}: protocol version {values[0]!r}, expected {PROTOCOL_VERSION}"
        )
    if refs is not None and refs.used != (1 << refs.n) - 1:
        raise WireError(
            f"{cls.__qualname__}: {refs.n} tensor frames, header uses {refs.used.bit_count()}"
        )
    return _build(cls, values, 1)
