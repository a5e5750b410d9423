"""Triton's model repository extension over HTTP, for the whole set of replicas.

    POST /v2/repository/index                    {"ready": true}?  -> [{"name", "version", "state", "reason"}]
    POST /v2/repository/models/{model}/load      {"parameters": {"config": "<JSON>"}}?  -> 200, empty body
    POST /v2/repository/models/{model}/unload    -> 200, empty body

A load or unload must reach every replica, not one picked by the balancer: the route calls each address the
upstream target resolves to (``ReplicaSet.each``) at once and answers 200 only when every one succeeded. Otherwise
the answer names each replica that failed and why, with the status of the first failure (400 for a bad config or
a replica whose model control mode refuses it, 404 for an unknown model, 503 for an unreachable replica).

The index asks every replica too and merges their answers: a model is READY only if it is READY on every replica
that answered; otherwise its entry shows the first other state, and when replicas disagree, its reason names the
replicas in that state.

With a job queue (``--nats``), a load or unload that succeeded on at least one replica is also recorded in NATS
(``model_state``), so a replica in ``explicit`` mode that starts later serves the same set. Without one, replicas
that start later load what their own ``--model-control-mode`` and ``--load`` say.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
import msgspec
from aiohttp import web

from inferencehub import model_state
from inferencehub.errors import InvalidInput
from inferencehub.gateway.http_errors import HTTP_STATUS, RETRY_AFTER_SECONDS, error_response
from inferencehub.gateway.replicas import ReplicaSet, ReplicaView
from inferencehub.gateway.upstream import UpstreamError
from inferencehub.model_state import Desired
from inferencehub.protocol.inference import grpc_predict_v2_pb2 as pb

log = logging.getLogger(__name__)

RECORD_TIMEOUT = 5.0


class IndexRequest(msgspec.Struct, forbid_unknown_fields=True):
    ready: bool = False
    repository_name: str = ""


class LoadRequest(msgspec.Struct, forbid_unknown_fields=True):
    parameters: dict[str, Any] = {}


class IndexEntry(msgspec.Struct):
    name: str
    version: str
    state: str
    reason: str


SCHEMAS = (IndexRequest, LoadRequest, IndexEntry)  # for the OpenAPI document


def parse_body(body: bytes, kind: type, what: str):
    """An optional JSON body (empty: the defaults), checked against ``kind``."""
    if not body.strip():
        return kind()
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise InvalidInput(f"{what}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise InvalidInput(f"{what}: the body is not valid JSON: {exc}") from None


def replica_label(view: ReplicaView) -> str:
    return f"{view.name} ({view.address})" if view.name else view.address


def load_request(model: str, parameters: dict[str, Any]) -> pb.RepositoryModelLoadRequest:
    request = pb.RepositoryModelLoadRequest(model_name=model)
    for key, value in parameters.items():
        param = request.parameters[key]
        if isinstance(value, bool):
            param.bool_param = value
        elif isinstance(value, int):
            param.int64_param = value
        elif isinstance(value, str):
            param.string_param = value
        else:
            raise InvalidInput(f"load of model '{model}': parameter '{key}' must be a string, integer or boolean")
    return request


async def fan_out(replicas: ReplicaSet, method: str, request, timeout: float, action: str) -> tuple[web.Response, int]:
    """Call ``method`` on every replica: 200 with an empty body if all succeeded, else an error naming those that
    did not; and how many succeeded."""
    results = await replicas.each(method, request, timeout)
    if not results:
        return error_response(
            503, f"{action}: no inference replica is available", {"Retry-After": RETRY_AFTER_SECONDS}
        ), 0
    failed = [(view, result) for view, result in results if isinstance(result, UpstreamError)]
    if not failed:
        return web.Response(status=200), len(results)
    parts = [f"{replica_label(view)}: {_reason(error)}" for view, error in failed]
    first = failed[0][1]
    status = HTTP_STATUS.get(first.code, 500)
    message = f"{action} failed on {len(failed)} of {len(results)} replica(s): " + "; ".join(parts)
    if len(failed) < len(results):
        message += " (it succeeded on the others)"
    response = error_response(status, message, {"Retry-After": RETRY_AFTER_SECONDS} if status == 503 else None)
    return response, len(results) - len(failed)


async def remember(queue, desired: Desired, replicas: int) -> None:
    """Record the model's desired state for replicas that start later (``model_state``); a failure is logged."""
    if queue is None:
        return
    try:
        if queue.js is None:
            raise ConnectionError(queue.problem or "not connected")
        await asyncio.wait_for(model_state.record(queue.js, desired, replicas), RECORD_TIMEOUT)
    except Exception as exc:
        log.warning(
            "model %s: %s on the running replicas, but not recorded in NATS (%s): replicas that start later "
            "will follow their own --load flags",
            desired.name,
            "loaded" if desired.loaded else "unloaded",
            exc or type(exc).__name__,
        )


def _reason(error: UpstreamError) -> str:
    if error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return f"{error.code.name} ({error.details})"
    return error.details


async def index(replicas: ReplicaSet, ready: bool, timeout: float) -> web.Response:
    results = await replicas.each("RepositoryIndex", pb.RepositoryIndexRequest(ready=ready), timeout)
    answered = [(view, result) for view, result in results if not isinstance(result, UpstreamError)]
    if not answered:
        failures = "; ".join(f"{replica_label(v)}: {_reason(r)}" for v, r in results) or "none resolved"
        first = next((r for _, r in results if isinstance(r, UpstreamError)), None)
        status = HTTP_STATUS.get(first.code, 500) if first is not None else 503
        return error_response(status, f"repository index: no replica answered ({failures})")
    merged: dict[tuple[str, str], dict[str, str]] = {}  # by model and version
    where: dict[tuple[str, str], dict[tuple[str, str], list[str]]] = {}
    for view, response in answered:
        for entry in response.models:
            model = (entry.name, entry.version)
            where.setdefault(model, {}).setdefault((entry.state, entry.reason), []).append(replica_label(view))
            merged.setdefault(model, {"name": entry.name, "version": entry.version, "state": "", "reason": ""})
    rows = []
    for model in sorted(merged):
        row = merged[model]
        states = where[model]
        others = [(key, names) for key, names in states.items() if key[0] != "READY"]
        missing = len(answered) - sum(len(names) for names in states.values())
        if not others and not missing:
            row["state"] = "READY"
        elif others:
            (state, reason), names = others[0]
            row["state"] = state
            agreed = len(states) == 1 and not missing
            row["reason"] = reason if agreed else f"{reason} (on {', '.join(names)})"
        else:
            row["state"], row["reason"] = "UNAVAILABLE", f"not known to {missing} replica(s)"
        if not ready or row["state"] == "READY":
            rows.append(row)
    return web.json_response(rows)
