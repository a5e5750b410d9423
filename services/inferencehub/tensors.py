"""The tensor codec shared by the inference service and the gateway.

Open Inference Protocol datatypes <-> numpy, from and to the protobuf forms: typed
``InferTensorContents`` or little-endian ``raw_*_contents`` bytes (BYTES elements in
raw form are each prefixed with a 4-byte little-endian length).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np

from inferencehub.errors import InvalidInput


@dataclass(frozen=True)
class Datatype:
    name: str
    dtype: np.dtype
    contents_field: str | None  # the typed InferTensorContents field, None if raw only


def _dt(name: str, dtype: str, field: str | None) -> Datatype:
    return Datatype(name, np.dtype(dtype), field)


DATATYPES: dict[str, Datatype] = {
    d.name: d
    for d in (
        _dt("BOOL", "?", "bool_contents"),
        _dt("UINT8", "<u1", "uint_contents"),
        _dt("UINT16", "<u2", "uint_contents"),
        _dt("UINT32", "<u4", "uint_contents"),
        _dt("UINT64", "<u8", "uint64_contents"),
        _dt("INT8", "<i1", "int_contents"),
        _dt("INT16", "<i2", "int_contents"),
        _dt("INT32", "<i4", "int_contents"),
        _dt("INT64", "<i8", "int64_contents"),
        _dt("FP16", "<f2", None),
        _dt("FP32", "<f4", "fp32_contents"),
        _dt("FP64", "<f8", "fp64_contents"),
        _dt("BYTES", "O", "bytes_contents"),
    )
}


def datatype_of(array: np.ndarray) -> str:
    """The OIP datatype name for a numpy array."""
    if array.dtype.kind in "OSU":
        return "BYTES"
    for d in DATATYPES.values():
        if d.dtype.kind != "O" and d.dtype == array.dtype.newbyteorder("<"):
            return d.name
    raise InvalidInput(f"numpy dtype {array.dtype} has no Open Inference Protocol datatype")


def element_count(shape: list[int] | tuple[int, ...], tensor: str) -> int:
    if any(dim < 0 for dim in shape):
        raise InvalidInput(f"tensor '{tensor}': shape {list(shape)} has a negative dimension")
    return math.prod(shape)


def serialize_bytes(array: np.ndarray) -> bytes:
    """BYTES elements, each with a 4-byte little-endian length prefix."""
    parts = []
    for item in array.ravel():
        data = item.encode() if isinstance(item, str) else bytes(item)
        parts.append(struct.pack("<I", len(data)))
        parts.append(data)
    return b"".join(parts)


def deserialize_bytes(raw: bytes, count: int, tensor: str) -> np.ndarray:
    view = memoryview(raw)
    # Every element takes at least its 4-byte length: check the declared count against the bytes that
    # came before allocating anything from it (a short request must not reserve gigabytes).
    if count > len(view) // 4:
        raise InvalidInput(
            f"tensor '{tensor}': raw BYTES content of {len(view)} bytes cannot hold {count} elements "
            f"(each takes at least 4 bytes)"
        )
    out = np.empty(count, dtype=object)
    offset = 0
    for i in range(count):
        if offset + 4 > len(view):
            raise InvalidInput(f"tensor '{tensor}': raw BYTES content ends after {i} of {count} elements")
        (length,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if offset + length > len(view):
            raise InvalidInput(f"tensor '{tensor}': raw BYTES element {i} runs past the end of the content")
        out[i] = bytes(view[offset : offset + length])
        offset += length
    if offset != len(view):
        raise InvalidInput(
            f"tensor '{tensor}': raw BYTES content has {len(view) - offset} bytes left after {count} elements"
        )
    return out


def from_raw(raw: bytes, dt: Datatype, shape: list[int], tensor: str) -> np.ndarray:
    count = element_count(shape, tensor)
    if dt.name == "BYTES":
        return deserialize_bytes(raw, count, tensor).reshape(shape)
    expected = count * dt.dtype.itemsize
    if len(raw) != expected:
        raise InvalidInput(
            f"tensor '{tensor}': raw content has {len(raw)} bytes, expected {expected} "
            f"for {dt.name} with shape {list(shape)}"
        )
    return np.frombuffer(raw, dtype=dt.dtype).reshape(shape)


def from_values(values, dt: Datatype, shape: list[int], tensor: str) -> np.ndarray:
    """A tensor from a flat sequence of values (typed protobuf contents or a JSON list)."""
    count = element_count(shape, tensor)
    if not isinstance(values, list):
        values = list(values)  # numpy would wrap out-of-range ints from a protobuf container silently
    if len(values) != count:
        raise InvalidInput(f"tensor '{tensor}': has {len(values)} elements, expected {count} for shape {list(shape)}")
    try:
        if dt.name == "BYTES":
            array = np.empty(count, dtype=object)
            array[:] = [v.encode() if isinstance(v, str) else bytes(v) for v in values]
        else:
            array = np.array(values, dtype=dt.dtype)
    except (OverflowError, ValueError, TypeError) as exc:
        raise InvalidInput(f"tensor '{tensor}': values do not fit datatype {dt.name}: {exc}") from None
    return array.reshape(shape)


def to_raw(array: np.ndarray, dt: Datatype) -> bytes:
    if dt.name == "BYTES":
        return serialize_bytes(array)
    return np.ascontiguousarray(array, dtype=dt.dtype).tobytes()


def to_values(array: np.ndarray, dt: Datatype) -> list:
    """A flat list of Python values for typed protobuf contents or JSON."""
    if dt.name == "BYTES":
        return [v.encode() if isinstance(v, str) else bytes(v) for v in array.ravel()]
    return np.asarray(array, dtype=dt.dtype).ravel().tolist()
