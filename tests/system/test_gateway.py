"""The gateway against stock tritonclient.http and plain JSON as a user types it, with a real replica behind it."""

from __future__ import annotations

import json
import struct
import time

import numpy as np
import pytest
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from conftest import (
    ALL_DATATYPES,
    IRIS_ROW,
    SHIPPED,
    TEST_MODELS,
    Gateway,
    Replica,
    held_out_iris,
    model_repository,
    sample,
    wait_for,
)


@pytest.fixture(scope="module")
def client(gateway):
    c = triton_http.InferenceServerClient(gateway.url)
    yield c
    c.close()


def http_infer(client, model, arrays, outputs=None, binary_in=True, binary_out=True, **kwargs):
    inputs = []
    for name, array in arrays.items():
        tensor = triton_http.InferInput(name, list(array.shape), triton_http.np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array, binary_data=binary_in)
        inputs.append(tensor)
    requested = [triton_http.InferRequestedOutput(o, binary_data=binary_out) for o in outputs] if outputs else None
    return client.infer(model, inputs, outputs=requested, **kwargs)


def test_health_and_metadata_through_tritonclient(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("iris")
    assert client.is_model_ready("iris", "1")
    assert not client.is_model_ready("nope")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    metadata = client.get_model_metadata("iris")
    assert metadata["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 4]}]
    assert client.get_model_metadata("iris", "1")["versions"] == ["1"]


@pytest.mark.parametrize(("binary_in", "binary_out"), [(True, True), (False, False), (True, False), (False, True)])
def test_iris_through_tritonclient(client, binary_in, binary_out):
    x, y = held_out_iris()
    result = http_infer(
        client, "iris", {"features": x}, outputs=["probabilities", "label"], binary_in=binary_in, binary_out=binary_out
    )
    labels = result.as_numpy("label")
    assert labels.dtype == np.int64
    assert float((labels == y).mean()) >= 28 / 30
    np.testing.assert_allclose(result.as_numpy("probabilities").sum(axis=1), 1.0, rtol=1e-5)


def test_default_outputs_come_back_binary(client):
    # With no outputs listed, tritonclient asks for binary_data_output on the request.
    x = np.array([[5.1, 3.5, 1.4, 0.2]], np.float32)
    result = http_infer(client, "iris", {"features": x})
    assert result.as_numpy("label").tolist() == [0]
    assert result.get_output("label")["parameters"]["binary_data_size"] == 8


@pytest.mark.parametrize("binary", [True, False])
def test_mock_echo_every_datatype_through_tritonclient(client, binary):
    arrays = {f"in_{t.lower()}": sample(t) for t in ALL_DATATYPES}
    if not binary:  # JSON carries BYTES as UTF-8 strings
        arrays["in_bytes"] = np.array([b"a", b"", "h\u00e9llo".encode(), b"z" * 300, b"end"], dtype=object)
    result = http_infer(
        client,
        "echo-all",
        arrays,
        outputs=[f"out_{t.lower()}" for t in ALL_DATATYPES],
        binary_in=binary,
        binary_out=binary,
    )
    for t in ALL_DATATYPES:
        expected = arrays[f"in_{t.lower()}"].tolist()
        if t == "BYTES" and not binary:  # tritonclient gives JSON BYTES back as str
            expected = [v.decode() for v in expected]
        assert result.as_numpy(f"out_{t.lower()}").tolist() == expected, t


def test_mock_large_tensor_binary(client):
    x = np.random.default_rng(0).random((4, 250_000), dtype=np.float32)  # 4 MB; raw bytes on the gRPC side
    result = http_infer(client, "mock", {"input": x}, outputs=["output"])
    np.testing.assert_array_equal(result.as_numpy("output"), x)


def test_plain_json_as_typed_with_curl(gateway):
    response = gateway.request(
        "POST",
        "/v2/models/iris/infer",
        {
            "id": "my-request",
            "inputs": [
                {
                    "name": "features",
                    "shape": [2, 4],
                    "datatype": "FP32",
                    "data": [[5.1, 3.5, 1.4, 0.2], [6.3, 3.3, 6.0, 2.5]],
                }
            ],
        },
    )
    assert response.status == 200, response
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["id"] == "my-request" and body["model_name"] == "iris" and body["model_version"] == "1"
    outputs = {o["name"]: o for o in body["outputs"]}
    assert outputs["label"] == {"name": "label", "datatype": "INT64", "shape": [2], "data": [0, 2]}
    assert outputs["probabilities"]["shape"] == [2, 3] and len(outputs["probabilities"]["data"]) == 6

    flat = gateway.request(
        "POST",
        "/v2/models/iris/versions/1/infer",
        {
            "inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [6.3, 3.3, 6.0, 2.5]}],
            "outputs": [{"name": "label"}],
        },
    )
    assert flat.status == 200, flat
    assert flat.json()["outputs"] == [{"name": "label", "datatype": "INT64", "shape": [1], "data": [2]}]

    text = gateway.request(
        "POST",
        "/v2/models/word-count/infer",
        {
            "inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["hello big world", "héllo"]}],
        },
    )
    assert text.status == 200, text
    outputs = {o["name"]: o["data"] for o in text.json()["outputs"]}
    assert outputs == {"words": [3, 1], "upper": ["HELLO BIG WORLD", "HéLLO"]}


def test_json_every_datatype(gateway):
    values = {
        "BOOL": [True, False],
        "UINT8": [0, 255],
        "UINT16": [0, 65535],
        "UINT32": [0, 4294967295],
        "UINT64": [0, 18446744073709551615],
        "INT8": [-128, 127],
        "INT16": [-32768, 32767],
        "INT32": [-(2**31), 2**31 - 1],
        "INT64": [-(2**63), 2**63 - 1],
        "FP16": [0.5, -2.0],
        "FP32": [1.5, -0.25],
        "FP64": [1e300, -1e-300],
        "BYTES": ["a", ""],
    }
    body = {"inputs": [{"name": f"in_{t.lower()}", "shape": [2], "datatype": t, "data": v} for t, v in values.items()]}
    response = gateway.request("POST", "/v2/models/echo-all/infer", body)
    assert response.status == 200, response
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    for t, v in values.items():
        assert outputs[f"out_{t.lower()}"]["data"] == v, t
        assert outputs[f"out_{t.lower()}"]["datatype"] == t


def binary_body(header: dict, *blobs: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + b"".join(blobs), {"Inference-Header-Content-Length": str(len(head))}


BAD_BODIES = [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "Expected `object`, got `array`"),
    ({"inputs": []}, "Expected `array` of length >= 1 at inputs"),
    ({"inputs": [IRIS_ROW], "extra": 1}, "unknown field `extra`"),
    ({"inputs": [{**IRIS_ROW, "datatype": "FP17"}]}, "at inputs[0].datatype (input 'features')"),
    ({"inputs": [{**IRIS_ROW, "shape": [1, 5]}]}, "has 4 elements, expected 5"),
    ({"inputs": [{**IRIS_ROW, "shape": [1, -4]}]}, "Expected `int` >= 0 at inputs[0].shape[1]"),
    ({"inputs": [{**IRIS_ROW, "shape": "1x4"}]}, "Expected `array`, got `str` at inputs[0].shape"),
    ({"inputs": [{**IRIS_ROW, "data": ["a", "b", "c", "d"]}]}, "must be numbers"),
    ({"inputs": [{**IRIS_ROW, "data": [[1, 2], [3]]}]}, "rectangular"),
    ({"inputs": [{**IRIS_ROW, "data": [[1, 2], [3, 4]], "shape": [1, 4]}]}, "nested data has shape [2, 2]"),
    ({"inputs": [{"name": "features", "shape": [1], "datatype": "INT8", "data": [300]}]}, "do not fit INT8"),
    ({"inputs": [{"name": "features", "shape": [1], "datatype": "INT32", "data": [1.5]}]}, "must be integers"),
    ({"inputs": [{"name": "features", "shape": [1], "datatype": "BOOL", "data": [1]}]}, "true/false"),
    ({"inputs": [{"name": "t", "shape": [1], "datatype": "BYTES", "data": [1]}]}, "must be strings"),
    ({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32"}]}, "needs 'data'"),
    ({"inputs": [IRIS_ROW], "outputs": [{"nom": "label"}]}, "outputs[0]"),
    ({"inputs": [IRIS_ROW], "parameters": {"binary_data_output": "yes"}}, "binary_data_output"),
]


@pytest.mark.parametrize(("body", "words"), BAD_BODIES, ids=[w for _, w in BAD_BODIES])
def test_malformed_bodies_get_400_naming_the_problem(gateway, body, words):
    response = gateway.request("POST", "/v2/models/iris/infer", body)
    assert response.status == 400, response
    assert set(response.json()) == {"error"}
    assert words in response.json()["error"]


def test_binary_extension_errors(gateway):
    def post(body, headers):
        return gateway.request("POST", "/v2/models/iris/infer", body, headers)

    header = {
        "inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": 16}}]
    }
    ok = post(*binary_body(header, np.ones(4, np.float32).tobytes()))
    assert ok.status == 200, ok

    short = post(*binary_body(header, bytes(12)))
    assert short.status == 400 and "runs past the end" in short.json()["error"]
    extra = post(*binary_body(header, bytes(20)))
    assert extra.status == 400 and "not claimed" in extra.json()["error"]
    header["inputs"][0]["parameters"]["binary_data_size"] = 12
    wrong = post(*binary_body(header, bytes(12)))
    assert wrong.status == 400 and "12 bytes, expected 16" in wrong.json()["error"]
    bad_length = post(b"{}", {"Inference-Header-Content-Length": "99"})
    assert bad_length.status == 400 and "Inference-Header-Content-Length" in bad_length.json()["error"]
    not_int = post(b"{}", {"Inference-Header-Content-Length": "x"})
    assert not_int.status == 400
    bytes_header = {
        "inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": 9}}]
    }
    broken = gateway.request(
        "POST",
        "/v2/models/word-count/infer",
        *binary_body(bytes_header, struct.pack("<I", 1) + b"a" + struct.pack("<I", 9)),
    )
    assert broken.status == 400 and "text" in broken.json()["error"]


