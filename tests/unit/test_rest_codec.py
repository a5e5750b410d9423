"""The OIP REST codec (``gateway/rest.py``): HTTP/JSON and binary tensor data <-> ``ModelInferRequest``/``Response``."""

from __future__ import annotations

import json
import struct

import numpy as np
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from inferencehub.client import HttpTransport, _decode_http
from inferencehub.errors import InvalidInput
from inferencehub.gateway.rest import (
    HEADER_LENGTH,
    model_config_json,
    model_metadata_json,
    parse_header_length,
    parse_infer_request,
    render_infer_response,
)
from inferencehub.oip.plan import OutputPlan
from inferencehub.protocol.inference import grpc_predict_v2_pb2 as pb
from inferencehub.tensors import DATATYPES, from_raw, to_raw


def body(inputs, **extra) -> bytes:
    return json.dumps({"inputs": inputs, **extra}).encode()


def parse(document, model="m", version=""):
    data = document if isinstance(document, bytes) else json.dumps(document).encode()
    return parse_infer_request(data, None, model, version)


def invalid(document, match, model="m", version=""):
    with pytest.raises(InvalidInput, match=match):
        parse(document, model, version)


def binary_body(header: dict, *blobs: bytes) -> tuple[bytes, int]:
    head = json.dumps(header).encode()
    return b"".join([head, *blobs]), len(head)


X = {"name": "x", "datatype": "INT32", "shape": [2, 2]}


# --- requests: JSON data ---------------------------------------------------------------------------------------


def test_json_data_travels_as_little_endian_raw_bytes():
    request, plan = parse({"id": "r1", "inputs": [{**X, "data": [1, 2, 3, -4]}]}, version="3")
    assert (request.model_name, request.model_version, request.id) == ("m", "3", "r1")
    assert [(t.name, t.datatype, list(t.shape)) for t in request.inputs] == [("x", "INT32", [2, 2])]
    assert request.raw_input_contents == [struct.pack("<4i", 1, 2, 3, -4)]
    assert plan == OutputPlan(False, {})


def test_nested_data_in_the_declared_shape_is_accepted():
    request, _ = parse({"inputs": [{**X, "data": [[1, 2], [3, 4]]}]})
    assert request.raw_input_contents[0] == struct.pack("<4i", 1, 2, 3, 4)


def test_nested_data_of_another_shape_is_refused():
    invalid({"inputs": [{**X, "data": [[1, 2, 3, 4]]}]}, r"nested data has shape \[1, 4\], but 'shape' says \[2, 2\]")


def test_the_element_count_must_match_the_shape():
    invalid({"inputs": [{**X, "data": [1, 2, 3]}]}, r"input 'x': has 3 elements, expected 4 for shape \[2, 2\]")


def test_ragged_data_is_refused():
    invalid({"inputs": [{**X, "data": [[1, 2], [3]]}]}, "not a rectangular array")


@pytest.mark.parametrize(
    ("datatype", "data", "message"),
    [
        ("BOOL", [1, 0], "BOOL data must be true/false"),
        ("FP32", ["a", "b"], "FP32 data must be numbers"),
        ("INT32", [1, 2.5], "INT32 data must be integers"),
        ("INT32", [True, False], "INT32 data must be integers"),
        ("INT8", [1, 128], r"values do not fit INT8 \(-128 to 127\)"),
        ("UINT8", [-1, 0], r"values do not fit UINT8 \(0 to 255\)"),
        ("UINT64", [-1, 2**64 - 1], "values do not fit UINT64"),
        ("BYTES", ["a", 1], "BYTES data must be strings"),
    ],
)
def test_values_are_checked_against_the_datatype(datatype, data, message):
    invalid({"inputs": [{"name": "x", "datatype": datatype, "shape": [2], "data": data}]}, f"input 'x': {message}")


def test_the_full_uint64_and_int64_ranges_are_accepted():
    request, _ = parse(
        {
            "inputs": [
                {"name": "u", "datatype": "UINT64", "shape": [2], "data": [0, 2**64 - 1]},
                {"name": "i", "datatype": "INT64", "shape": [2], "data": [-(2**63), 2**63 - 1]},
            ]
        }
    )
    assert request.raw_input_contents[0] == struct.pack("<2Q", 0, 2**64 - 1)
    assert request.raw_input_contents[1] == struct.pack("<2q", -(2**63), 2**63 - 1)


