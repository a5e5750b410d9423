"""Asynchronous inference over HTTP: ``Prefer: respond-async`` on ``POST .../infer`` queues a job.

- ``POST .../infer`` with ``Prefer: respond-async``: validated exactly as a synchronous request (the body by
  ``rest``, the tensors against the model's signature and batch limit, with the replica's messages), then queued
  (``job_queue``); 202 with ``Location: /v2/jobs/{id}`` and ``Preference-Applied: respond-async``. ``wait=N`` waits
  up to N seconds for the result (200 with the inference response when it is done).
- ``GET /v2/jobs/{id}``: the job (``schema.Job``), with ``result`` (the response the synchronous route would have
  given, binary outputs as the binary extension) when it succeeded, ``error`` when it failed.
- ``DELETE /v2/jobs/{id}``: cancels a queued or running job; 409 for a finished one.

Without a connection to NATS, async requests get 503 naming the queue; synchronous requests go on as usual.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry

from inferencehub import jobqueue, logs
from inferencehub.gateway import job_headers, rest
from inferencehub.gateway.http_errors import HTTP_STATUS, RETRY_AFTER_SECONDS, error_response
from inferencehub.gateway.job_headers import async_wait
from inferencehub.gateway.job_queue import JobQueue, QueueError, iso_time
from inferencehub.gateway.keys import JOBS, UPSTREAM
from inferencehub.jobqueue import FINAL, SUCCEEDED, JobRecord
from inferencehub.metadata import HEADER_LENGTH, IDEMPOTENCY_HEADER, PREFER_HEADER, PREFERENCE_APPLIED_HEADER
from inferencehub.oip.plan import OutputPlan
from inferencehub.protocol.inference import grpc_predict_v2_pb2 as pb
from inferencehub.settings import GatewaySettings
from inferencehub.tracing import Tracing


def async_preference(request: web.Request) -> float | None:
    """None unless the request prefers respond-async and a job queue is configured; else the wait in seconds."""
    jobs = request.app.get(JOBS)
    if jobs is None:
        return None
    return async_wait(request.headers.getall(PREFER_HEADER, ()), jobs.settings.deadline_seconds)


async def submit(request: web.Request, message: pb.ModelInferRequest, plan: OutputPlan, wait: float) -> web.Response:
    """Queue a validated request as a job (the infer route calls this for ``Prefer: respond-async``)."""
    jobs = request.app[JOBS]
    idempotency = job_headers.idempotency(request.headers.get(IDEMPOTENCY_HEADER))
    try:
        jobs.check_available()
        signature = await jobs.signature(request.app[UPSTREAM], message, logs.request_id.get())
        if signature is not None:  # the replica's checks, with its words, before the job is queued
            signature.check(message)
        record, _ = await jobs.submit(message, plan, idempotency)
        if wait > 0 and record.status not in FINAL:
            record = await jobs.wait(record.id, wait) or record
    except QueueError as exc:
        return error_response(exc.status, str(exc), exc.headers)
    if wait > 0 and record.status in FINAL:
        return finished_response(record)
    location = f"/v2/jobs/{record.id}"
    return web.json_response(
        {"id": record.id, "status": record.status},
        status=202,
        headers={"Location": location, PREFERENCE_APPLIED_HEADER: "respond-async", "Retry-After": RETRY_AFTER_SECONDS},
    )


def finished_response(record: JobRecord) -> web.Response:
    """What the synchronous route would have answered for a finished job."""
    if record.status == SUCCEEDED:
        response = pb.ModelInferResponse.FromString(record.result)
        payload, headers = rest.render_infer_response(response, record.plan)
        return web.Response(body=payload, headers=headers)
    if record.status == jobqueue.FAILED:
        code = getattr(grpc.StatusCode, record.error_code, grpc.StatusCode.INTERNAL)
        return error_response(HTTP_STATUS.get(code, 500), record.error)
    return error_response(409, f"job {record.id} was cancelled")


def job_response(record: JobRecord, status: int = 200) -> web.Response:
    doc: dict = {
        "id": record.id,
        "model_name": record.model,
        "model_version": record.version,
        "status": record.status,
        "created_at": iso_time(record.created),
        "started_at": iso_time(record.started),
        "finished_at": iso_time(record.finished),
        "attempts": record.attempts,
    }
    blobs = b""
    if record.status == SUCCEEDED:
        response = pb.ModelInferResponse.FromString(record.result)
        payload, headers = rest.render_infer_response(response, record.plan)
        length = headers.get(HEADER_LENGTH)
        if length is None:
            doc["result"] = orjson.Fragment(payload)
        else:
            doc["result"] = orjson.Fragment(payload[: int(length)])
            blobs = payload[int(length) :]
    elif record.status in (jobqueue.FAILED, jobqueue.CANCELLED):
        doc["error"] = record.error
    body = orjson.dumps(doc)
    if not blobs:
        return web.Response(body=body, status=status, content_type="application/json")
    return web.Response(
        body=body + blobs,
        status=status,
        headers={"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(body))},
    )


def _unknown(job_id: str) -> web.Response:
    return error_response(404, f"job '{job_id}' not found (unknown, or expired after its time to live)")


async def get_job(request: web.Request) -> web.Response:
    job_id = request.match_info["id"]
    jobs = request.app.get(JOBS)
    if jobs is None:
        return error_response(404, "no job queue is configured on this gateway (start it with --nats URL)")
    try:
        record = await jobs.get(job_id)
    except QueueError as exc:
        return error_response(exc.status, str(exc), exc.headers)
    return _unknown(job_id) if record is None else job_response(record)


async def cancel_job(request: web.Request) -> web.Response:
    job_id = request.match_info["id"]
    jobs = request.app.get(JOBS)
    if jobs is None:
        return error_response(404, "no job queue is configured on this gateway (start it with --nats URL)")
    try:
        record, cancelled = await jobs.cancel(job_id)
    except QueueError as exc:
        return error_response(exc.status, str(exc), exc.headers)
    if record is None:
        return _unknown(job_id)
    if not cancelled:
        return error_response(409, f"job '{job_id}' is already {record.status}; only queued or running jobs cancel")
    return job_response(record)


def routes() -> list[web.RouteDef]:
    return [web.get("/v2/jobs/{id}", get_job), web.delete("/v2/jobs/{id}", cancel_job)]


def install(
    app: web.Application, settings: GatewaySettings, registry: CollectorRegistry, tracing: Tracing | None = None
) -> None:
    """Give the app a job queue for its lifetime (only called when --nats is set)."""
    queue = JobQueue(settings, registry)
    queue.tracing = tracing  # a job's message carries the submitting request's trace context
    app[JOBS] = queue

    async def job_queue(app: web.Application) -> AsyncIterator[None]:
        await queue.start()
        yield
        await queue.close()

    app.cleanup_ctx.append(job_queue)