def test_model_errors_from_upstream_are_mapped(gateway):
    unknown = gateway.request("POST", "/v2/models/nope/infer", {"inputs": [IRIS_ROW]})
    assert unknown.status == 404 and "nope" in unknown.json()["error"]
    assert gateway.request("GET", "/v2/models/nope").status == 404
    assert gateway.request("GET", "/v2/models/iris/versions/7").status == 404
    wrong_name = gateway.request("POST", "/v2/models/iris/infer", {"inputs": [{**IRIS_ROW, "name": "petals"}]})
    assert wrong_name.status == 400 and "petals" in wrong_name.json()["error"]
    wrong_type = gateway.request("POST", "/v2/models/iris/infer", {"inputs": [{**IRIS_ROW, "datatype": "FP64"}]})
    assert wrong_type.status == 400 and "FP64" in wrong_type.json()["error"]


def test_routes_methods_and_limits(gateway):
    assert gateway.request("GET", "/nope").status == 404
    assert gateway.request("GET", "/nope").json() == {"error": "no route for /nope"}
    not_allowed = gateway.request("GET", "/v2/models/iris/infer")
    assert not_allowed.status == 405 and "error" in not_allowed.json() and "POST" in not_allowed.headers["allow"]
    too_big = gateway.request("POST", "/v2/models/mock/infer", b"x" * (8 * 1024 * 1024 + 1))
    assert too_big.status == 413 and "error" in too_big.json()
    gzip = gateway.request("POST", "/v2/models/iris/infer", b"xx", {"Content-Encoding": "gzip"})
    assert gzip.status == 415
    # The gRPC side's 4 MiB limit: a body under the HTTP limit but over the message limit.
    big = np.zeros(1_200_000, np.float32)
    header = {
        "inputs": [
            {
                "name": "input",
                "shape": [1, big.size],
                "datatype": "FP32",
                "parameters": {"binary_data_size": big.nbytes},
            }
        ]
    }
    over = gateway.request("POST", "/v2/models/mock/infer", *binary_body(header, big.tobytes()))
    assert over.status == 413, over


