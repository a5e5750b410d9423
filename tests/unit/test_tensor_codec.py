"""The tensor codec (``inferencehub.tensors``): OIP datatypes <-> numpy <-> raw bytes and value lists."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from inferencehub.errors import InvalidInput
from inferencehub.tensors import (
    DATATYPES,
    datatype_of,
    deserialize_bytes,
    element_count,
    from_raw,
    from_values,
    serialize_bytes,
    to_raw,
    to_values,
)

NUMERIC = [name for name in DATATYPES if name != "BYTES"]
shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=4)
elements = st.lists(st.binary(max_size=12), max_size=16)


@pytest.mark.parametrize("name", NUMERIC)
def test_datatype_of_names_each_numeric_dtype(name):
    assert datatype_of(np.zeros(2, dtype=DATATYPES[name].dtype)) == name


def test_datatype_of_ignores_byte_order():
    assert datatype_of(np.zeros(2, dtype=">i4")) == "INT32"
    assert datatype_of(np.zeros(2, dtype=">f8")) == "FP64"


@pytest.mark.parametrize("array", [np.array(["a", "bc"]), np.array([b"a"]), np.array([b"x", "y"], dtype=object)])
def test_strings_and_objects_are_bytes(array):
    assert datatype_of(array) == "BYTES"


def test_a_dtype_without_a_datatype_is_refused_by_name():
    with pytest.raises(InvalidInput, match="complex128 has no Open Inference Protocol datatype"):
        datatype_of(np.zeros(2, dtype=np.complex128))


def test_element_count_is_the_product_of_the_shape():
    assert element_count([2, 3, 4], "x") == 24
    assert element_count([5, 0], "x") == 0
    assert element_count([], "x") == 1  # a scalar


def test_a_negative_dimension_is_refused_naming_the_tensor():
    with pytest.raises(InvalidInput, match=r"tensor 'x': shape \[2, -1\] has a negative dimension"):
        element_count([2, -1], "x")


def test_serialize_bytes_prefixes_each_element_with_its_little_endian_length():
    raw = serialize_bytes(np.array([b"hi", "\u00e9", b""], dtype=object))
    assert raw == b"\x02\x00\x00\x00hi" + b"\x02\x00\x00\x00\xc3\xa9" + b"\x00\x00\x00\x00"


def test_deserialize_bytes_reads_what_serialize_wrote():
    out = deserialize_bytes(b"\x01\x00\x00\x00a\x03\x00\x00\x00xyz", 2, "t")
    assert out.dtype == object and list(out) == [b"a", b"xyz"]


@pytest.mark.parametrize(
    ("raw", "count", "message"),
    [
        (b"\x00" * 7, 2, "raw BYTES content of 7 bytes cannot hold 2 elements"),
        (b"\x01\x00\x00\x00a" + b"\x00\x00\x00", 2, "ends after 1 of 2 elements"),
        (b"\x09\x00\x00\x00abc" + b"\x00" * 4, 2, "element 0 runs past the end"),
        (b"\x01\x00\x00\x00ab", 1, "has 1 bytes left after 1 elements"),
    ],
)
def test_malformed_raw_bytes_are_refused_with_what_is_wrong(raw, count, message):
    with pytest.raises(InvalidInput, match=message):
        deserialize_bytes(raw, count, "t")


def test_a_huge_declared_count_is_refused_before_allocating():
    with pytest.raises(InvalidInput, match="cannot hold 1000000000000 elements"):
        from_raw(b"\x00" * 8, DATATYPES["BYTES"], [10**6, 10**6], "t")


def test_from_raw_checks_the_byte_count_against_datatype_and_shape():
    with pytest.raises(InvalidInput, match=r"raw content has 8 bytes, expected 12 for FP32 with shape \[3\]"):
        from_raw(b"\x00" * 8, DATATYPES["FP32"], [3], "t")


def test_from_raw_is_little_endian_and_shaped():
    out = from_raw(struct.pack("<4i", 1, 2, 3, -4), DATATYPES["INT32"], [2, 2], "t")
    assert out.tolist() == [[1, 2], [3, -4]]


def test_from_values_refuses_values_that_do_not_fit():
    with pytest.raises(InvalidInput, match="values do not fit datatype INT8"):
        from_values([1, 300], DATATYPES["INT8"], [2], "t")


def test_from_values_checks_the_element_count():
    with pytest.raises(InvalidInput, match=r"has 3 elements, expected 4 for shape \[2, 2\]"):
        from_values([1, 2, 3], DATATYPES["INT32"], [2, 2], "t")


def test_to_values_gives_bytes_for_strings():
    assert to_values(np.array(["a", b"b"], dtype=object), DATATYPES["BYTES"]) == [b"a", b"b"]


@pytest.mark.parametrize("name", NUMERIC)
@given(data=st.data())
def test_numeric_raw_round_trip(name, data):
    dtype = DATATYPES[name].dtype
    array = data.draw(hnp.arrays(dtype, shapes))
    raw = to_raw(array, DATATYPES[name])
    assert len(raw) == array.size * dtype.itemsize
    back = from_raw(raw, DATATYPES[name], list(array.shape), "t")
    assert back.shape == array.shape
    np.testing.assert_array_equal(back.view(np.uint8), np.ascontiguousarray(array).view(np.uint8))


@pytest.mark.parametrize("name", ["BOOL", "INT64", "UINT64", "FP32", "FP64"])
@given(data=st.data())
def test_value_list_round_trip(name, data):
    dt = DATATYPES[name]
    array = data.draw(hnp.arrays(dt.dtype, shapes, elements={"allow_nan": False} if dt.dtype.kind == "f" else None))
    back = from_values(to_values(array, dt), dt, list(array.shape), "t")
    np.testing.assert_array_equal(back, array)


@given(items=elements)
def test_bytes_raw_round_trip(items):
    array = np.empty(len(items), dtype=object)
    array[:] = items
    raw = to_raw(array, DATATYPES["BYTES"])
    assert len(raw) == 4 * len(items) + sum(map(len, items))
    assert list(from_raw(raw, DATATYPES["BYTES"], [len(items)], "t")) == items


@given(items=st.lists(st.binary(max_size=8), min_size=1, max_size=8), cut=st.integers(min_value=1))
def test_truncated_bytes_are_always_refused(items, cut):
    array = np.empty(len(items), dtype=object)
    array[:] = items
    raw = serialize_bytes(array)
    short = raw[: len(raw) - 1 - cut % len(raw)]
    with pytest.raises(InvalidInput):
        deserialize_bytes(short, len(items), "t")
