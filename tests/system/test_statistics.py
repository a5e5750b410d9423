"""Triton's statistics extension: stock tritonclient (HTTP through the gateway, gRPC to each replica) reads
counts and durations that match the requests this test sent; the gateway sums every replica."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import SHIPPED, Gateway, Replica, wait_for

DURATIONS = ("queue", "compute_input", "compute_infer", "compute_output")


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[Replica, Replica, Gateway]]:
    """Two fresh replicas (their statistics start at zero) behind one gateway."""
    replicas: list[Replica] = []
    gateway = None
    try:
        for name in ("stats-a", "stats-b"):
            replicas.append(Replica("--models", str(SHIPPED), "--replica-name", name, "--processes", "1"))
        for r in replicas:
            r.wait_serving()
        gateway = Gateway(f"ipv4:{replicas[0].target},{replicas[1].target}")
        yield replicas[0], replicas[1], gateway
    finally:
        if gateway is not None:
            gateway.stop()
        for r in replicas:
            r.stop()


def iris_input(client, rows: int = 1):
    tensor = client.InferInput("features", [rows, 4], "FP32")
    tensor.set_data_from_numpy(np.full((rows, 4), 0.5, np.float32))
    return tensor


def by_model(stats: dict) -> dict[str, dict]:
    return {s["name"]: s for s in stats["model_stats"]}


def as_ints(stats: dict) -> dict:
    """tritonclient.grpc's JSON has 64-bit numbers as strings (protobuf's JSON mapping); make them ints."""
    if isinstance(stats, dict):
        return {k: as_ints(v) for k, v in stats.items()}
    if isinstance(stats, list):
        return [as_ints(v) for v in stats]
    return int(stats) if isinstance(stats, str) and stats.isdigit() else stats


def both_replicas_answer(gateway: Gateway) -> bool:
    """True once the gateway's channel has sent calls to both replicas (so round robin spreads what follows)."""
    gateway.request("GET", "/v2/health/live")
    text = gateway.request("GET", "/metrics").body.decode()
    return all(f'method="ServerLive",replica="{name}"' in text for name in ("stats-a", "stats-b"))


def test_statistics_count_what_was_sent(pair):
    a, b, gateway = pair
    wait_for(lambda: both_replicas_answer(gateway), timeout=10, what="both replicas in the gateway's rotation")
    http = httpclient.InferenceServerClient(gateway.url)
    client_ns = 0
    for _ in range(6):
        started = time.perf_counter_ns()
        http.infer("iris", [iris_input(httpclient)])
        client_ns += time.perf_counter_ns() - started
    # digits batches: three requests of two rows each.
    for _ in range(3):
        pixels = httpclient.InferInput("pixels", [2, 64], "FP32")
        pixels.set_data_from_numpy(np.zeros((2, 64), np.float32))
        http.infer("digits", [pixels])
    # One request the replica refuses (wrong datatype), straight to replica a over gRPC.
    grpc_a = grpcclient.InferenceServerClient(a.target)
    bad = grpcclient.InferInput("features", [1, 4], "FP64")
    bad.set_data_from_numpy(np.zeros((1, 4), np.float64))
    with pytest.raises(InferenceServerException):
        grpc_a.infer("iris", [bad])

    # HTTP through the gateway: the sum over both replicas.
    summed = by_model(http.get_inference_statistics())
    assert set(summed) == {"iris", "digits", "mock", "mock-heavy", "mock-llm"}
    iris = summed["iris"]
    assert iris["version"] == "1"
    assert iris["inference_stats"]["success"]["count"] == 6
    assert iris["inference_stats"]["fail"]["count"] == 1
    assert iris["inference_count"] == 6 and iris["execution_count"] == 6
    for name in DURATIONS:
        assert iris["inference_stats"][name]["count"] == 6, name
        assert iris["inference_stats"][name]["ns"] > 0, name
    parts = sum(iris["inference_stats"][name]["ns"] for name in DURATIONS)
    # The parts fit in the replicas' time, which fits in the time the client waited.
    assert client_ns > iris["inference_stats"]["success"]["ns"] >= parts > 0
    assert iris["last_inference"] > 1_700_000_000_000  # milliseconds since the epoch
    digits = summed["digits"]
    assert digits["inference_stats"]["success"]["count"] == 3
    assert digits["inference_count"] == 6  # rows, for a batching model
    assert 1 <= digits["execution_count"] <= 3
    assert sum(s["batch_size"] * s["compute_infer"]["count"] for s in digits["batch_stats"]) == 3
    assert summed["mock"]["inference_stats"]["success"]["count"] == 0

    # gRPC to each replica: each one's own share, adding up to the gateway's sum.
    shares = []
    for replica in (a, b):
        client = grpcclient.InferenceServerClient(replica.target)
        own = as_ints(client.get_inference_statistics("iris", "1", as_json=True))
        assert [s["name"] for s in own["model_stats"]] == ["iris"]
        shares.append(own["model_stats"][0])
    assert sum(s["inference_stats"]["success"]["count"] for s in shares) == 6
    assert all(s["inference_stats"]["success"]["count"] > 0 for s in shares)  # round robin used both
    for name in ("success", *DURATIONS):
        assert sum(s["inference_stats"][name]["ns"] for s in shares) == iris["inference_stats"][name]["ns"], name

    response = gateway.request("GET", "/v2/models/iris/versions/1/stats")
    assert response.status == 200
    assert response.headers["x-inferencehub-replicas"] == "stats-a,stats-b"
    assert by_model(response.json())["iris"]["inference_stats"]["success"]["count"] == 6