def test_integers_are_accepted_for_floating_point_and_bools_for_bool():
    request, _ = parse(
        {
            "inputs": [
                {"name": "f", "datatype": "FP16", "shape": [2], "data": [1, 0.5]},
                {"name": "b", "datatype": "BOOL", "shape": [2], "data": [True, False]},
            ]
        }
    )
    assert np.frombuffer(request.raw_input_contents[0], "<f2").tolist() == [1.0, 0.5]
    assert request.raw_input_contents[1] == b"\x01\x00"


def test_bytes_data_is_length_prefixed_utf8():
    request, _ = parse({"inputs": [{"name": "s", "datatype": "BYTES", "shape": [2], "data": ["\u00e9", ""]}]})
    assert request.raw_input_contents[0] == b"\x02\x00\x00\x00\xc3\xa9\x00\x00\x00\x00"


def test_an_empty_tensor_is_empty_raw_content():
    request, _ = parse({"inputs": [{"name": "x", "datatype": "FP32", "shape": [0, 3], "data": []}]})
    assert request.raw_input_contents == [b""]


def test_an_input_without_data_is_refused():
    invalid({"inputs": [X]}, "input 'x': needs 'data'")


# --- requests: the document ------------------------------------------------------------------------------------


def test_a_body_that_is_not_json_is_refused():
    invalid(b"{not json", "request body is not valid JSON")


def test_an_unknown_field_is_refused_with_its_path():
    invalid({"inputs": [{**X, "data": [1, 2, 3, 4], "colour": 1}]}, r"unknown field `colour` at inputs\[0\]")


def test_a_schema_error_names_the_tensor():
    invalid({"inputs": [{"name": "pixels", "datatype": "INT33", "shape": [1], "data": [1]}]}, "input 'pixels'")


def test_a_negative_dimension_is_refused_by_the_schema():
    invalid({"inputs": [{**X, "shape": [-1], "data": [1]}]}, r"Expected `int` >= 0 at inputs\[0\].shape\[0\]")


def test_no_inputs_is_refused():
    invalid({"inputs": []}, "Expected `array` of length >= 1 at inputs")


def test_model_name_in_the_body_must_match_the_path():
    invalid({"model_name": "other", "inputs": [{**X, "data": [1, 2, 3, 4]}]}, "'model_name' is 'other'.*path says 'm'")


def test_model_version_in_the_body_must_agree_with_the_path():
    invalid({"model_version": "2", "inputs": [{**X, "data": [1, 2, 3, 4]}]}, "'model_version' is '2'", version="1")


def test_the_body_version_is_used_when_the_path_names_none():
    request, _ = parse({"model_name": "m", "model_version": "7", "inputs": [{**X, "data": [1, 2, 3, 4]}]})
    assert request.model_version == "7"


def test_parameters_keep_their_json_types():
    request, _ = parse(
        {
            "parameters": {"flag": True, "n": -3, "big": 2**63, "ratio": 0.5, "word": "hi"},
            "inputs": [{**X, "data": [1, 2, 3, 4], "parameters": {"scale": 2}}],
        }
    )
    p = request.parameters
    assert p["flag"].bool_param is True
    assert p["n"].int64_param == -3
    assert p["big"].uint64_param == 2**63
    assert p["ratio"].double_param == 0.5
    assert p["word"].string_param == "hi"
    assert request.inputs[0].parameters["scale"].int64_param == 2


def test_a_known_parameter_of_the_wrong_type_is_refused():
    invalid(
        {"parameters": {"binary_data_output": "yes"}, "inputs": [{**X, "data": [1, 2, 3, 4]}]},
        "request parameters: Expected `bool`, got `str` at binary_data_output",
    )


def test_the_output_plan_follows_the_binary_parameters():
    _, plan = parse(
        {
            "parameters": {"binary_data_output": True},
            "inputs": [{**X, "data": [1, 2, 3, 4]}],
            "outputs": [{"name": "a", "parameters": {"binary_data": False}}, {"name": "b"}],
        }
    )
    assert plan.is_binary("a") is False
    assert plan.is_binary("b") is True
    assert plan.is_binary("c") is True


def test_requested_outputs_are_passed_on():
    request, _ = parse({"inputs": [{**X, "data": [1, 2, 3, 4]}], "outputs": [{"name": "y"}, {"name": "z"}]})
    assert [o.name for o in request.outputs] == ["y", "z"]


# --- requests: binary tensor data ------------------------------------------------------------------------------


