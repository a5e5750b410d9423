"""The OpenAPI document for the gateway's routes, served at /openapi.json.

Every request and response body schema comes from the types in ``schema.py`` (the same ones the gateway
validates requests with); this module only lays out the routes, their parameters and their statuses.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any

import msgspec

import inferencehub
from inferencehub.gateway import repository, schema
from inferencehub.metadata import DEADLINE_HEADER, HEADER_LENGTH, PREFER_HEADER, REQUEST_ID_HEADER

REF = "#/components/schemas/{name}"

WHEN = {
    400: "malformed request (the message names the tensor or field), or a bad header",
    404: "unknown model or version",
    408: "the request body did not arrive in time",
    413: "body over the gateway's limit, or a message over the gRPC limit",
    415: "a compressed body (Content-Encoding)",
    429: "the model's queue is full: retry after Retry-After seconds",
    500: "the model failed (its message), or an internal error",
    501: "the replica does not implement this",
    403: "an admin action (load, unload) asked with an API key that is not an admin's",
    503: "no replica, the one running the call went away, or the body budget is full (Retry-After); not ready",
    504: "the deadline passed",
}


PARAM = re.compile(r"\{(\w+)\}")  # a path parameter


def _ref(kind: type) -> dict[str, str]:
    return {"$ref": REF.format(name=kind.__name__)}


def _json(kind: type, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(kind)}}}


def _answers(ok: type | None, *statuses: int, ok_description: str = "ok", error: type = schema.Error) -> dict[str, Any]:
    answers: dict[str, Any] = {}
    if ok is not None:
        answers["200"] = _json(ok, ok_description)
    for status in statuses:
        answers[str(status)] = _json(error, WHEN[status])
    return answers


def _events(done: str | None, *data: type) -> dict[str, Any]:
    """A ``text/event-stream`` answer whose events' ``data`` is JSON of one of the ``data`` types (or ``done``, the
    stream's last event, if given).

    The schema describes one event, as OpenAPI 3.2's ``itemSchema`` does (and tools read a 3.1 ``schema`` of an
    event stream): an object with the event's ``data`` string, its JSON typed with ``contentSchema``.
    """
    payload: dict[str, Any] = {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": {"anyOf": [_ref(kind) for kind in data]},
    }
    if done is not None:
        payload = {"type": "string", "if": {"const": done}, "else": payload}
    return {
        "schema": {
            "description": "one server-sent event",
            "type": "object",
            "properties": {"data": payload, "event": {"type": "string"}},
            "required": ["data"],
        }
    }


def _path_params(path: str) -> list[dict[str, Any]]:
    """The path's ``{name}`` parameters: required strings."""
    return [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}} for name in PARAM.findall(path)
    ]


def _header(name: str, description: str, **constraints: Any) -> dict[str, Any]:
    return {"name": name, "in": "header", "required": False, "description": description, "schema": constraints}


UPSTREAM_HEADERS = [
    _header(REQUEST_ID_HEADER, "the request id to log on both hops (else a new one)", type="string"),
    _header(
        DEADLINE_HEADER,
        "the call's deadline in ms, up to the gateway's maximum (longer: 400)",
        type="string",
        pattern="^[1-9][0-9]{0,8}$",
    ),
]
UPSTREAM_ERRORS = (400, 503, 504)


STATS = {
    "description": "Triton's statistics JSON (model_stats)",
    "content": {"application/json": {"schema": {"type": "object"}}},
}


def _get(summary: str, answers: dict[str, Any], params: list[dict] | None = None) -> dict[str, Any]:
    return {"get": {"summary": summary, "parameters": params or [], "responses": answers}}


