"""Triton's perf_analyzer, unchanged, drives load through the gateway over HTTP."""

from __future__ import annotations

import subprocess

from conftest import ROOT

VENV = ROOT / ".cache" / "tools" / "perf-analyzer"


def test_perf_analyzer_through_the_gateway(gateway):
    binary = VENV / "bin" / "perf_analyzer"
    assert binary.exists(), "run `make tools` (or `python scripts/install_tools.py`)"
    cuda = next(VENV.glob("lib/python*/site-packages/nvidia/cuda_runtime/lib"))
    # The machines are shared and noisy: any throughput will do, so stability is not asked for.
    done = subprocess.run(
        [
            str(binary),
            "-i",
            "http",
            "-u",
            gateway.url,
            "-m",
            "iris",
            "--shape",
            "features:1,4",
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
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Throughput:" in done.stdout and "infer/sec" in done.stdout


def test_model_config_route_describes_the_model(gateway):
    config = gateway.request("GET", "/v2/models/iris/config").json()
    assert config["name"] == "iris" and config["max_batch_size"] == 0
    assert config["input"] == [{"name": "features", "data_type": "TYPE_FP32", "dims": [-1, 4]}]
    assert {o["name"]: o["data_type"] for o in config["output"]} == {
        "probabilities": "TYPE_FP32",
        "label": "TYPE_INT64",
    }
    assert gateway.request("GET", "/v2/models/nope/config").status == 404
