"""Cross-hop coalescing's pure parts (``oip/coalescing.py``): which requests may travel together, how they are
merged into one ``ModelInferRequest``, and how the one response is split back by rows."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from inferencehub.oip.coalescing import _bytes_cuts, coalescing_key, merge, split
from inferencehub.protocol.inference import grpc_predict_v2_pb2 as pb
from inferencehub.tensors import DATATYPES, serialize_bytes, to_raw


@dataclass
class Part:
    message: pb.ModelInferRequest
    rows: int


def member(message: pb.ModelInferRequest, rows: int, request_id: str = "") -> Part:
    return Part(message, rows)


def floats(rows: int, width: int = 2, start: float = 0.0) -> bytes:
    return np.arange(start, start + rows * width, dtype="<f4").tobytes()


def echo(merged: pb.ModelInferRequest, output: str = "y") -> pb.ModelInferResponse:
    """What an identity model answers: its first input as the output."""
    response = pb.ModelInferResponse(model_name=merged.model_name, model_version=merged.model_version)
    tensor = merged.inputs[0]
    response.outputs.add(name=output, datatype=tensor.datatype, shape=list(tensor.shape))
    response.raw_output_contents.append(merged.raw_input_contents[0])
    return response


# --- coalescing_key ---------------------------------------------------------------------------------------------


def test_requests_that_differ_only_in_rows_share_a_key(infer_request):
    one = coalescing_key(infer_request(("x", "FP32", [1, 2], floats(1))))
    three = coalescing_key(infer_request(("x", "FP32", [3, 2], floats(3))))
    assert one is not None and three is not None
    assert one[0] == three[0]
    assert (one[1], three[1]) == (1, 3)


@pytest.mark.parametrize(
    "other",
    [
        (("x", "FP32", [1, 3], floats(1, 3)),),  # another size beyond the first dimension
        (("x", "FP64", [1, 2], b"\x00" * 16),),  # another datatype
        (("z", "FP32", [1, 2], floats(1)),),  # another input name
    ],
)
def test_requests_with_other_tensors_get_another_key(infer_request, other):
    assert (
        coalescing_key(infer_request(("x", "FP32", [1, 2], floats(1))))[0] != coalescing_key(infer_request(*other))[0]
    )


def test_requested_outputs_and_parameters_are_part_of_the_key(infer_request):
    base = infer_request(("x", "FP32", [1, 2], floats(1)))
    with_output = infer_request(("x", "FP32", [1, 2], floats(1)), outputs=["y"])
    with_param = infer_request(("x", "FP32", [1, 2], floats(1)))
    with_param.parameters["k"].int64_param = 1
    as_string = infer_request(("x", "FP32", [1, 2], floats(1)))
    as_string.parameters["k"].string_param = "1"
    keys = [coalescing_key(m)[0] for m in (base, with_output, with_param, as_string)]
    assert len(set(keys)) == 4


def test_parameter_order_does_not_matter(infer_request):
    a = infer_request(("x", "FP32", [1, 2], floats(1)))
    a.parameters["p"].int64_param = 1
    a.parameters["q"].bool_param = True
    b = infer_request(("x", "FP32", [1, 2], floats(1)))
    b.parameters["q"].bool_param = True
    b.parameters["p"].int64_param = 1
    assert coalescing_key(a) == coalescing_key(b)


def test_requests_that_cannot_be_stacked_go_alone(infer_request):
    assert coalescing_key(pb.ModelInferRequest(model_name="m")) is None  # no inputs
    assert coalescing_key(infer_request(("x", "FP32", [], b"\x00" * 4))) is None  # a scalar
    assert coalescing_key(infer_request(("x", "FP32", [0, 2], b""))) is None  # no rows
    rows_differ = infer_request(("a", "FP32", [1, 2], floats(1)), ("b", "FP32", [2, 2], floats(2)))
    assert coalescing_key(rows_differ) is None
    typed = pb.ModelInferRequest(model_name="m")
    typed.inputs.add(name="x", datatype="FP32", shape=[1, 1]).contents.fp32_contents.append(1.0)
    assert coalescing_key(typed) is None  # not in raw form


# --- merge -----------------------------------------------------------------------------------------------------


def test_merge_concatenates_each_input_in_member_order(infer_request):
    a = infer_request(("x", "FP32", [1, 2], floats(1, start=0)), ("i", "INT32", [1], struct.pack("<i", 7)))
    b = infer_request(("x", "FP32", [2, 2], floats(2, start=10)), ("i", "INT32", [2], struct.pack("<2i", 8, 9)))
    merged = merge([member(a, 1), member(b, 2)])
    assert [(t.name, list(t.shape)) for t in merged.inputs] == [("x", [3, 2]), ("i", [3])]
    assert merged.raw_input_contents[0] == floats(1, start=0) + floats(2, start=10)
    assert merged.raw_input_contents[1] == struct.pack("<3i", 7, 8, 9)


def test_merge_keeps_the_model_outputs_and_parameters(infer_request):
    first = infer_request(("x", "FP32", [1, 2], floats(1)), model="iris", version="2", outputs=["y"])
    first.parameters["k"].string_param = "v"
    first.inputs[0].parameters["scale"].double_param = 0.5
    merged = merge([member(first, 1), member(first, 1)])
    assert (merged.model_name, merged.model_version) == ("iris", "2")
    assert [o.name for o in merged.outputs] == ["y"]
    assert merged.parameters["k"].string_param == "v"
    assert merged.inputs[0].parameters["scale"].double_param == 0.5


# --- split -----------------------------------------------------------------------------------------------------


def test_split_gives_each_member_its_own_rows_and_id(infer_request):
    a = infer_request(("x", "FP32", [1, 2], floats(1, start=0)), request_id="a")
    b = infer_request(("x", "FP32", [2, 2], floats(2, start=10)), request_id="b")
    members = [member(a, 1), member(b, 2)]
    response = echo(merge(members))
    response.parameters["note"].string_param = "kept"
    answers = split(response, members)
    assert [x.id for x in answers] == ["a", "b"]
    assert [list(x.outputs[0].shape) for x in answers] == [[1, 2], [2, 2]]
    assert answers[0].raw_output_contents == [floats(1, start=0)]
    assert answers[1].raw_output_contents == [floats(2, start=10)]
    assert all(x.parameters["note"].string_param == "kept" for x in answers)
    assert all((x.model_name, x.model_version) == ("m", "") for x in answers)


def test_split_cuts_bytes_outputs_by_elements(infer_request):
    rows_a = np.array([b"a", b"bcd"], dtype=object)
    rows_b = np.array([b"", b"e", b"fg"], dtype=object)
    members = [
        member(infer_request(("s", "BYTES", [2], serialize_bytes(rows_a))), 2),
        member(infer_request(("s", "BYTES", [3], serialize_bytes(rows_b))), 3),
    ]
    answers = split(echo(merge(members)), members)
    assert [x.raw_output_contents[0] for x in answers] == [serialize_bytes(rows_a), serialize_bytes(rows_b)]


@pytest.mark.parametrize(
    "spoil",
    [
        lambda r: r.outputs[0].shape.__setitem__(0, 4),  # not the members' rows
        lambda r: r.raw_output_contents.__setitem__(0, r.raw_output_contents[0][:-4]),  # short data
        lambda r: setattr(r.outputs[0], "datatype", "FP128"),  # unknown datatype
        lambda r: r.raw_output_contents.pop(),  # not in raw form
        lambda r: r.outputs[0].ClearField("shape"),  # a scalar
    ],
)
def test_a_response_that_cannot_be_split_by_rows_is_none(infer_request, spoil):
    members = [member(infer_request(("x", "FP32", [1, 2], floats(1))), 1) for _ in range(3)]
    response = echo(merge(members))
    spoil(response)
    assert split(response, members) is None


def test_bytes_cuts():
    data = serialize_bytes(np.array([b"a", b"", b"xyz"], dtype=object))
    assert _bytes_cuts(data, [1, 2]) == [0, 5, 16]
    assert _bytes_cuts(data, [3]) == [0, 16]
    assert _bytes_cuts(data, [1, 1]) is None  # an element left over
    assert _bytes_cuts(data, [2, 2]) is None  # one element too many
    assert _bytes_cuts(data[:-1], [3]) is None  # the last element runs past the end
    assert _bytes_cuts(b"", [0, 0]) == [0, 0, 0]


# --- properties ------------------------------------------------------------------------------------------------

numeric = st.sampled_from(["BOOL", "UINT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"])


@given(
    datatype=numeric,
    rows=st.lists(st.integers(1, 5), min_size=1, max_size=6),
    tail=st.lists(st.integers(1, 3), max_size=2),
    seed=st.integers(0, 2**32 - 1),
)
def test_split_undoes_merge(infer_request, datatype, rows, tail, seed):
    """For an identity model, each member gets back exactly its own input, whatever the group."""
    rng = np.random.default_rng(seed)
    dt = DATATYPES[datatype]
    arrays = [rng.integers(0, 100, size=[r, *tail]).astype(dt.dtype) for r in rows]
    messages = [
        infer_request(("x", datatype, a.shape, to_raw(a, dt)), request_id=f"r{i}") for i, a in enumerate(arrays)
    ]
    keys = {coalescing_key(m) and coalescing_key(m)[0] for m in messages}
    assert len(keys) == 1 and None not in keys
    members = [member(m, coalescing_key(m)[1], m.id) for m in messages]
    merged = merge(members)
    assert list(merged.inputs[0].shape) == [sum(rows), *tail]
    answers = split(echo(merged), members)
    assert answers is not None
    for message, answer in zip(messages, answers, strict=True):
        assert answer.id == message.id
        assert list(answer.outputs[0].shape) == list(message.inputs[0].shape)
        assert answer.raw_output_contents[0] == message.raw_input_contents[0]


@given(groups=st.lists(st.lists(st.binary(max_size=5), min_size=1, max_size=4), min_size=1, max_size=5))
def test_bytes_split_undoes_merge(infer_request, groups):
    messages = []
    for items in groups:
        array = np.empty(len(items), dtype=object)
        array[:] = items
        messages.append(infer_request(("s", "BYTES", [len(items)], serialize_bytes(array))))
    members = [member(m, len(items)) for m, items in zip(messages, groups, strict=True)]
    answers = split(echo(merge(members)), members)
    assert [a.raw_output_contents[0] for a in answers] == [m.raw_input_contents[0] for m in messages]
