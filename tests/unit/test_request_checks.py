"""A request checked against the model's tensor specs (``oip/signature.py``): one check, reached three ways: the
replica's (a signature from the model's config, through the servicer's ``decode_inputs``), the gateway's before it
queues a job (a signature from the model's ``ModelMetadata`` answer) and the client's (``client.to_inputs``, from
the metadata JSON). All three refuse the same requests with the same words."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from inferencehub.client import synthetic_inputs, to_inputs
from inferencehub.errors import InvalidInput, ModelError
from inferencehub.inference.engine import Engine, ServedModel
from inferencehub.inference.servicer import model_config
from inferencehub.model import Batching, ModelConfig, TensorSpec
from inferencehub.oip.codec import decode_inputs, encode_outputs
from inferencehub.oip.signature import Signature, shape_matches
from inferencehub.protocol.inference import grpc_predict_v2_pb2 as pb
from inferencehub.tensors import DATATYPES

INPUTS = (TensorSpec("x", "FP32", (-1, 4)), TensorSpec("ids", "INT64", (-1,)))
OUTPUTS = (TensorSpec("y", "FP32", (-1, 3)), TensorSpec("label", "BYTES", (-1,)))
CONFIG = ModelConfig("iris", "1", "mock", "mock", INPUTS, OUTPUTS)


def metadata(config: ModelConfig = CONFIG) -> pb.ModelMetadataResponse:
    message = pb.ModelMetadataResponse(name=config.name, versions=[config.version], platform=config.platform)
    for spec in config.inputs:
        message.inputs.add(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))
    for spec in config.outputs:
        message.outputs.add(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))
    return message


def request(*inputs: tuple[str, str, list[int]], outputs: tuple[str, ...] = ()) -> pb.ModelInferRequest:
    """Inputs with raw contents of the right size for their datatype and shape (zeros)."""
    message = pb.ModelInferRequest(model_name="iris")
    for name, datatype, shape in inputs:
        message.inputs.add(name=name, datatype=datatype, shape=shape)
        message.raw_input_contents.append(b"\x00" * int(np.prod(shape)) * DATATYPES[datatype].dtype.itemsize)
    for name in outputs:
        message.outputs.add(name=name)
    return message


def replica_check(message: pb.ModelInferRequest, config: ModelConfig = CONFIG) -> None:
    decode_inputs(message, ServedModel(config).signature)


def check_request(message: pb.ModelInferRequest, metadata: pb.ModelMetadataResponse, max_batch_size: int = 0):
    """The gateway's check before queueing a job: a signature from the model's metadata and batch limit."""
    Signature.of_metadata(metadata, max_batch_size).check(message)


GOOD = (("x", "FP32", [2, 4]), ("ids", "INT64", [2]))
BAD = {
    "unknown input": (
        request(*GOOD, ("z", "FP32", [1])),
        "model 'iris' has no input 'z' (its inputs: x, ids)",
    ),
    "datatype": (request(("x", "FP64", [2, 4]), GOOD[1]), "input 'x': datatype FP64, expected FP32"),
    "rank": (request(("x", "FP32", [8]), GOOD[1]), "input 'x': shape [8], expected [-1, 4] (-1: any size)"),
    "dimension": (request(("x", "FP32", [2, 5]), GOOD[1]), "input 'x': shape [2, 5], expected [-1, 4] (-1: any size)"),
    "missing": (request(GOOD[0]), "model 'iris': missing input 'ids' (INT64 [-1])"),
    "duplicate": (request(*GOOD, GOOD[1]), "input 'ids' is given more than once"),
    "unknown output": (request(*GOOD, outputs=("y", "p")), "model 'iris' has no output 'p' (its outputs: y, label)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_the_replica_refuses_a_request_that_does_not_fit_the_specs(case):
    message, expected = BAD[case]
    with pytest.raises(InvalidInput) as caught:
        replica_check(message)
    assert str(caught.value) == expected


@pytest.mark.parametrize("case", list(BAD))
def test_the_job_queue_refuses_it_in_the_replicas_words(case):
    message, expected = BAD[case]
    with pytest.raises(InvalidInput) as caught:
        check_request(message, metadata())
    assert str(caught.value) == expected


@pytest.mark.parametrize(
    "message",
    [request(*GOOD), request(*reversed(GOOD)), request(("x", "FP32", [0, 4]), ("ids", "INT64", [7]), outputs=("y",))],
)
def test_both_accept_a_request_that_fits(message):
    replica_check(message)
    check_request(message, metadata())


def test_the_job_queue_checks_the_batch_limit():
    message = request(("x", "FP32", [9, 4]), ("ids", "INT64", [9]))
    check_request(message, metadata(), max_batch_size=9)
    check_request(message, metadata(), max_batch_size=0)  # no batching: no limit
    with pytest.raises(InvalidInput, match=r"a request of 9 rows is over its max_batch_size \(8\); split it"):
        check_request(message, metadata(), max_batch_size=8)


@pytest.mark.parametrize(
    ("shape", "spec", "fits"),
    [
        ((2, 4), (-1, 4), True),
        ((0, 4), (-1, 4), True),
        ((2, 4), (2, 4), True),
        ((), (), True),
        ((0, 4), (2, 4), False),
        ((2, 5), (-1, 4), False),
        ((8,), (-1, 4), False),
        ((2, 4, 1), (-1, 4), False),
        ((), (-1,), False),
    ],
)
def test_shape_matches(shape, spec, fits):
    assert shape_matches(shape, TensorSpec("t", "FP32", spec)) is fits


specs = st.lists(st.sampled_from([-1, 1, 2, 3]), min_size=0, max_size=4)
shapes = st.lists(st.integers(0, 3), min_size=0, max_size=4)


@given(spec=specs, shape=shapes)
def test_the_two_shape_checks_agree(spec, shape):
    expected = len(shape) == len(spec) and all(d in (-1, s) for s, d in zip(shape, spec, strict=False))
    assert shape_matches(tuple(shape), TensorSpec("t", "INT8", tuple(spec))) is expected
    config = ModelConfig("m", "1", "mock", "mock", (TensorSpec("t", "INT8", tuple(spec)),), OUTPUTS)
    message = request(("t", "INT8", shape))
    try:
        check_request(message, metadata(config))
        queue_ok = True
    except InvalidInput:
        queue_ok = False
    try:
        replica_check(message, config)
        replica_ok = True
    except InvalidInput:
        replica_ok = False
    assert queue_ok is replica_ok is expected


# --- the replica's decoding ------------------------------------------------------------------------------------


def test_raw_contents_must_match_the_inputs():
    message = request(*GOOD)
    message.raw_input_contents.pop()
    with pytest.raises(InvalidInput, match="raw_input_contents has 1 entries for 2 inputs"):
        decode_inputs(message, ServedModel(CONFIG).signature)


def test_typed_contents_are_decoded_and_checked():
    message = pb.ModelInferRequest(model_name="iris")
    message.inputs.add(name="x", datatype="FP32", shape=[1, 4]).contents.fp32_contents.extend([1, 2, 3, 4])
    message.inputs.add(name="ids", datatype="INT64", shape=[1]).contents.int64_contents.append(5)
    arrays, _ = decode_inputs(message, ServedModel(CONFIG).signature)
    assert arrays["x"].dtype == np.float32 and arrays["x"].tolist() == [[1, 2, 3, 4]]
    message.inputs[1].contents.ClearField("int64_contents")
    message.inputs[1].contents.int_contents.append(5)
    with pytest.raises(InvalidInput, match=r"datatype INT64 takes contents\.int64_contents, got int_contents"):
        decode_inputs(message, ServedModel(CONFIG).signature)


def test_fp16_needs_raw_contents():
    config = ModelConfig("h", "1", "mock", "mock", (TensorSpec("x", "FP16", (2,)),), OUTPUTS)
    message = pb.ModelInferRequest(model_name="h")
    message.inputs.add(name="x", datatype="FP16", shape=[2])
    with pytest.raises(InvalidInput, match="FP16 data must be sent in raw_input_contents"):
        decode_inputs(message, ServedModel(config).signature)


def test_output_specs_follow_the_request_order_or_are_all():
    signature = ServedModel(CONFIG).signature
    assert [s.name for s in signature.output_specs([])] == ["y", "label"]
    assert [s.name for s in signature.output_specs(["label", "y"])] == ["label", "y"]
    assert [s.name for s in decode_inputs(request(*GOOD, outputs=("label",)), signature)[1]] == ["label"]


# --- the model's outputs, checked by the engine ----------------------------------------------------------------


def checked(value, spec: TensorSpec):
    return Engine._checked_output(CONFIG, {spec.name: value}, spec)


def test_an_output_the_model_did_not_return_is_a_model_error():
    with pytest.raises(ModelError, match="model 'iris' did not return output 'y'"):
        Engine._checked_output(CONFIG, {"other": np.zeros(1)}, OUTPUTS[0])
    with pytest.raises(ModelError, match="did not return output 'y'"):
        Engine._checked_output(CONFIG, [np.zeros((1, 3))], OUTPUTS[0])


def test_outputs_are_cast_within_their_kind_only():
    out = checked(np.zeros((2, 3), dtype=np.float64), OUTPUTS[0])
    assert out.dtype == np.float32
    with pytest.raises(ModelError, match="returned complex128 for FP32 output 'y'"):
        checked(np.zeros((2, 3), dtype=np.complex128), OUTPUTS[0])


def test_an_output_of_the_wrong_shape_is_a_model_error():
    with pytest.raises(ModelError, match=r"returned shape \[2, 4\] for output 'y', expected \[-1, 3\]"):
        checked(np.zeros((2, 4), dtype=np.float32), OUTPUTS[0])


def test_bytes_outputs_must_be_strings_or_objects():
    assert checked(np.array(["a", "b"]), OUTPUTS[1]).dtype == object
    with pytest.raises(ModelError, match="returned int64 for BYTES output 'label'"):
        checked(np.array([1, 2]), OUTPUTS[1])


def test_encode_outputs_raw_or_typed():
    arrays = [np.ones((1, 3), dtype=np.float32), np.array([b"a"], dtype=object)]
    typed = pb.ModelInferResponse()
    encode_outputs(typed, OUTPUTS, arrays, raw=False)
    assert list(typed.outputs[0].contents.fp32_contents) == [1.0, 1.0, 1.0]
    assert list(typed.outputs[1].contents.bytes_contents) == [b"a"]
    assert not typed.raw_output_contents
    raw = pb.ModelInferResponse()
    encode_outputs(raw, OUTPUTS, arrays, raw=True)
    assert raw.raw_output_contents[0] == arrays[0].tobytes()
    assert raw.raw_output_contents[1] == b"\x01\x00\x00\x00a"


def test_model_config_leaves_out_the_batch_dimension():
    batching = ModelConfig("b", "1", "mock", "mock", INPUTS, OUTPUTS, batching=Batching(8, 2.5, (4, 8)))
    message = model_config(batching)
    assert message.max_batch_size == 8
    assert list(message.input[0].dims) == [4]
    assert message.input[1].data_type == pb.TYPE_INT64
    assert message.output[1].data_type == pb.TYPE_STRING
    assert message.dynamic_batching.max_queue_delay_microseconds == 2500
    assert list(model_config(CONFIG).input[0].dims) == [-1, 4]


# --- the client's ----------------------------------------------------------------------------------------------

CLIENT_METADATA = {
    "name": "iris",
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}, {"name": "s", "datatype": "BYTES", "shape": [-1]}],
}


def test_the_client_converts_values_to_the_models_datatypes():
    arrays = to_inputs(CLIENT_METADATA, {"x": [[1, 2, 3, 4]], "s": ["a", b"b"]})
    assert arrays["x"].dtype == np.float32
    assert arrays["s"].tolist() == [b"a", b"b"]


def test_the_client_names_an_unknown_or_missing_input():
    with pytest.raises(InvalidInput, match="model 'iris' has no input 'q' \\(its inputs: x, s\\)"):
        to_inputs(CLIENT_METADATA, {"x": [[1, 2, 3, 4]], "s": ["a"], "q": [1]})
    with pytest.raises(InvalidInput, match=r"^model 'iris': missing input 's' \(BYTES \[-1\]\)$"):
        to_inputs(CLIENT_METADATA, {"x": [[1, 2, 3, 4]]})


def test_synthetic_inputs_fit_the_specs():
    arrays = synthetic_inputs(CLIENT_METADATA, batch=3, size=5)
    assert arrays["x"].shape == (3, 4) and arrays["x"].dtype == np.float32
    assert arrays["s"].shape == (3,) and arrays["s"].dtype == object
    message = pb.ModelInferRequest(model_name="iris")
    for name, array in arrays.items():
        message.inputs.add(name=name, datatype=DATATYPES["BYTES" if array.dtype == object else "FP32"].name)
        message.inputs[-1].shape.extend(array.shape)
    client_metadata = ModelConfig(
        "iris", "1", "mock", "mock", (TensorSpec("x", "FP32", (-1, 4)), TensorSpec("s", "BYTES", (-1,))), OUTPUTS
    )
    check_request(message, metadata(client_metadata))


CONFIG_JSON = {
    "name": "iris",
    "inputs": [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in INPUTS],
    "outputs": [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in OUTPUTS],
}
CLIENT_BAD = {  # the client converts values to the model's datatypes and gives each input once: the rest apply
    "unknown input": {"x": np.zeros((2, 4)), "ids": [1, 2], "z": [1.0]},
    "rank": {"x": np.zeros(8), "ids": [1, 2]},
    "dimension": {"x": np.zeros((2, 5)), "ids": [1, 2]},
    "missing": {"x": np.zeros((2, 4))},
}


@pytest.mark.parametrize("case", list(CLIENT_BAD))
def test_the_client_refuses_it_in_the_replicas_words(case):
    with pytest.raises(InvalidInput) as caught:
        to_inputs(CONFIG_JSON, CLIENT_BAD[case])
    assert str(caught.value) == BAD[case][1]
    message = request(*[(n, dict(GOOD_TYPES)[n], list(np.shape(v))) for n, v in CLIENT_BAD[case].items()])
    with pytest.raises(InvalidInput) as server:
        replica_check(message)
    assert str(server.value) == str(caught.value)


GOOD_TYPES = (("x", "FP32"), ("ids", "INT64"), ("z", "FP32"))


def test_the_client_accepts_what_the_replica_accepts():
    arrays = to_inputs(CONFIG_JSON, {"ids": [1, 2, 3], "x": np.zeros((3, 4))})
    assert arrays["x"].dtype == np.float32 and arrays["ids"].dtype == np.int64
    replica_check(request(*[(n, dict(GOOD_TYPES)[n], list(a.shape)) for n, a in arrays.items()]))
