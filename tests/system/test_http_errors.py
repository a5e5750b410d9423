"""The one mapping from gRPC status codes to HTTP answers."""

from __future__ import annotations

import json

import grpc
import pytest

from inferencehub.gateway.http_errors import upstream_error_response

CASES = [
    (grpc.StatusCode.INVALID_ARGUMENT, "input 'x': bad", 400, "input 'x': bad"),
    (grpc.StatusCode.NOT_FOUND, "model 'm' not found", 404, "model 'm' not found"),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "model 'm' is overloaded", 429, "model 'm' is overloaded"),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "Sent message larger than max (9 vs. 4)", 413, "too large"),
    (grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses; 10.1.2.3", 503, "no inference replica"),
    (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", 504, "deadline"),
    (grpc.StatusCode.UNIMPLEMENTED, "Method not found", 501, "Method not found"),
    (grpc.StatusCode.UNKNOWN, "Exception calling application: secret internals", 500, "inference failed (UNKNOWN)"),
    (grpc.StatusCode.DATA_LOSS, "secret", 500, "inference failed (DATA_LOSS)"),
]


@pytest.mark.parametrize(("code", "details", "status", "message"), CASES, ids=[c[0].name for c in CASES])
def test_grpc_codes_map_to_http(code, details, status, message):
    response = upstream_error_response(code, details)
    assert response.status == status
    body = json.loads(response.body)
    assert set(body) == {"error"} and message in body["error"]
    assert "secret" not in body["error"] and "10.1.2.3" not in body["error"]
    assert ("Retry-After" in response.headers) == (status in (429, 503))