def test_deadline_header_and_504(gateway):
    body = {"inputs": [{"name": "input", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}]}
    late = gateway.request("POST", "/v2/models/mock-heavy/infer", body, {"X-InferenceHub-Deadline-Ms": "50"})
    assert late.status == 504 and "deadline" in late.json()["error"]
    bad = gateway.request("POST", "/v2/models/mock/infer", body, {"X-InferenceHub-Deadline-Ms": "soon"})
    assert bad.status == 400 and "X-InferenceHub-Deadline-Ms" in bad.json()["error"]
    assert gateway.request("POST", "/v2/models/mock/infer", body, {"X-InferenceHub-Deadline-Ms": "5000"}).status == 200


def test_request_id_and_replica_headers(gateway, replica):
    body = {"inputs": [IRIS_ROW]}
    response = gateway.request("POST", "/v2/models/iris/infer", body, {"X-Request-Id": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    assert response.headers["x-inferencehub-replica"] == "replica-under-test"
    fresh = gateway.request("POST", "/v2/models/iris/infer", body)
    assert len(fresh.headers["x-request-id"]) == 32
    # The id reaches the replica: a failing call is logged there with it.
    gateway.request(
        "POST", "/v2/models/iris/infer", {"inputs": [{**IRIS_ROW, "name": "x"}]}, {"X-Request-Id": "trace-through-both"}
    )
    wait_for(lambda: "[trace-through-both]" in replica.log, timeout=5, what="the id in the replica's log")
    wait_for(lambda: "[trace-through-both]" in gateway.log, timeout=5, what="the id in the gateway's log")


def test_health_metrics_and_openapi(gateway):
    assert gateway.request("GET", "/healthz").status == 200
    assert gateway.request("GET", "/readyz").json() == {"status": "ready"}
    gateway.request("POST", "/v2/models/iris/infer", {"inputs": [IRIS_ROW]})
    text = gateway.request("GET", "/metrics").body.decode()
    assert 'inferencehub_gateway_requests_total{method="POST",route="/v2/models/{model}/infer",status="200"}' in text
    assert (
        'inferencehub_gateway_upstream_requests_total{code="OK",method="ModelInfer",replica="replica-under-test"}'
        in text
    )
    assert "inferencehub_gateway_request_duration_seconds_bucket" in text
    spec = gateway.request("GET", "/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    assert (
        "/v2/models/{model}/infer" in spec["paths"] and "/v2/models/{model}/versions/{version}/ready" in spec["paths"]
    )


def test_no_replica_reachable_is_503(tmp_path):
    gateway = Gateway("ipv4:127.0.0.1:1", "--deadline-seconds", "2")
    try:
        assert gateway.request("GET", "/readyz").status == 200  # an upstream blip does not fail readiness
        response = gateway.request("POST", "/v2/models/iris/infer", {"inputs": [IRIS_ROW]})
        assert response.status == 503, response
        assert response.headers["retry-after"] == "1"
        assert "no inference replica" in response.json()["error"]
        assert gateway.request("GET", "/v2/health/ready").status == 503
    finally:
        gateway.stop()


def test_sigterm_fails_readyz_first_and_finishes_in_flight(tmp_path):
    replica = Replica("--models", str(model_repository(tmp_path, TEST_MODELS / "sleepy"))).wait_serving()
    gateway = Gateway(f"ipv4:{replica.target}", "--drain-seconds", "1")
    try:
        import threading

        results = []
        body = {"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": [4.0]}]}
        worker = threading.Thread(
            target=lambda: results.append(gateway.request("POST", "/v2/models/sleepy/infer", body))
        )
        worker.start()
        time.sleep(0.5)  # the request is in flight (the model takes 3 s)
        started = time.monotonic()
        gateway.proc.send_signal(15)
        wait_for(lambda: gateway.request("GET", "/readyz").status == 503, timeout=2, what="/readyz to fail")
        assert time.monotonic() - started < 1.0
        worker.join(10)
        assert results and results[0].status == 200, results
        assert results[0].json()["outputs"][0]["data"] == [4.0]
        assert gateway.proc.wait(10) == 0
    finally:
        gateway.stop()
        replica.stop()


def test_tritonclient_sees_errors_as_exceptions(client):
    with pytest.raises(InferenceServerException) as err:
        http_infer(client, "iris", {"features": np.zeros((1, 3), np.float32)})
    assert "features" in str(err.value)


def test_shipped_models_only_gateway(tmp_path):
    """The gateway in front of a replica with only the shipped models, as `make run` starts it."""
    replica = Replica("--models", str(model_repository(tmp_path, *sorted(SHIPPED.iterdir())))).wait_serving()
    gateway = Gateway(f"ipv4:{replica.target}")
    try:
        response = gateway.request(
            "POST",
            "/v2/models/mock/infer",
            {"inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]},
        )
        assert response.status == 200 and response.json()["outputs"][0]["data"] == [1.0, 2.0]
    finally:
        gateway.stop()
        replica.stop()
