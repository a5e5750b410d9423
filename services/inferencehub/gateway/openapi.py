"""The OpenAPI document for the gateway's routes, served at /openapi.json."""

from __future__ import annotations

from typing import Any

import inferencehub
from inferencehub.gateway.jobs import openapi_paths as openapi_job_paths
from inferencehub.tensors import DATATYPES

ERROR = {"$ref": "#/components/schemas/Error"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    words = {
        400: "malformed request",
        404: "unknown model or version",
        413: "body too large",
        429: "overloaded: retry after Retry-After seconds",
        503: "no replica available",
        504: "deadline exceeded",
    }
    return {str(s): _json(ERROR, words[s]) for s in statuses}


def _model_paths(prefix: str) -> dict[str, Any]:
    params = [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}]
    if "{version}" in prefix:
        params.append({"name": "version", "in": "path", "required": True, "schema": {"type": "string"}})
    return {
        prefix: {
            "get": {
                "summary": "Model metadata",
                "parameters": params,
                "responses": {
                    "200": _json({"$ref": "#/components/schemas/ModelMetadata"}, "metadata"),
                    **_errors(404, 503, 504),
                },
            }
        },
        prefix + "/config": {
            "get": {
                "summary": "Model configuration (Triton's extension, for perf_analyzer)",
                "parameters": params,
                "responses": {"200": _json({"type": "object"}, "configuration"), **_errors(404, 503, 504)},
            }
        },
        prefix + "/ready": {
            "get": {
                "summary": "Model readiness",
                "parameters": params,
                "responses": {"200": _json({"type": "object"}, "ready"), **_errors(404, 503, 504)},
            }
        },
        prefix + "/infer": {
            "post": {
                "summary": "Inference (JSON, or JSON header plus binary tensor data)",
                "parameters": [
                    *params,
                    {
                        "name": "Inference-Header-Content-Length",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 0},
                    },
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequest"}},
                        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                    },
                },
                "responses": {
                    "200": _json({"$ref": "#/components/schemas/InferenceResponse"}, "outputs"),
                    **_errors(400, 404, 413, 429, 503, 504),
                },
            }
        },
    }


def openapi_document() -> dict[str, Any]:
    tensor = {
        "type": "object",
        "required": ["name", "shape", "datatype"],
        "properties": {
            "name": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "datatype": {
                "type": "string",
                "enum": list(DATATYPES),
            },
            "parameters": {"type": "object"},
            "data": {"type": "array", "items": {}},
        },
    }
    metadata_tensor = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "datatype": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
        },
    }
    plain = {"200": _json({"type": "object"}, "ok")}
    return {
        "openapi": "3.0.3",
        "info": {"title": "InferenceHub gateway (Open Inference Protocol REST)", "version": inferencehub.__version__},
        "paths": {
            "/healthz": {"get": {"summary": "The gateway process is alive", "responses": plain}},
            "/readyz": {
                "get": {
                    "summary": "The gateway takes traffic (not starting or draining)",
                    "responses": {**plain, **_errors(503)},
                }
            },
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text"}}}},
            "/v2": {"get": {"summary": "Server metadata", "responses": {**plain, **_errors(503, 504)}}},
            "/v2/health/live": {"get": {"summary": "Server liveness", "responses": {**plain, **_errors(503)}}},
            "/v2/health/ready": {"get": {"summary": "Server readiness", "responses": {**plain, **_errors(503)}}},
            **_model_paths("/v2/models/{model}"),
            **_model_paths("/v2/models/{model}/versions/{version}"),
            **openapi_job_paths(),
        },
        "components": {
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
                "ModelMetadata": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "versions": {"type": "array", "items": {"type": "string"}},
                        "platform": {"type": "string"},
                        "inputs": {"type": "array", "items": metadata_tensor},
                        "outputs": {"type": "array", "items": metadata_tensor},
                    },
                },
                "InferenceRequest": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {"type": "object"},
                        "inputs": {"type": "array", "minItems": 1, "items": tensor},
                        "outputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {"name": {"type": "string"}, "parameters": {"type": "object"}},
                            },
                        },
                    },
                },
                "InferenceResponse": {
                    "type": "object",
                    "properties": {
                        "model_name": {"type": "string"},
                        "model_version": {"type": "string"},
                        "id": {"type": "string"},
                        "outputs": {"type": "array", "items": tensor},
                    },
                },
            }
        },
    }
