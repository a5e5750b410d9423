"""The OpenAPI document is what the gateway does: schemathesis (in its own environment, from `make tools`) sends
schema-valid and schema-invalid requests to every route of a live gateway and checks every answer against the
document: statuses, content types, bodies (each server-sent event of the streaming routes too), no server errors,
valid data accepted, invalid data rejected. That the document lists every route the gateway serves is checked
in-process from the app's router (tests/unit/test_schema.py)."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator

import pytest

from conftest import ROOT, Gateway, llm_serving

SCHEMATHESIS = ROOT / ".cache" / "tools" / "schemathesis" / "bin" / "schemathesis"
CONFIG = ROOT / "tests" / "system" / "api" / "schemathesis.toml"


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory) -> Iterator[Gateway]:
    """A gateway in front of a replica of its own (schemathesis loads and unloads its models): ``iris``, and
    ``mock-llm`` at a token a millisecond, as the document's examples name it and most generated completions reach
    it (at the shipped model's pace they alone would take minutes)."""
    folder = tmp_path_factory.mktemp("fuzzed-models")
    with llm_serving(folder, "fuzzed", first_token_ms=1, token_ms=1, also=("iris",)) as (_, gateway):
        yield gateway


def operations(spec: dict) -> int:
    return sum(1 for item in spec["paths"].values() for method in item if method in ("get", "post", "delete"))


@pytest.mark.timeout(300)
def test_schemathesis_finds_no_disagreement_between_the_document_and_the_gateway(fuzzed, tmp_path):
    gateway = fuzzed
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
    # Every operation of the document but GET /openapi.json: schemathesis leaves out the document's own address.
    expected = operations(gateway.request("GET", "/openapi.json").json()) - 1
    assert selected and int(selected.group(1)) == int(selected.group(2)) == expected >= 32, report


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


def test_the_streaming_routes_are_documented_as_server_sent_events(gateway):
    spec = gateway.request("GET", "/openapi.json").json()
    for path in ("/v2/models/{model}/generate_stream", "/v1/completions", "/v1/chat/completions"):
        ok = spec["paths"][path]["post"]["responses"]["200"]["content"]
        event = ok["text/event-stream"]["schema"]  # one event (OpenAPI 3.2's itemSchema; schemathesis reads it so)
        assert event["required"] == ["data"], path
    data = spec["paths"]["/v1/completions"]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
    assert data["properties"]["data"]["if"] == {"const": "[DONE]"}  # the OpenAI stream's last event is not JSON
    assert spec["paths"]["/v1/models"]["get"]["responses"]["503"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/OpenAIError"
    }
    # The completion routes take the fields their request types list, and refuse others, naming them.
    fields = spec["components"]["schemas"]["CompletionRequest"]["properties"]
    assert {"model", "prompt", "max_tokens", "stop", "stream", "stream_options", "temperature", "n"} <= set(fields)
    refused = gateway.request("POST", "/v1/completions", {"model": "mock-llm", "prompt": "x", "colour": "blue"})
    assert refused.status == 400 and refused.json()["error"]["param"] == "colour"
