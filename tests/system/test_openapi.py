"""The OpenAPI document is what the gateway does: schemathesis (in its own environment, from `make tools`) sends
schema-valid and schema-invalid requests to every route of a live gateway and checks every answer against the
document: statuses, content types, bodies, no server errors, valid data accepted, invalid data rejected."""

from __future__ import annotations

import re
import subprocess

import pytest

from conftest import ROOT

SCHEMATHESIS = ROOT / ".cache" / "tools" / "schemathesis" / "bin" / "schemathesis"
CONFIG = ROOT / "tests" / "system" / "api" / "schemathesis.toml"


@pytest.mark.timeout(300)
def test_schemathesis_finds_no_disagreement_between_the_document_and_the_gateway(gateway, tmp_path):
    assert SCHEMATHESIS.exists(), "run `make tools` (make test does) to install schemathesis"
    done = subprocess.run(
        [
            str(SCHEMATHESIS),
            "--config-file",
            str(CONFIG),
            "run",
            f"http://{gateway.url}/openapi.json",
            "--checks",
            "all",
            "--max-examples",
            "15",
            "--workers",
            "1",
            "--seed",
            "1",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,  # its cache folder goes there, not into the checkout
    )
    report = done.stdout[-5000:] + done.stderr[-2000:]
    assert done.returncode == 0, report
    for phase in ("Coverage", "Fuzzing", "Stateful"):
        assert f"✅ {phase}" in done.stdout, report
    selected = re.search(r"Operations: +(\d+) selected / (\d+) total", done.stdout)
    assert selected and selected.group(1) == selected.group(2) and int(selected.group(1)) >= 14, report


def test_the_document_describes_requests_with_the_types_the_gateway_validates_with(gateway):
    spec = gateway.request("GET", "/openapi.json").json()
    request = spec["components"]["schemas"]["InferenceRequest"]
    assert request["additionalProperties"] is False and request["required"] == ["inputs"]
    assert set(request["properties"]) == {"inputs", "id", "parameters", "outputs", "model_name", "model_version"}
    tensor = spec["components"]["schemas"]["RequestInput"]
    assert tensor["properties"]["shape"]["items"]["minimum"] == 0
    assert tensor["properties"]["parameters"]["properties"]["binary_data_size"] == {
        "description": "bytes of this input in the binary part",
        "type": "integer",
        "minimum": 0,
    }
    # A field the document does not list is refused, naming it; one it lists is accepted.
    row = {"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}
    refused = gateway.request("POST", "/v2/models/iris/infer", {"inputs": [{**row, "dims": [1]}]})
    assert refused.status == 400 and "unknown field `dims`" in refused.json()["error"]
    accepted = gateway.request("POST", "/v2/models/iris/infer", {"id": "x", "model_version": "1", "inputs": [row]})
    assert accepted.status == 200, accepted
