"""The REST API's documents as types (``gateway/schema.py``): the request decoder and the generated schemas."""

from __future__ import annotations

import json

import msgspec
import pytest
from msgspec import UNSET

from inferencehub.gateway.schema import (
    MAX_DIMENSIONS,
    REQUEST_DECODER,
    SCHEMAS,
    InputParameters,
    OutputParameters,
    RequestInput,
)
from inferencehub.tensors import DATATYPES

X = {"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}


def decode(document):
    return REQUEST_DECODER.decode(json.dumps(document).encode())


def refused(document, match):
    with pytest.raises(msgspec.ValidationError, match=match):
        decode(document)


def test_a_minimal_request_decodes_with_defaults():
    request = decode({"inputs": [X]})
    assert request.inputs == [RequestInput(name="x", shape=[1], datatype="FP32", data=[1.0])]
    assert request.outputs == [] and request.parameters == {}
    assert request.id is UNSET and request.model_name is UNSET and request.model_version is UNSET


def test_inputs_are_required_and_not_empty():
    refused({}, "Object missing required field `inputs`")
    refused({"inputs": []}, "Expected `array` of length >= 1 - at `\\$.inputs`")


@pytest.mark.parametrize("where", ["top", "input", "output"])
def test_unknown_fields_are_refused_everywhere(where):
    document = {"inputs": [dict(X)], "outputs": [{"name": "y"}]}
    target = {"top": document, "input": document["inputs"][0], "output": document["outputs"][0]}[where]
    target["extra"] = 1
    refused(document, "Object contains unknown field `extra`")


def test_every_datatype_is_accepted_and_no_other():
    for name in DATATYPES:
        assert decode({"inputs": [{**X, "datatype": name}]}).inputs[0].datatype == name
    refused({"inputs": [{**X, "datatype": "fp32"}]}, "Invalid enum value 'fp32'")


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("name", "", "Expected `str` of length >= 1"),
        ("name", "n" * 257, "Expected `str` of length <= 256"),
        ("shape", [-1], "Expected `int` >= 0"),
        ("shape", [2**63], "Expected `int` <= 9223372036854775807"),
        ("shape", [1] * (MAX_DIMENSIONS + 1), f"Expected `array` of length <= {MAX_DIMENSIONS}"),
        ("shape", "1", "Expected `array`, got `str`"),
        ("data", {"a": 1}, "Expected `array`, got `object`"),
        ("parameters", {"k": [1]}, "Expected `bool | int | float | str`, got `array`"),
    ],
)
def test_input_fields_are_bounded(field, value, match):
    refused({"inputs": [{**X, field: value}]}, match)


def test_the_id_is_bounded():
    assert decode({"id": "i" * 256, "inputs": [X]}).id == "i" * 256
    refused({"id": "i" * 257, "inputs": [X]}, "Expected `str` of length <= 256 - at `\\$.id`")


def test_known_parameters_are_typed_and_others_pass():
    assert msgspec.convert({"binary_data_size": 4, "other": "x"}, InputParameters).binary_data_size == 4
    with pytest.raises(msgspec.ValidationError, match="Expected `int` >= 0"):
        msgspec.convert({"binary_data_size": -1}, InputParameters)
    with pytest.raises(msgspec.ValidationError, match="Expected `bool`, got `int`"):
        msgspec.convert({"binary_data": 1}, OutputParameters)


def test_every_schema_is_a_json_schema_with_the_known_parameters():
    _, components = msgspec.json.schema_components(SCHEMAS)
    assert {s.__name__ for s in SCHEMAS} <= set(components)
    request_input = components["RequestInput"]
    assert request_input["required"] == ["name", "shape", "datatype"]
    assert request_input["properties"]["datatype"]["enum"] == sorted(DATATYPES)
    assert "binary_data_size" in request_input["properties"]["parameters"]["properties"]
    assert "binary_data_output" in components["InferenceRequest"]["properties"]["parameters"]["properties"]


def test_the_openapi_document_lists_every_route_the_gateway_serves():
    """From the app's own router: a route added without its document entry (or an entry left for a route that went
    away) fails here. HEAD, which aiohttp adds to every GET, is left out, as documents do."""
    from inferencehub.gateway.app import create_app
    from inferencehub.gateway.openapi import openapi_document
    from inferencehub.settings import GatewaySettings

    app = create_app(GatewaySettings())
    served = {
        (route.resource.canonical, route.method.lower())
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }
    documented = {(path, method) for path, item in openapi_document()["paths"].items() for method in item}
    assert served == documented
    assert ("/v2/models/{model}/generate_stream", "post") in served and ("/v1/chat/completions", "post") in served