def _model_paths(prefix: str) -> dict[str, Any]:
    params = [*_path_params(prefix), *UPSTREAM_HEADERS]
    config = {
        "description": "Triton's model configuration",
        "content": {"application/json": {"schema": {"type": "object"}}},
    }
    infer_ok = {
        "description": "the outputs: JSON, or a JSON header and binary tensor data (binary_data outputs)",
        "content": {
            "application/json": {"schema": _ref(schema.InferenceResponse)},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
    return {
        prefix: _get("Model metadata", _answers(schema.ModelMetadata, 404, *UPSTREAM_ERRORS), params),
        prefix + "/config": _get(
            "Model configuration (Triton's extension, for perf_analyzer)",
            {"200": config, **_answers(None, 404, 501, *UPSTREAM_ERRORS)},
            params,
        ),
        prefix + "/stats": _get(
            "Model statistics (Triton's extension), summed over every replica",
            {"200": STATS, **_answers(None, 404, *UPSTREAM_ERRORS)},
            params,
        ),
        prefix + "/ready": _get("Model readiness", _answers(schema.ModelReady, 404, *UPSTREAM_ERRORS), params),
        prefix + "/infer": {
            "post": {
                "summary": "Inference (JSON, or a JSON header plus binary tensor data)",
                "parameters": [
                    *params,
                    _header(
                        PREFER_HEADER,
                        "respond-async (RFC 7240), optionally with wait=N: queue the call as a job when the gateway "
                        "has a job queue (202 and Location: /v2/jobs/{id}); served synchronously otherwise",
                        type="string",
                    ),
                    _header(
                        HEADER_LENGTH,
                        "bytes of the JSON header; the rest is binary tensor data",
                        type="integer",
                        minimum=0,
                    ),
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": _ref(schema.InferenceRequest)},
                        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                    },
                },
                "responses": {
                    "200": infer_ok,
                    "202": {
                        "description": "queued as an async job (Prefer: respond-async): poll Location",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    **_answers(None, 404, 408, 413, 415, 429, 500, *UPSTREAM_ERRORS),
                },
            }
        },
    }


STREAM_ERRORS = (400, 404, 408, 413, 429, 500, 503, 504)  # before the first event; after it, a last error event


def _generate_paths(prefix: str) -> dict[str, Any]:
    """Triton's generate extension (gateway/generate.py), on a generative (decoupled) model or any other."""
    params = [*_path_params(prefix), *UPSTREAM_HEADERS]
    example = {"text_input": "tell me a story", "max_tokens": 8}  # the shipped mock-llm's inputs
    body = {
        "required": True,
        "content": {"application/json": {"schema": _ref(schema.GenerateRequest), "example": example}},
    }
    events = _events(None, schema.GenerateResponse, schema.Error)
    return {
        prefix + "/generate": {
            "post": {
                "summary": "Generate (Triton's extension): the model's responses as one answer, the tokens joined",
                "parameters": params,
                "requestBody": body,
                "responses": _answers(schema.GenerateResponse, *STREAM_ERRORS),
            }
        },
        prefix + "/generate_stream": {
            "post": {
                "summary": "Generate (Triton's extension) as server-sent events, one per response of the model",
                "parameters": params,
                "requestBody": body,
                "responses": {
                    "200": {
                        "description": "an event per response of the model, `data: {GenerateResponse}`; a failure "
                        "after the first is a last event `data: {Error}`",
                        "content": {"text/event-stream": events},
                    },
                    **_answers(None, *STREAM_ERRORS),
                },
            }
        },
    }


def _openai_paths() -> dict[str, Any]:
    """The OpenAI-compatible routes (gateway/openai_api.py); their errors have OpenAI's shape."""
    model = _path_params("{model}")

    def errors(*statuses: int) -> dict[str, Any]:
        return _answers(None, *statuses, error=schema.OpenAIError)

    def completion(summary: str, body: type, whole: type, chunk: type, example: dict[str, Any]) -> dict[str, Any]:
        ok = {
            "description": "the completion (stream false), or server-sent events (stream true): `data: {chunk}` "
            "per token, a chunk with finish_reason, with stream_options.include_usage one with usage and no "
            "choices, then `data: [DONE]`; a failure after the first token is a last event `data: {OpenAIError}`",
            "content": {
                "application/json": {"schema": _ref(whole)},
                "text/event-stream": _events("[DONE]", chunk, schema.OpenAIError),
            },
        }
        return {
            "post": {
                "summary": summary,
                "parameters": UPSTREAM_HEADERS,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": _ref(body),
                            "examples": {
                                "whole": {"value": example},
                                "streamed": {"value": {**example, "stream": True}},
                            },
                        }
                    },
                },
                "responses": {"200": ok, **errors(*STREAM_ERRORS)},
            }
        }

    return {
        "/v1/models": _get(
            "The text generation models (OpenAI-compatible)",
            {"200": _json(schema.OpenAIModelList, "the models"), **errors(*UPSTREAM_ERRORS)},
            UPSTREAM_HEADERS,
        ),
        "/v1/models/{model}": _get(
            "A text generation model (OpenAI-compatible); 404 for one that is not served or not one",
            {"200": _json(schema.OpenAIModel, "the model"), **errors(404, *UPSTREAM_ERRORS)},
            [*model, *UPSTREAM_HEADERS],
        ),
        "/v1/completions": completion(
            "Completion (OpenAI-compatible), whole or streamed",
            schema.CompletionRequest,
            schema.Completion,
            schema.Completion,
            {"model": "mock-llm", "prompt": "tell me a story", "max_tokens": 8},
        ),
        "/v1/chat/completions": completion(
            "Chat completion (OpenAI-compatible), whole or streamed",
            schema.ChatCompletionRequest,
            schema.ChatCompletion,
            schema.ChatCompletionChunk,
            {"model": "mock-llm", "messages": [{"role": "user", "content": "tell me a story"}], "max_tokens": 8},
        ),
    }


