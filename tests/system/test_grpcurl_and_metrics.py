"""What a user runs after `kubectl port-forward`: grpcurl by reflection, and a Prometheus scrape."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from conftest import sample_value, scrape

GRPCURL = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")


def grpcurl(*args: str) -> str:
    done = subprocess.run([GRPCURL, "-plaintext", *args], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_grpcurl_list_describe_and_call(replica):
    services = grpcurl(replica.target, "list").split()
    assert "inference.GRPCInferenceService" in services
    assert "grpc.health.v1.Health" in services

    described = grpcurl(replica.target, "describe", "inference.GRPCInferenceService")
    for method in ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer"):
        assert f"rpc {method}" in described

    request = {
        "model_name": "iris",
        "inputs": [
            {
                "name": "features",
                "datatype": "FP32",
                "shape": [1, 4],
                "contents": {"fp32_contents": [6.3, 3.3, 6.0, 2.5]},
            }
        ],
    }
    response = json.loads(
        grpcurl("-d", json.dumps(request), replica.target, "inference.GRPCInferenceService/ModelInfer")
    )
    outputs = {o["name"]: o for o in response["outputs"]}
    assert outputs["label"]["contents"]["int64_contents"] == ["2"]
    assert len(outputs["probabilities"]["contents"]["fp32_contents"]) == 3

    health = json.loads(grpcurl("-d", '{"service": "iris"}', replica.target, "grpc.health.v1.Health/Check"))
    assert health == {"status": "SERVING"}


def test_prometheus_metrics(replica):
    before = scrape(replica)
    with triton.InferenceServerClient(replica.target) as client:
        tensor = triton.InferInput("features", [2, 4], "FP32")
        tensor.set_data_from_numpy(np.ones((2, 4), np.float32))
        for _ in range(3):
            client.infer("iris", [tensor])
        bad = triton.InferInput("features", [2, 3], "FP32")
        bad.set_data_from_numpy(np.ones((2, 3), np.float32))
        with pytest.raises(InferenceServerException):
            client.infer("iris", [bad])
        with pytest.raises(InferenceServerException):
            client.infer("no-such-model", [tensor])
    after = scrape(replica)

    def delta(name, **labels):
        return sample_value(after, name, **labels) - sample_value(before, name, **labels)

    assert delta("inferencehub_inference_requests_total", model="iris", code="OK") == 3
    assert delta("inferencehub_inference_requests_total", model="iris", code="INVALID_ARGUMENT") == 1
    assert delta("inferencehub_inference_requests_total", model="_unknown", code="NOT_FOUND") == 1
    assert delta("inferencehub_inference_request_duration_seconds_count", model="iris") == 4
    assert sample_value(after, "inferencehub_model_ready", model="iris", version="1") == 1
    assert sample_value(after, "inferencehub_inference_in_flight_requests", model="iris") == 0
    assert "no-such-model" not in after
    assert re.search(r"# TYPE inferencehub_inference_request_duration_seconds histogram", after)
