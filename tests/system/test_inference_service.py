"""The inference service against stock tritonclient.grpc, on a real replica.

Raw requests use tritonclient's own generated stubs: the contract is the wire format,
so a stock client's messages must work unchanged. (This process must not import
``inferencehub.protocol``: tritonclient registers the same ``inference.*`` protobuf
symbols, and one process cannot hold both.)
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from conftest import ALL_DATATYPES, ROOT, TYPED_FIELDS, held_out_iris, sample


@pytest.fixture(scope="module")
def client(replica):
    with triton.InferenceServerClient(replica.target) as c:
        yield c


@pytest.fixture(scope="module")
def stub(replica):
    with grpc.insecure_channel(replica.target) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def infer(client, model, arrays: dict[str, np.ndarray], outputs=None, **kwargs):
    inputs = []
    for name, array in arrays.items():
        tensor = triton.InferInput(name, list(array.shape), triton.np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    requested = [triton.InferRequestedOutput(o) for o in outputs] if outputs else None
    return client.infer(model, inputs, outputs=requested, **kwargs)


def test_server_live_ready_and_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    metadata = client.get_server_metadata(as_json=True)
    assert metadata["name"] == "inferencehub"
    for model in ("iris", "mock", "mock-heavy"):
        assert client.is_model_ready(model)
    assert client.is_model_ready("iris", "1")


def test_model_config_says_a_model_is_decoupled_and_which_inputs_are_optional(client):
    """Triton's clients (perf_analyzer, the gateway) learn from the config that a model streams."""
    config = client.get_model_config("mock-llm").config
    assert config.model_transaction_policy.decoupled
    assert [(i.name, i.optional) for i in config.input] == [("text_input", False), ("max_tokens", True), ("stop", True)]
    assert not client.get_model_config("iris").config.model_transaction_policy.decoupled


def test_model_metadata(client):
    metadata = client.get_model_metadata("iris", as_json=True)
    assert metadata["name"] == "iris"
    assert metadata["versions"] == ["1"]
    assert metadata["platform"] == "numpy_mlp"
    assert metadata["inputs"] == [{"name": "features", "datatype": "FP32", "shape": ["-1", "4"]}]
    assert [o["name"] for o in metadata["outputs"]] == ["probabilities", "label"]


def test_iris_known_samples_and_held_out_accuracy(client):
    # Textbook samples of each species.
    x = np.array([[5.1, 3.5, 1.4, 0.2], [6.4, 3.2, 4.5, 1.5], [6.3, 3.3, 6.0, 2.5]], dtype=np.float32)
    result = infer(client, "iris", {"features": x})
    assert result.as_numpy("label").tolist() == [0, 1, 2]
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (3, 3) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)

    x, y = held_out_iris()
    labels = infer(client, "iris", {"features": x}).as_numpy("label")
    accuracy = float((labels == y).mean())
    assert accuracy >= 28 / 30  # the held-out accuracy stated in the docs
    assert "93.3%" in (ROOT / "docs" / "models.md").read_text()


def test_outputs_selects_outputs(client):
    x = np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32)
    result = infer(client, "iris", {"features": x}, outputs=["label"])
    response = result.get_response()
    assert [o.name for o in response.outputs] == ["label"]
    assert result.as_numpy("probabilities") is None


def test_response_carries_model_version_request_id_and_replica(stub):
    request = pb.ModelInferRequest(model_name="mock", id="req-42")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 2]).contents.fp32_contents.extend([1.5, -2.0])
    response, call = stub.ModelInfer.with_call(request, metadata=[("x-request-id", "trace-7")], timeout=10)
    assert (response.model_name, response.model_version, response.id) == ("mock", "1", "req-42")
    assert ("x-inferencehub-replica", "replica-under-test") in call.trailing_metadata()
    # A typed request gets typed contents back, readable as plain numbers (grpcurl).
    assert list(response.outputs[0].contents.fp32_contents) == [1.5, -2.0]
    assert list(response.outputs[0].shape) == [1, 2]


