"""The stock kserve SDK against the gateway (REST v2) and a replica (gRPC), from its own environment."""

from __future__ import annotations

import subprocess
from pathlib import Path

from conftest import ROOT

PYTHON = ROOT / ".cache" / "tools" / "kserve" / "bin" / "python"
CLIENT = Path(__file__).parent / "clients" / "kserve_client.py"


def test_kserve_sdk_rest_and_grpc(gateway, replica):
    assert PYTHON.exists(), "run `make tools` (or `python scripts/install_tools.py`)"
    done = subprocess.run(
        [str(PYTHON), str(CLIENT), f"http://{gateway.url}", replica.target],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "rest binary=False: [0, 2]" in done.stdout and "rest binary=True: [0, 2]" in done.stdout
    assert "grpc: [0, 2]" in done.stdout


def test_model_named_in_the_body_must_match_the_path(gateway):
    row = {"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}
    same = gateway.request("POST", "/v2/models/iris/infer", {"model_name": "iris", "inputs": [row]})
    assert same.status == 200
    other = gateway.request("POST", "/v2/models/iris/infer", {"model_name": "mock", "inputs": [row]})
    assert other.status == 400 and "model_name" in other.json()["error"]
    version = gateway.request("POST", "/v2/models/iris/versions/1/infer", {"model_version": "2", "inputs": [row]})
    assert version.status == 400 and "model_version" in version.json()["error"]
    by_body = gateway.request("POST", "/v2/models/iris/infer", {"model_version": "7", "inputs": [row]})
    assert by_body.status == 404 and "version '7'" in by_body.json()["error"]
