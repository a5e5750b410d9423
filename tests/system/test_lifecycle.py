"""Health transitions (loading, serving, draining) with a real SIGTERM, and a responsive loop under load."""

from __future__ import annotations

import re
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from conftest import SHIPPED, TEST_MODELS, Replica, health_status, model_repository, wait_for

HEALTH_NAMES = ["", "inference.GRPCInferenceService", "slow-load", "sleepy"]


def sleepy_request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="sleepy")
    request.inputs.add(name="input", datatype="FP32", shape=[2])
    request.raw_input_contents.append(np.array([1.0, 2.0], np.float32).tobytes())
    return request


def test_loading_serving_draining_stopped(tmp_path):
    repo = model_repository(tmp_path, TEST_MODELS / "slow-load", TEST_MODELS / "sleepy")
    replica = Replica(
        "--models",
        str(repo),
        "--drain-seconds",
        "1",
        "--grace-seconds",
        "10",
        env={"INFERENCEHUB_REPLICA_NAME": "pod-abc"},
    )
    try:
        # Loading: listening, but NOT_SERVING for every name, and not ready.
        for name in HEALTH_NAMES:
            assert health_status(replica.target, name) == "NOT_SERVING"
        assert health_status(replica.target, "inferencehub.liveness") == "SERVING"
        with triton.InferenceServerClient(replica.target) as client:
            assert client.is_server_live()
            assert not client.is_server_ready()

        replica.wait_serving()
        for name in HEALTH_NAMES:
            assert health_status(replica.target, name) == "SERVING"

        with grpc.insecure_channel(replica.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            in_flight = [stub.ModelInfer.future(sleepy_request(), timeout=20) for _ in range(4)]
            wait_for(lambda: _metric(replica, "sleepy") == 4, what="4 calls in flight")

            started = time.monotonic()
            replica.proc.send_signal(15)
            # Draining: NOT_SERVING at once, while calls are still accepted.
            wait_for(lambda: health_status(replica.target) == "NOT_SERVING", timeout=5, what="NOT_SERVING")
            assert time.monotonic() - started < 1.0
            assert health_status(replica.target, "sleepy") == "NOT_SERVING"
            assert health_status(replica.target, "inferencehub.liveness") == "SERVING"
            with triton.InferenceServerClient(replica.target) as client:
                assert not client.is_server_ready()

            # After the drain, new calls are refused while the in-flight ones finish.
            wait_for(lambda: "refusing new calls" in replica.log, timeout=5, what="the drain to end")
            assert not any(f.done() for f in in_flight)
            with grpc.insecure_channel(replica.target) as fresh, pytest.raises(grpc.RpcError) as refused:
                pb_grpc.GRPCInferenceServiceStub(fresh).ModelInfer(sleepy_request(), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

            for future in in_flight:
                response, call = future.result(), future
                assert np.frombuffer(response.raw_output_contents[0], np.float32).tolist() == [1.0, 2.0]
                assert ("x-inferencehub-replica", "pod-abc") in call.trailing_metadata()

        assert replica.proc.wait(15) == 0
        assert time.monotonic() - started < 12
    finally:
        replica.kill()


def _metric(replica: Replica, model: str) -> float:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{replica.metrics_port}/metrics", timeout=5).read().decode()
    match = re.search(rf'inferencehub_inference_in_flight_requests{{model="{model}"}} (\S+)', text)
    return float(match.group(1)) if match else 0.0


def test_grace_period_bounds_shutdown(tmp_path):
    repo = model_repository(tmp_path, TEST_MODELS / "sleepy")
    replica = Replica("--models", str(repo), "--drain-seconds", "0", "--grace-seconds", "0.5").wait_serving()
    try:
        with grpc.insecure_channel(replica.target) as channel:
            call = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer.future(sleepy_request(), timeout=20)
            wait_for(lambda: _metric(replica, "sleepy") == 1, what="a call in flight")
            started = time.monotonic()
            replica.proc.send_signal(15)
            assert replica.proc.wait(10) == 0
            assert time.monotonic() - started < 2.5  # the 3 s call did not hold the exit back
            with pytest.raises(grpc.RpcError):
                call.result()
    finally:
        replica.kill()


def test_health_and_metadata_answer_while_every_worker_is_busy(tmp_path):
    repo = model_repository(tmp_path, SHIPPED / "mock-heavy")
    replica = Replica("--models", str(repo), "--processes", "2").wait_serving()
    try:
        with grpc.insecure_channel(replica.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            request = pb.ModelInferRequest(model_name="mock-heavy")
            request.inputs.add(name="input", datatype="FP32", shape=[1, 1])
            request.raw_input_contents.append(np.zeros(1, np.float32).tobytes())
            busy = [stub.ModelInfer.future(request, timeout=30) for _ in range(6)]  # three rounds of ~500 ms
            wait_for(lambda: _metric(replica, "mock-heavy") == 6, what="6 busy calls in flight")

            started = time.monotonic()
            assert health_status(replica.target) == "SERVING"
            metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name="mock-heavy"), timeout=5)
            answered = time.monotonic() - started
            assert metadata.name == "mock-heavy"
            assert not all(f.done() for f in busy), "the busy calls ended before the health check answered"
            for future in busy:
                future.result()
            total = time.monotonic() - started
            assert answered < total / 3, f"health took {answered:.3f}s while busy calls took {total:.3f}s"
    finally:
        replica.terminate()
        replica.kill()


def test_request_id_in_logs_and_default_replica_name(tmp_path):
    import socket

    repo = model_repository(tmp_path, SHIPPED / "iris")
    replica = Replica("--models", str(repo)).wait_serving()
    try:
        with grpc.insecure_channel(replica.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            request = pb.ModelInferRequest(model_name="iris")
            request.inputs.add(name="features", datatype="FP32", shape=[1, 3])
            request.raw_input_contents.append(bytes(12))
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer.with_call(request, metadata=[("x-request-id", "trace-xyz")], timeout=5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert ("x-inferencehub-replica", f"{socket.gethostname()}:{replica.port}") in (
                err.value.trailing_metadata()
            )
        wait_for(lambda: "[trace-xyz]" in replica.log, timeout=5, what="the request id in the log")
        line = next(line for line in replica.lines if "[trace-xyz]" in line)
        assert "features" in line and "INVALID_ARGUMENT" in line
    finally:
        replica.terminate()
        replica.kill()