def _job_paths() -> dict[str, Any]:
    """The async job routes (gateway/jobs.py); submitting is the infer route with ``Prefer: respond-async``."""
    params = _path_params("{id}")
    gone = {"404": _json(schema.Error, "unknown or expired job (or no job queue on this gateway)")}
    unavailable = {"503": _json(schema.Error, "the job queue is unavailable")}
    return {
        "/v2/jobs/{id}": {
            "get": {
                "summary": "An async job (submitted with POST .../infer and the header Prefer: respond-async)",
                "parameters": params,
                "responses": {"200": _json(schema.Job, "the job"), **gone, **unavailable},
            },
            "delete": {
                "summary": "Cancel a queued or running job",
                "parameters": params,
                "responses": {
                    "200": _json(schema.Job, "the job, cancelled"),
                    **gone,
                    "409": _json(schema.Error, "the job already finished"),
                    **unavailable,
                },
            },
        }
    }


def _repository_paths() -> dict[str, Any]:
    """Triton's model repository extension (gateway/repository.py): index, load and unload on every replica."""
    done = {"description": "done on every replica (empty body)"}
    model = _path_params("{model}")

    def post(summary: str, body: type, answers: dict[str, Any], params: list) -> dict[str, Any]:
        content = {"application/json": {"schema": _ref(body)}}
        return {
            "post": {
                "summary": summary,
                "parameters": params,
                "requestBody": {"required": False, "content": content},
                "responses": answers,
            }
        }

    index_ok = {
        "description": "the models",
        "content": {"application/json": {"schema": {"type": "array", "items": _ref(repository.IndexEntry)}}},
    }
    statuses = (400, 403, 404, 500, 501, 503, 504)
    return {
        "/v2/repository/index": post(
            "Models in the repository and their state on every replica",
            repository.IndexRequest,
            {"200": index_ok, **_answers(None, 400, 403, 404, 500, 503, 504)},
            UPSTREAM_HEADERS,
        ),
        "/v2/repository/models/{model}/load": post(
            "Load or reload a model on every replica (admin; optional parameters.config: a JSON model config)",
            repository.LoadRequest,
            {"200": done, **_answers(None, *statuses)},
            [*model, *UPSTREAM_HEADERS],
        ),
        "/v2/repository/models/{model}/unload": post(
            "Unload a model on every replica (admin)",
            repository.LoadRequest,
            {"200": done, **_answers(None, *statuses)},
            [*model, *UPSTREAM_HEADERS],
        ),
    }


@cache
def openapi_document() -> dict[str, Any]:
    _, components = msgspec.json.schema_components((*schema.SCHEMAS, *repository.SCHEMAS), ref_template=REF)
    text = {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "InferenceHub gateway (Open Inference Protocol REST, generate, OpenAI-compatible)",
            "version": inferencehub.__version__,
        },
        "paths": {
            "/healthz": _get("The gateway process is alive", _answers(schema.Status)),
            "/readyz": _get("The gateway takes traffic (not starting or draining)", _answers(schema.Status, 503)),
            "/metrics": _get("Prometheus metrics", {"200": text}),
            "/openapi.json": _get(
                "This document",
                {
                    "200": {
                        "description": "OpenAPI 3.1",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            ),
            "/status.json": _get(
                "Live status: replicas' health and share of the last minute, latency, errors",
                {"200": {"description": "status", "content": {"application/json": {"schema": {"type": "object"}}}}},
            ),
            "/ui": _get("The live page", {"200": {"description": "HTML", "content": {"text/html": {}}}}),
            "/v2/models/stats": _get(
                "Statistics of every model (Triton's extension), summed over every replica",
                {"200": STATS, **_answers(None, *UPSTREAM_ERRORS)},
                UPSTREAM_HEADERS,
            ),
            "/v2": _get("Server metadata", _answers(schema.ServerMetadata, *UPSTREAM_ERRORS), UPSTREAM_HEADERS),
            "/v2/health/live": _get("Server liveness", _answers(schema.Live, *UPSTREAM_ERRORS), UPSTREAM_HEADERS),
            "/v2/health/ready": _get("Server readiness", _answers(schema.Ready, *UPSTREAM_ERRORS), UPSTREAM_HEADERS),
            **_model_paths("/v2/models/{model}"),
            **_model_paths("/v2/models/{model}/versions/{version}"),
            **_generate_paths("/v2/models/{model}"),
            **_generate_paths("/v2/models/{model}/versions/{version}"),
            **_openai_paths(),
            **_job_paths(),
            **_repository_paths(),
        },
        "components": {"schemas": components},
    }