def test_unknown_models_and_versions_are_404(pair):
    a, _, gateway = pair
    for path in ("/v2/models/nope/stats", "/v2/models/iris/versions/9/stats"):
        response = gateway.request("GET", path)
        assert response.status == 404, response
        assert "not found" in response.json()["error"] or "no version" in response.json()["error"]
    with pytest.raises(InferenceServerException, match="not found"):
        grpcclient.InferenceServerClient(a.target).get_inference_statistics("nope")


def test_server_metadata_lists_the_extensions_served(pair):
    _, _, gateway = pair
    extensions = httpclient.InferenceServerClient(gateway.url).get_server_metadata()["extensions"]
    assert {"statistics", "model_configuration", "binary_tensor_data"} <= set(extensions)


def test_a_stream_counts_as_one_inference_of_its_generation(pair):
    """A generation on a decoupled model is one inference and one execution, whatever its number of responses."""
    a, _, _ = pair
    with grpcclient.InferenceServerClient(a.target) as client:
        before = as_ints(client.get_inference_statistics("mock-llm", as_json=True))["model_stats"][0]
        results: list = []
        client.start_stream(callback=lambda result, error: results.append((result, error)))
        for i, max_tokens in enumerate((3, 5)):
            prompt = grpcclient.InferInput("text_input", [1], "BYTES")
            prompt.set_data_from_numpy(np.array([b"count me"], dtype=object))
            limit = grpcclient.InferInput("max_tokens", [1], "INT32")
            limit.set_data_from_numpy(np.array([max_tokens], dtype=np.int32))
            client.async_stream_infer("mock-llm", [prompt, limit], request_id=str(i))
        bad = grpcclient.InferInput("max_tokens", [1], "INT32")
        bad.set_data_from_numpy(np.array([0], dtype=np.int32))
        client.async_stream_infer("mock-llm", [prompt, bad], request_id="bad")
        wait_for(lambda: len(results) == 3 + 5 + 1, timeout=10, what="every response")
        client.stop_stream()
        assert sum(error is not None for _, error in results) == 1
        after = as_ints(client.get_inference_statistics("mock-llm", as_json=True))["model_stats"][0]
    stats, old = after["inference_stats"], before.get("inference_stats", {})

    def count(block: dict, name: str) -> int:
        return int(block.get(name, {}).get("count", 0))

    assert after["inference_count"] - before.get("inference_count", 0) == 2
    assert after["execution_count"] - before.get("execution_count", 0) == 2
    assert count(stats, "success") - count(old, "success") == 2
    assert count(stats, "fail") - count(old, "fail") == 1
    # Each generation ran for at least its tokens' latencies (first 40 ms median, then 15 ms each).
    assert int(stats["compute_infer"]["ns"]) - int(old.get("compute_infer", {}).get("ns", 0)) > 2 * 20_000_000
