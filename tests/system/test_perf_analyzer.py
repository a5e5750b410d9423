"""Triton's perf_analyzer, unchanged, drives load through the gateway (HTTP) and straight to a replica (gRPC)."""

from __future__ import annotations

import subprocess

from conftest import ROOT

VENV = ROOT / ".cache" / "tools" / "perf-analyzer"


def perf_analyzer(*args: str) -> subprocess.CompletedProcess:
    binary = VENV / "bin" / "perf_analyzer"
    assert binary.exists(), "run `make tools` (or `python scripts/install_tools.py`)"
    cuda = next(VENV.glob("lib/python*/site-packages/nvidia/cuda_runtime/lib"))
    # The machines are shared and noisy: any throughput will do, so stability is not asked for.
    return subprocess.run(
        [
            str(binary),
            *args,
            "--concurrency-range",
            "2",
            "--measurement-interval",
            "500",
            "--stability-percentage",
            "1000",
            "--max-trials",
            "10",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={"LD_LIBRARY_PATH": str(cuda)},
    )


def test_perf_analyzer_through_the_gateway(gateway):
    # iris batches (max_batch_size 64): perf_analyzer sends one row of 4 features per request.
    done = perf_analyzer("-i", "http", "-u", gateway.url, "-m", "iris")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Throughput:" in done.stdout and "infer/sec" in done.stdout
    # Server-side statistics (Triton's statistics extension, summed over the replicas) are in the report.
    server = done.stdout.split("Server:", 1)[-1]
    assert "Server:" in done.stdout and "Inference count:" in server and "compute infer" in server, done.stdout


def test_perf_analyzer_over_grpc_with_batches(replica):
    # digits batches (max_batch_size 64): perf_analyzer sends batches of 8 rows of 64 pixels.
    done = perf_analyzer("-i", "grpc", "-u", replica.target, "-m", "digits", "-b", "8")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Batch size: 8" in done.stdout and "Throughput:" in done.stdout
    assert "Server:" in done.stdout and "queue" in done.stdout.split("Server:", 1)[-1], done.stdout


def test_model_config_route_describes_the_model(gateway):
    config = gateway.request("GET", "/v2/models/iris/config").json()
    assert config["name"] == "iris" and config["max_batch_size"] == 64
    assert config["input"] == [{"name": "features", "data_type": "TYPE_FP32", "dims": [4]}]  # no batch dimension
    assert {o["name"]: o["data_type"] for o in config["output"]} == {
        "probabilities": "TYPE_FP32",
        "label": "TYPE_INT64",
    }
    assert gateway.request("GET", "/v2/models/nope/config").status == 404
    digits = gateway.request("GET", "/v2/models/digits/config").json()
    assert digits["max_batch_size"] == 64
    assert digits["input"] == [{"name": "pixels", "data_type": "TYPE_FP32", "dims": [64]}]  # no batch dimension
    assert digits["dynamic_batching"] == {"preferred_batch_size": [16, 32, 64], "max_queue_delay_microseconds": 2000}
