"""Dynamic batching, admission control and deadlines, on real replicas."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from conftest import ROOT, SHIPPED, TEST_MODELS, Gateway, Replica, model_repository, sample_value, scrape, wait_for


def raw_request(model: str, outputs: list[str] = (), **arrays: np.ndarray) -> pb.ModelInferRequest:
    datatypes = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}
    request = pb.ModelInferRequest(model_name=model)
    for name, array in arrays.items():
        request.inputs.add(name=name, datatype=datatypes[array.dtype], shape=array.shape)
        request.raw_input_contents.append(array.tobytes())
    for name in outputs:
        request.outputs.add(name=name)
    return request


def decode(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    dtypes = {"FP32": np.float32, "INT64": np.int64}
    return {
        out.name: np.frombuffer(response.raw_output_contents[i], dtypes[out.datatype]).reshape(out.shape)
        for i, out in enumerate(response.outputs)
    }


@pytest.fixture(scope="module")
def batching_replica(tmp_path_factory):
    repo = model_repository(
        tmp_path_factory.mktemp("models"), TEST_MODELS / "batch-echo", TEST_MODELS / "slow-one", SHIPPED / "digits"
    )
    replica = Replica("--models", str(repo)).wait_serving()
    yield replica
    replica.stop()


@pytest.fixture(scope="module")
def stub(batching_replica):
    with grpc.insecure_channel(batching_replica.target) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def test_rows_never_cross_callers_under_concurrent_mixed_requests(batching_replica, stub):
    before = scrape(batching_replica)
    calls = []
    for i in range(48):
        rows, width = 1 + i % 4, (3, 5)[i % 2]  # different sizes beyond the first dimension never mix
        x = np.full((rows, width), i, np.float32) + np.arange(rows, dtype=np.float32)[:, None] / 100
        tag = np.arange(rows, dtype=np.int64) + 1000 * i
        outputs = [["output"], ["tag_out"], []][i % 3]  # different requested outputs share batches safely
        calls.append(
            (x, tag, outputs, stub.ModelInfer.future(raw_request("batch-echo", outputs, input=x, tag=tag), timeout=30))
        )
    for x, tag, outputs, future in calls:
        response = future.result()
        got = decode(response)
        assert sorted(got) == sorted(outputs or ["output", "tag_out"])
        if "output" in got:
            np.testing.assert_array_equal(got["output"], x)
        if "tag_out" in got:
            np.testing.assert_array_equal(got["tag_out"], tag)
    after = scrape(batching_replica)
    model_calls = sample_value(after, "inferencehub_inference_model_calls_total", model="batch-echo") - sample_value(
        before, "inferencehub_inference_model_calls_total", model="batch-echo"
    )
    batched = sample_value(after, "inferencehub_inference_batch_size_sum", model="batch-echo") - sample_value(
        before, "inferencehub_inference_batch_size_sum", model="batch-echo"
    )
    assert batched == 48
    assert model_calls < 48 / 3, f"{model_calls} model calls for 48 requests: little batching happened"
    queued = sample_value(after, "inferencehub_inference_queue_duration_seconds_count", model="batch-echo")
    assert (
        queued - sample_value(before, "inferencehub_inference_queue_duration_seconds_count", model="batch-echo") == 48
    )
    assert 'inferencehub_inference_queue_depth{model="batch-echo"} 0.0' in after  # all served, none waiting


def test_batched_digits_match_one_at_a_time_and_the_stated_accuracy(stub):
    import csv

    with (ROOT / "data" / "digits.csv").open() as f:
        rows = [r for i, r in enumerate(list(csv.reader(f))[1:]) if i % 5 == 4]
    x = np.array([[float(v) for v in r[:64]] for r in rows], np.float32)
    y = np.array([int(r[64]) for r in rows])
    alone = [decode(stub.ModelInfer(raw_request("digits", pixels=x[i : i + 1]), timeout=30)) for i in range(24)]
    together = [stub.ModelInfer.future(raw_request("digits", pixels=x[i : i + 1]), timeout=30) for i in range(24)]
    for single, future in zip(alone, together, strict=True):
        batched = decode(future.result())
        assert batched["label"].tolist() == single["label"].tolist()
        np.testing.assert_allclose(batched["probabilities"], single["probabilities"], rtol=1e-4, atol=1e-6)
    labels = np.concatenate(
        [
            decode(stub.ModelInfer(raw_request("digits", pixels=x[i : i + 64]), timeout=30))["label"]
            for i in range(0, len(x), 64)
        ]
    )
    accuracy = float((labels == y).mean())
    assert accuracy >= 353 / 359  # the held-out accuracy stated in the docs
    assert "digits accuracy: 98.3% (353 of 359)" in (ROOT / "docs" / "models.md").read_text()


def test_a_request_over_max_batch_size_is_invalid(stub):
    big = np.zeros((17, 2), np.float32)
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(raw_request("batch-echo", input=big, tag=np.zeros(17, np.int64)), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_batch_size" in err.value.details()


def test_expired_work_is_not_computed(batching_replica, stub):
    before = scrape(batching_replica)
    one = np.ones(1, np.float32)
    running = stub.ModelInfer.future(raw_request("slow-one", input=one), timeout=30)  # holds the only slot 0.8 s
    wait_for(
        lambda: (
            sample_value(scrape(batching_replica), "inferencehub_inference_model_calls_total", model="slow-one")
            > sample_value(before, "inferencehub_inference_model_calls_total", model="slow-one")
        ),
        what="the first call to start",
    )
    late = [stub.ModelInfer.future(raw_request("slow-one", input=one), timeout=0.2) for _ in range(5)]
    for future in late:
        with pytest.raises(grpc.RpcError) as err:
            future.result()
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    running.result()

    def dropped() -> float:
        text = scrape(batching_replica)
        return sum(
            sample_value(text, "inferencehub_inference_expired_requests_total", model="slow-one", reason=r)
            - sample_value(before, "inferencehub_inference_expired_requests_total", model="slow-one", reason=r)
            for r in ("deadline", "cancelled")
        )

    wait_for(lambda: dropped() == 5, timeout=10, what="5 dropped requests to be counted")
    calls = sample_value(scrape(batching_replica), "inferencehub_inference_model_calls_total", model="slow-one")
    assert calls - sample_value(before, "inferencehub_inference_model_calls_total", model="slow-one") == 1
    stub.ModelInfer(raw_request("slow-one", input=one), timeout=30)  # the model still serves


def test_overload_is_refused_at_once_with_429_while_admitted_requests_succeed(tmp_path):
    replica = Replica("--models", str(model_repository(tmp_path, TEST_MODELS / "tight"))).wait_serving()
    gateway = Gateway(f"ipv4:{replica.target}")
    try:
        results: list[tuple[int, float, str | None]] = []
        lock = threading.Lock()
        body = {"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": [1.0]}]}

        def call() -> None:
            start = time.monotonic()
            response = gateway.request("POST", "/v2/models/tight/infer", body)
            with lock:
                results.append((response.status, time.monotonic() - start, response.headers.get("retry-after")))

        threads = [threading.Thread(target=call) for _ in range(10)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        statuses = sorted(status for status, _, _ in results)
        admitted = [latency for status, latency, _ in results if status == 200]
        rejected = [(latency, retry) for status, latency, retry in results if status == 429]
        assert set(statuses) == {200, 429} and len(results) == 10, statuses
        assert len(admitted) >= 3 and len(rejected) >= 4, statuses
        assert all(retry == "1" for _, retry in rejected)
        assert max(latency for latency, _ in rejected) < min(admitted), (rejected, admitted)  # refused at once
        text = scrape(replica)
        assert sample_value(text, "inferencehub_inference_rejected_requests_total", model="tight") == len(rejected)
        assert sample_value(
            text, "inferencehub_inference_requests_total", model="tight", code="RESOURCE_EXHAUSTED"
        ) == len(rejected)
    finally:
        gateway.stop()
        replica.stop()