def test_binary_data_is_taken_in_input_order():
    a, b = struct.pack("<4i", 1, 2, 3, 4), struct.pack("<2d", 0.5, 1.5)
    data, length = binary_body(
        {
            "inputs": [
                {**X, "parameters": {"binary_data_size": len(a)}},
                {"name": "y", "datatype": "FP64", "shape": [2], "parameters": {"binary_data_size": len(b), "k": 1}},
            ]
        },
        a,
        b,
    )
    request, _ = parse_infer_request(data, length, "m", "")
    assert request.raw_input_contents == [a, b]
    assert "binary_data_size" not in request.inputs[1].parameters
    assert request.inputs[1].parameters["k"].int64_param == 1


def test_binary_data_of_the_wrong_size_is_refused():
    data, length = binary_body({"inputs": [{**X, "parameters": {"binary_data_size": 12}}]}, b"\x00" * 12)
    with pytest.raises(InvalidInput, match=r"binary data has 12 bytes, expected 16 for INT32 with shape \[2, 2\]"):
        parse_infer_request(data, length, "m", "")


def test_binary_data_past_the_end_is_refused():
    data, length = binary_body({"inputs": [{**X, "parameters": {"binary_data_size": 16}}]}, b"\x00" * 8)
    with pytest.raises(InvalidInput, match="binary_data_size 16 runs past the end of the binary data"):
        parse_infer_request(data, length, "m", "")


def test_unclaimed_binary_data_is_refused():
    data, length = binary_body({"inputs": [{**X, "parameters": {"binary_data_size": 16}}]}, b"\x00" * 20)
    with pytest.raises(InvalidInput, match="4 bytes of binary data are not claimed by any input"):
        parse_infer_request(data, length, "m", "")


def test_data_and_binary_data_size_together_are_refused():
    data, length = binary_body({"inputs": [{**X, "data": [1, 2, 3, 4], "parameters": {"binary_data_size": 0}}]})
    with pytest.raises(InvalidInput, match="has both 'data' and 'binary_data_size'"):
        parse_infer_request(data, length, "m", "")


def test_malformed_binary_bytes_elements_are_refused():
    header = {"inputs": [{"name": "s", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 6}}]}
    data, length = binary_body(header, b"\x09\x00\x00\x00ab")
    with pytest.raises(InvalidInput, match="element 0 runs past the end"):
        parse_infer_request(data, length, "m", "")


@pytest.mark.parametrize("value", ["-1", "1e3", " 5", "\u0661"])
def test_a_bad_header_length_is_refused(value):
    with pytest.raises(InvalidInput, match=f"{HEADER_LENGTH} must be a non-negative integer"):
        parse_header_length(value, 100)


def test_the_header_length_cannot_exceed_the_body():
    with pytest.raises(InvalidInput, match=f"{HEADER_LENGTH} is 101, but the body has 100 bytes"):
        parse_header_length("101", 100)
    assert parse_header_length("100", 100) == 100
    assert parse_header_length(None, 100) is None


# --- responses -------------------------------------------------------------------------------------------------


def response_with(*outputs, raw=True, request_id="") -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name="m", model_version="1", id=request_id)
    for name, array in outputs:
        dt = DATATYPES[
            "BYTES" if array.dtype == object else next(k for k, d in DATATYPES.items() if d.dtype == array.dtype)
        ]
        tensor = response.outputs.add(name=name, datatype=dt.name, shape=list(array.shape))
        if raw:
            response.raw_output_contents.append(to_raw(array, dt))
        else:
            getattr(tensor.contents, dt.contents_field).extend(array.ravel().tolist())
    return response


def test_a_json_response_carries_the_data_flat():
    response = response_with(("y", np.array([[1.5, 2.5]], dtype="<f4")), request_id="r9")
    data, headers = render_infer_response(response, OutputPlan(False, {}))
    assert headers == {"Content-Type": "application/json"}
    assert orjson.loads(data) == {
        "model_name": "m",
        "model_version": "1",
        "id": "r9",
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [1, 2], "data": [1.5, 2.5]}],
    }


def test_typed_contents_render_like_raw_contents():
    array = np.array([1, -2, 3], dtype="<i8")
    raw, _ = render_infer_response(response_with(("y", array)), OutputPlan(False, {}))
    typed, _ = render_infer_response(response_with(("y", array), raw=False), OutputPlan(False, {}))
    assert raw == typed
    raw_bin, _ = render_infer_response(response_with(("y", array)), OutputPlan(True, {}))
    typed_bin, _ = render_infer_response(response_with(("y", array), raw=False), OutputPlan(True, {}))
    assert raw_bin == typed_bin