def test_mock_echoes_every_datatype_raw(client):
    arrays = {f"in_{t.lower()}": sample(t) for t in ALL_DATATYPES}
    result = infer(client, "echo-all", arrays)
    for t in ALL_DATATYPES:
        out = result.as_numpy(f"out_{t.lower()}")
        expected = arrays[f"in_{t.lower()}"]
        assert out.shape == expected.shape, t
        assert out.tolist() == expected.tolist(), t
        if t != "BYTES":
            assert out.dtype == expected.dtype, t


def typed_request(arrays: dict[str, np.ndarray], model: str = "echo-all") -> pb.ModelInferRequest:
    from inferencehub.tensors import DATATYPES, datatype_of, to_values

    request = pb.ModelInferRequest(model_name=model)
    for name, array in arrays.items():
        dt = DATATYPES[datatype_of(array)]
        tensor = request.inputs.add(name=name, datatype=dt.name, shape=array.shape)
        getattr(tensor.contents, dt.contents_field).extend(to_values(array, dt))
    return request


def test_mock_echoes_every_typed_datatype(stub):
    # Every datatype that has a typed field, in typed contents (as grpcurl users send): echoed exactly, typed.
    typed = [t for t in ALL_DATATYPES if t != "FP16"]
    arrays = {f"in_{t.lower()}": sample(t) for t in typed}
    request = typed_request(arrays, model="echo-typed")
    response = stub.ModelInfer(request, timeout=10)
    assert not response.raw_output_contents  # typed in, typed out
    by_name = {o.name: o for o in response.outputs}
    for t in typed:
        out, expected = by_name[f"out_{t.lower()}"], arrays[f"in_{t.lower()}"]
        assert out.datatype == t and list(out.shape) == list(expected.shape), t
        field = TYPED_FIELDS[t]
        values = list(getattr(out.contents, field))
        if t == "BYTES":
            assert values == list(expected), t
        else:
            assert np.array_equal(np.array(values, dtype=expected.dtype), expected), t
        assert [f.name for f, _ in out.contents.ListFields()] == [field], t


def test_fp16_has_no_typed_field_and_says_so(stub):
    # FP16 has no typed field: every input must then be raw, so echo-all takes FP16 raw in another test.
    arrays = {f"in_{t.lower()}": sample(t) for t in ALL_DATATYPES if t != "FP16"}
    request = typed_request(arrays)
    request.inputs.add(name="in_fp16", datatype="FP16", shape=[1])
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "in_fp16" in err.value.details() and "raw_input_contents" in err.value.details()


def test_typed_contents_round_trip(stub):
    # Through the iris model: typed FP32 in, typed FP32 and INT64 out.
    request = pb.ModelInferRequest(model_name="iris")
    request.inputs.add(name="features", datatype="FP32", shape=[1, 4]).contents.fp32_contents.extend(
        [6.3, 3.3, 6.0, 2.5]
    )
    response = stub.ModelInfer(request, timeout=10)
    by_name = {o.name: o for o in response.outputs}
    assert list(by_name["label"].contents.int64_contents) == [2]
    assert len(by_name["probabilities"].contents.fp32_contents) == 3
    assert not response.raw_output_contents


def test_custom_python_model(client):
    texts = np.array([b"hello big world", b"", b"one"], dtype=object)
    result = infer(client, "word-count", {"text": texts})
    assert result.as_numpy("words").tolist() == [3, 0, 1]
    assert result.as_numpy("upper").tolist() == [b"HELLO BIG WORLD", b"", b"ONE"]


def raw_request(model: str, name: str, datatype: str, shape: list[int], raw: bytes) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    request.raw_input_contents.append(raw)
    return request


FOUR = np.zeros((1, 4), np.float32).tobytes()

