"""Replicas report their load to clients: an ORCA load report in the trailing metadata of every response.

The report is what gRPC's weighted_round_robin weighs replicas by, so its numbers are checked against a
replica whose load is known: one execution slot, 20 ms per call, callers always waiting. gRPC's own
client consumes the report (it never reaches the application), so the trailers are read with grpcurl.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from inferencehub.protocol.xds.data.orca.v3.orca_load_report_pb2 import OrcaLoadReport

from conftest import Replica, wait_for

KEY = "endpoint-load-metrics-bin"
GRPCURL = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
INFER = {
    "model_name": "one-slot",
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [2], "contents": {"fp32_contents": [1, 2]}}],
}
ONE_SLOT = {
    "name": "one-slot",
    "runtime": "mock",
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1]}],
    "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1]}],
    "parameters": {"mode": "sleep", "latency": {"distribution": "fixed", "ms": 20}},
    "scheduling": {"max_concurrency": 1, "max_queue_size": 64},
}


def request(model: str = "one-slot") -> pb.ModelInferRequest:
    """A raw ModelInfer request, as tritonclient sends it."""
    message = pb.ModelInferRequest(model_name=model)
    message.inputs.add(name="input", datatype="FP32", shape=[2])
    message.raw_input_contents.append(np.array([1, 2], dtype=np.float32).tobytes())
    return message


def trailers(target: str, method: str, body: dict) -> dict[str, str]:
    """Call ``method`` with grpcurl; return the response's trailing metadata."""
    done = subprocess.run(
        [GRPCURL, "-plaintext", "-v", "-d", json.dumps(body), target, f"inference.GRPCInferenceService/{method}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    text = done.stdout + done.stderr
    assert "Response trailers received:" in text, text
    block = text.split("Response trailers received:", 1)[1].strip().split("\n\n", 1)[0]
    return dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)


def report_in(found: dict[str, str]) -> OrcaLoadReport:
    assert KEY in found, found
    return OrcaLoadReport.FromString(base64.b64decode(found[KEY]))


@pytest.fixture
def replica(tmp_path):
    (tmp_path / "one-slot").mkdir()
    (tmp_path / "one-slot" / "config.json").write_text(json.dumps(ONE_SLOT))
    server = Replica("--models", str(tmp_path), "--replica-name", "loaded")
    try:
        yield server.wait_serving()
    finally:
        server.stop()


def test_every_response_carries_a_load_report(replica):
    for method, body in (
        ("ModelInfer", INFER),
        ("ServerLive", {}),
        ("ModelMetadata", {"name": "no-such-model"}),  # an error (NOT_FOUND) carries it too
    ):
        found = trailers(replica.target, method, body)
        assert found.get("x-inferencehub-replica") == "loaded", (method, found)
        report = report_in(found)
        assert 0 < report.mem_utilization < 1, (method, report)


def test_the_report_measures_the_load(replica):
    """6 callers on one 20 ms slot: the slot is always busy (utilization ~1), ~50 calls/s, up to 6 in flight (a
    caller slowed by a busy machine still leaves others queued, so the slot never waits on the test)."""
    stopping = threading.Event()
    calls = [0]

    def caller() -> None:
        with grpc.insecure_channel(replica.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            deadline = time.monotonic() + 30
            while not stopping.is_set() and time.monotonic() < deadline:
                stub.ModelInfer(request(), timeout=10)
                calls[0] += 1

    threads = [threading.Thread(target=caller, daemon=True) for _ in range(6)]
    for thread in threads:
        thread.start()
    try:
        # The report covers the last 2 s: after 3 s of steady load it describes steady load.
        started = time.monotonic()
        wait_for(lambda: time.monotonic() - started > 3 and calls[0] > 60, timeout=25, what="3 s of load")
        report = report_in(trailers(replica.target, "ServerLive", {}))
    finally:
        stopping.set()
        for thread in threads:
            thread.join(15)
    assert 0.8 <= report.application_utilization <= 1.05, report
    assert 25 <= report.rps_fractional <= 52, report  # at most 50/s, less where the machine is busy
    assert 3.0 <= report.named_metrics["in_flight_utilization"] <= 6.05, report  # 1 running + up to 5 queued
    assert report.eps == 0
    assert 0 < report.cpu_utilization < 1.5, report

    # Idle again: the report falls back to no load (no traffic, no weight: clients use the mean weight).
    def idle() -> bool:
        report = report_in(trailers(replica.target, "ServerLive", {}))
        return report.application_utilization == 0 and report.rps_fractional == 0

    wait_for(idle, timeout=10, interval=0.2, what="the report to show no load")


def test_an_open_stream_counts_as_a_busy_slot_in_the_report(tmp_path):
    """A generation holds its model's one slot while it streams: the report shows the replica full."""
    config = {
        "name": "one-slot-llm",
        "runtime": "mock",
        "decoupled": True,
        "inputs": [
            {"name": "text_input", "datatype": "BYTES", "shape": [1]},
            {"name": "max_tokens", "datatype": "INT32", "shape": [1], "optional": True},
            {"name": "stop", "datatype": "BYTES", "shape": [-1], "optional": True},
        ],
        "outputs": [{"name": "text_output", "datatype": "BYTES", "shape": [1]}],
        "parameters": {
            "first_token_latency": {"distribution": "fixed", "ms": 10},
            "token_latency": {"distribution": "fixed", "ms": 10},
        },
        "scheduling": {"max_concurrency": 1},
    }
    (tmp_path / "one-slot-llm").mkdir()
    (tmp_path / "one-slot-llm" / "config.json").write_text(json.dumps(config))
    server = Replica("--models", str(tmp_path)).wait_serving()
    try:
        message = pb.ModelInferRequest(model_name="one-slot-llm")
        message.inputs.add(name="text_input", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"go")
        message.inputs.add(name="max_tokens", datatype="INT32", shape=[1]).contents.int_contents.append(400)
        with grpc.insecure_channel(server.target) as channel:
            responses = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter([message]), timeout=30)
            next(responses)
            started = time.monotonic()
            time.sleep(2.5)  # the report covers the last 2 s: all of them with the stream open (4 s of tokens)
            report = report_in(trailers(server.target, "ServerLive", {}))
            assert time.monotonic() - started < 3.5, "the stream must still be open when the report is read"
            assert sum(1 for _ in responses) == 399
        assert 0.8 <= report.application_utilization <= 1.05, report
        assert 0.8 <= report.named_metrics["in_flight_utilization"] <= 1.05, report
    finally:
        server.stop()