def test_binary_outputs_follow_the_json_header():
    a = np.array([1, 2], dtype="<i4")
    b = np.array([0.25], dtype="<f8")
    data, headers = render_infer_response(response_with(("a", a), ("b", b)), OutputPlan(False, {"b": True}))
    length = int(headers[HEADER_LENGTH])
    assert headers["Content-Type"] == "application/octet-stream"
    doc = orjson.loads(data[:length])
    assert doc["outputs"][0]["data"] == [1, 2]
    assert doc["outputs"][1]["parameters"] == {"binary_data_size": 8}
    assert data[length:] == b.tobytes()


def test_bytes_outputs_render_as_strings():
    array = np.array([b"ok", "\u00e9".encode()], dtype=object)
    data, _ = render_infer_response(response_with(("s", array)), OutputPlan(False, {}))
    assert orjson.loads(data)["outputs"][0]["data"] == ["ok", "\u00e9"]


def test_bytes_that_are_not_utf8_are_refused_as_json_not_altered():
    response = response_with(("s", np.array([b"\xff"], dtype=object)))
    with pytest.raises(InvalidInput, match="output 's' holds bytes that are not valid UTF-8"):
        render_infer_response(response, OutputPlan(False, {}))
    data, headers = render_infer_response(response, OutputPlan(False, {"s": True}))
    assert headers[HEADER_LENGTH] == str(len(data) - 5)
    assert data.endswith(b"\x01\x00\x00\x00\xff")


def test_metadata_and_config_json():
    metadata = pb.ModelMetadataResponse(name="m", versions=["1"], platform="p")
    metadata.inputs.add(name="x", datatype="FP32", shape=[-1, 4])
    assert model_metadata_json(metadata) == {
        "name": "m",
        "versions": ["1"],
        "platform": "p",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [],
    }
    config = pb.ModelConfig(name="m", max_batch_size=8)
    config.input.add(name="x", data_type=pb.TYPE_FP32, dims=[4])
    config.dynamic_batching.preferred_batch_size.extend([4, 8])
    doc = model_config_json(config)
    assert doc["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": [4]}]
    assert doc["dynamic_batching"] == {"preferred_batch_size": [4, 8], "max_queue_delay_microseconds": 0}
    assert "dynamic_batching" not in model_config_json(pb.ModelConfig(name="m"))


# --- round trips -----------------------------------------------------------------------------------------------

ROUND_TRIP_TYPES = ["BOOL", "UINT8", "INT16", "INT32", "INT64", "UINT64", "FP32", "FP64"]
shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=4)


def arrays(name):
    dtype = DATATYPES[name].dtype
    return hnp.arrays(
        dtype, shapes, elements={"allow_nan": False, "allow_infinity": False} if dtype.kind == "f" else None
    )


@given(st.sampled_from(ROUND_TRIP_TYPES).flatmap(arrays), st.booleans())
def test_a_client_request_parses_to_the_same_raw_bytes(array, binary):
    """What ``inferencehub infer`` sends (JSON or binary) arrives upstream as exactly the array's raw bytes."""
    _, data, headers = HttpTransport("http://unused").prepare("m", {"x": array}, binary=binary)
    length = parse_header_length(headers.get(HEADER_LENGTH), len(data))
    request, plan = parse_infer_request(data, length, "m", "")
    dt = DATATYPES[request.inputs[0].datatype]
    assert list(request.inputs[0].shape) == list(array.shape)
    np.testing.assert_array_equal(from_raw(request.raw_input_contents[0], dt, list(array.shape), "x"), array)
    assert plan.binary_default is binary


@given(st.lists(st.text(max_size=6), min_size=1, max_size=6), st.booleans())
def test_bytes_requests_round_trip(strings, binary):
    array = np.array([s.encode() for s in strings], dtype=object)
    _, data, headers = HttpTransport("http://unused").prepare("m", {"s": array}, binary=binary)
    request, _ = parse_infer_request(data, parse_header_length(headers.get(HEADER_LENGTH), len(data)), "m", "")
    assert list(from_raw(request.raw_input_contents[0], DATATYPES["BYTES"], [len(strings)], "s")) == list(array)


@given(st.sampled_from(ROUND_TRIP_TYPES).flatmap(arrays), st.booleans())
def test_a_response_renders_to_what_the_client_decodes(array, binary):
    data, headers = render_infer_response(response_with(("y", array)), OutputPlan(binary, {}))
    decoded = _decode_http(data, headers.get(HEADER_LENGTH))
    assert decoded["y"].shape == array.shape
    np.testing.assert_array_equal(decoded["y"], array)