BAD_REQUESTS = [
    pytest.param(
        raw_request("nope", "features", "FP32", [1, 4], FOUR), grpc.StatusCode.NOT_FOUND, ["nope"], id="unknown-model"
    ),
    pytest.param(
        pb.ModelInferRequest(model_name="iris", model_version="9"),
        grpc.StatusCode.NOT_FOUND,
        ["iris", "version", "9"],
        id="unknown-version",
    ),
    pytest.param(
        raw_request("iris", "features", "FP64", [1, 4], bytes(32)),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["features", "FP64", "FP32"],
        id="wrong-datatype",
    ),
    pytest.param(
        raw_request("iris", "features", "FP32", [1, 5], bytes(20)),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["features", "[1, 5]", "[-1, 4]"],
        id="wrong-shape",
    ),
    pytest.param(
        raw_request("iris", "features", "FP32", [4], bytes(16)),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["features", "[4]"],
        id="wrong-rank",
    ),
    pytest.param(
        raw_request("iris", "features", "FP32", [-1, 4], FOUR),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["features", "[-1, 4]"],
        id="negative-dim",
    ),
    pytest.param(
        raw_request("iris", "features", "FP32", [2, 4], FOUR),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["features", "16 bytes", "expected 32"],
        id="wrong-element-count-raw",
    ),
    pytest.param(
        raw_request("iris", "petals", "FP32", [1, 4], FOUR),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["petals", "features"],
        id="unknown-input",
    ),
    pytest.param(
        pb.ModelInferRequest(model_name="iris"),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["missing input 'features'", "FP32 [-1, 4]"],
        id="missing-input",
    ),
    pytest.param(
        raw_request("iris", "features", "FP17", [1, 4], FOUR),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["features", "FP17"],
        id="unknown-datatype",
    ),
]


@pytest.mark.parametrize(("request_", "code", "words"), BAD_REQUESTS)
def test_bad_input_gets_code_and_message(stub, request_, code, words):
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request_, timeout=10)
    assert err.value.code() == code
    for word in words:
        assert word in err.value.details()


def test_more_bad_inputs(stub):
    def code_and_details(request):
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request, timeout=10)
        return err.value.code(), err.value.details()

    typed = pb.ModelInferRequest(model_name="iris")
    typed.inputs.add(name="features", datatype="FP32", shape=[2, 4]).contents.fp32_contents.extend([1.0] * 5)
    code, details = code_and_details(typed)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "5 elements, expected 8" in details

    wrong_field = pb.ModelInferRequest(model_name="iris")
    wrong_field.inputs.add(name="features", datatype="FP32", shape=[1, 4]).contents.fp64_contents.extend([1.0] * 4)
    code, details = code_and_details(wrong_field)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "fp32_contents" in details and "fp64_contents" in details

    both = raw_request("iris", "features", "FP32", [1, 4], FOUR)
    both.inputs[0].contents.fp32_contents.extend([1.0] * 4)
    code, details = code_and_details(both)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "both" in details

    unknown_output = raw_request("iris", "features", "FP32", [1, 4], FOUR)
    unknown_output.outputs.add(name="logits")
    code, details = code_and_details(unknown_output)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "logits" in details and "probabilities" in details

    duplicated = raw_request("iris", "features", "FP32", [1, 4], FOUR)
    duplicated.inputs.add(name="features", datatype="FP32", shape=[1, 4])
    duplicated.raw_input_contents.append(FOUR)
    code, details = code_and_details(duplicated)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "more than once" in details

    overflow = pb.ModelInferRequest(model_name="echo-all")
    overflow.inputs.add(name="in_int8", datatype="INT8", shape=[1]).contents.int_contents.append(300)
    code, details = code_and_details(overflow)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "in_int8" in details and "INT8" in details

    bad_bytes = raw_request("word-count", "text", "BYTES", [2], b"\x05\x00\x00\x00abc")
    code, details = code_and_details(bad_bytes)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "text" in details


def test_oversized_message_is_resource_exhausted(stub, client):
    big = raw_request("mock", "input", "FP32", [1, 1_200_000], bytes(4_800_000))  # over the 4 MiB limit
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(big, timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in err.value.details()
    # Nothing else is disturbed.
    assert client.is_server_ready()
    x = np.ones((1, 3), np.float32)
    assert infer(client, "mock", {"input": x}).as_numpy("output").tolist() == x.tolist()


def test_tritonclient_reports_errors(client):
    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata("nope")
    assert "nope" in str(err.value)
    with pytest.raises(InferenceServerException):
        infer(client, "iris", {"features": np.zeros((1, 3), np.float32)})
