"""The one place gRPC status codes become HTTP answers. Bodies are ``{"error": "..."}`` as OIP says."""

from __future__ import annotations

import grpc
from aiohttp import web

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.CANCELLED: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
# Codes whose details are written for the caller; others get a fixed message (details go to the log).
CALLER_DETAILS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.INTERNAL,
}
FIXED_MESSAGES = {
    # Also what a replica dying mid-call looks like: the call is not replayed (it may have run), see upstream.py.
    grpc.StatusCode.UNAVAILABLE: (
        "no inference replica is available, or the one running the call went away (calls a replica may have "
        "begun are never replayed); retry later"
    ),
    grpc.StatusCode.CANCELLED: "the inference call was cancelled; retry later",
    grpc.StatusCode.DEADLINE_EXCEEDED: "the inference service did not answer within the deadline",
}
RETRY_AFTER_SECONDS = "1"
MODEL_DETAILS = "model '"  # how a replica's messages about one model begin


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def upstream_error(code: grpc.StatusCode, details: str) -> tuple[int, str, dict[str, str] | None]:
    """The HTTP status, message and headers a failed upstream call is answered with."""
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
        return 413, f"the request is too large for the inference service: {details}", None
    status = HTTP_STATUS.get(code, 500)
    message = details if code in CALLER_DETAILS else FIXED_MESSAGES.get(code, f"inference failed ({code.name})")
    if code is grpc.StatusCode.UNAVAILABLE and details.startswith(MODEL_DETAILS):
        message = details  # a replica saying which model is not ready (loading, being replaced): worth passing on
    headers = {"Retry-After": RETRY_AFTER_SECONDS} if status in (429, 503) else None
    return status, message, headers


def upstream_error_response(code: grpc.StatusCode, details: str) -> web.Response:
    status, message, headers = upstream_error(code, details)
    return error_response(status, message, headers)
