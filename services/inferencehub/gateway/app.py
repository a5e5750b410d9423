"""The gateway: an aiohttp app speaking the OIP REST API, proxying to the inference service over gRPC.

Routes convert and delegate: HTTP/JSON is parsed by ``rest``, sent by ``upstream``,
and errors become HTTP answers in ``http_errors``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import inferencehub
from inferencehub import logs
from inferencehub.errors import InferenceHubError, InvalidInput
from inferencehub.gateway import jobs, rest
from inferencehub.gateway.http_errors import error_response, upstream_error_response
from inferencehub.gateway.metrics import GatewayMetrics
from inferencehub.gateway.openapi import openapi_document
from inferencehub.gateway.upstream import Upstream, UpstreamError
from inferencehub.metadata import REPLICA_KEY
from inferencehub.protocol.inference import grpc_predict_v2_pb2 as pb
from inferencehub.settings import GatewaySettings

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-Id"
DEADLINE_HEADER = "X-InferenceHub-Deadline-Ms"
REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:/=+-]{1,128}$")
BINARY_EXTENSION = "binary_tensor_data"


@dataclass
class GatewayState:
    started: bool = False
    draining: bool = False


SETTINGS = web.AppKey("settings", GatewaySettings)
METRICS = web.AppKey("metrics", GatewayMetrics)
STATE = web.AppKey("state", GatewayState)
UPSTREAM = web.AppKey("upstream", Upstream)


class StartupError(InferenceHubError):
    """The gateway could not start (a port taken...)."""


# --- middlewares ---------------------------------------------------------------------------


@web.middleware
async def observe(request: web.Request, handler) -> web.StreamResponse:
    """Request id in and out, metrics by route template, a log line for every failure."""
    incoming = request.headers.get(REQUEST_ID_HEADER, "")
    request_id = incoming if REQUEST_ID_PATTERN.match(incoming) else uuid.uuid4().hex
    token = logs.request_id.set(request_id)
    start = time.perf_counter()
    route = request.match_info.route.resource
    template = route.canonical if route is not None else "unmatched"
    status = 499  # the client went away before an answer
    try:
        response = await handler(request)
        status = response.status
        response.headers[REQUEST_ID_HEADER] = request_id
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        metrics = request.app[METRICS]
        metrics.requests.labels(template, request.method, str(status)).inc()
        metrics.duration.labels(template, request.method).observe(time.perf_counter() - start)
        if status >= 400:
            log.info("%s %s -> %d", request.method, request.path, status)
        logs.request_id.reset(token)


@web.middleware
async def errors(request: web.Request, handler) -> web.StreamResponse:
    """Every failure becomes an OIP error body; nothing a client sends produces a traceback."""
    try:
        return await handler(request)
    except InvalidInput as exc:
        return error_response(400, str(exc))
    except UpstreamError as exc:
        if exc.code.name not in ("INVALID_ARGUMENT", "NOT_FOUND"):
            log.warning("upstream %s: %s", exc.code.name, exc.details)
        return upstream_error_response(exc.code, exc.details)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        messages = {404: f"no route for {request.path}", 405: f"{request.method} is not allowed on {request.path}"}
        return error_response(exc.status, messages.get(exc.status, exc.text or exc.reason), _kept_headers(exc))
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return error_response(500, "internal error in the gateway; its log has the details")


def _kept_headers(exc: web.HTTPException) -> dict[str, str]:
    return {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}


# --- handlers ------------------------------------------------------------------------------


def deadline(request: web.Request) -> float:
    default = request.app[SETTINGS].deadline_seconds
    asked = request.headers.get(DEADLINE_HEADER)
    if asked is None:
        return default
    if not asked.isdigit() or int(asked) == 0:
        raise InvalidInput(f"{DEADLINE_HEADER} must be a positive number of milliseconds, got {asked!r}")
    return min(default, int(asked) / 1000)


async def call(request: web.Request, method: str, message):
    return await request.app[UPSTREAM].call(
        method, message, request_id=logs.request_id.get(), timeout=deadline(request)
    )


def model_and_version(request: web.Request) -> tuple[str, str]:
    return request.match_info["model"], request.match_info.get("version", "")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.draining:
        return error_response(503, "draining: shutting down")
    if not state.started:
        return error_response(503, "starting")
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


async def server_live(request: web.Request) -> web.Response:
    response, _ = await call(request, "ServerLive", pb.ServerLiveRequest())
    return web.json_response({"live": response.live}, status=200 if response.live else 503)


async def server_ready(request: web.Request) -> web.Response:
    response, _ = await call(request, "ServerReady", pb.ServerReadyRequest())
    return web.json_response({"ready": response.ready}, status=200 if response.ready else 503)


async def server_metadata(request: web.Request) -> web.Response:
    response, _ = await call(request, "ServerMetadata", pb.ServerMetadataRequest())
    extensions = [*response.extensions, BINARY_EXTENSION]
    return web.json_response({"name": response.name, "version": response.version, "extensions": extensions})


async def model_metadata(request: web.Request) -> web.Response:
    name, version = model_and_version(request)
    response, _ = await call(request, "ModelMetadata", pb.ModelMetadataRequest(name=name, version=version))
    return web.json_response(rest.model_metadata_json(response))


async def model_config(request: web.Request) -> web.Response:
    """Triton's model-configuration extension, which perf_analyzer reads."""
    name, version = model_and_version(request)
    response, _ = await call(request, "ModelConfig", pb.ModelConfigRequest(name=name, version=version))
    return web.json_response(rest.model_config_json(response.config))


async def model_ready(request: web.Request) -> web.Response:
    name, version = model_and_version(request)
    response, _ = await call(request, "ModelReady", pb.ModelReadyRequest(name=name, version=version))
    return web.json_response({"name": name, "ready": response.ready}, status=200 if response.ready else 503)


async def infer(request: web.Request) -> web.Response:
    name, version = model_and_version(request)
    encoding = request.headers.get("Content-Encoding", "identity").lower()
    if encoding != "identity":
        return error_response(415, f"Content-Encoding {encoding!r} is not supported; send the body uncompressed")
    body = await request.read()
    header_length = rest.parse_header_length(request.headers.get(rest.HEADER_LENGTH), len(body))
    message, plan = rest.parse_infer_request(body, header_length, name, version)
    wait = jobs.async_preference(request)
    if wait is not None:
        return await jobs.submit(request, message, plan, wait)
    response, replica = await call(request, "ModelInfer", message)
    payload, headers = rest.render_infer_response(response, plan)
    headers[REPLICA_KEY] = replica
    return web.Response(body=payload, headers=headers)


def routes() -> list[web.RouteDef]:
    table = [
        web.get("/healthz", healthz),
        web.get("/readyz", readyz),
        web.get("/metrics", metrics),
        web.get("/openapi.json", openapi),
        web.get("/v2", server_metadata),
        web.get("/v2/health/live", server_live),
        web.get("/v2/health/ready", server_ready),
    ]
    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        table += [
            web.get(prefix, model_metadata),
            web.get(prefix + "/ready", model_ready),
            web.get(prefix + "/config", model_config),
            web.post(prefix + "/infer", infer),
        ]
    return table + jobs.routes()


# --- the app and its process ---------------------------------------------------------------


async def _upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    app[UPSTREAM] = Upstream(app[SETTINGS], app[METRICS])
    app[STATE].started = True
    yield
    await app[UPSTREAM].close()


def create_app(settings: GatewaySettings) -> web.Application:
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[observe, errors])
    app[SETTINGS] = settings
    app[METRICS] = GatewayMetrics()
    app[STATE] = GatewayState()
    app.cleanup_ctx.append(_upstream_ctx)
    if settings.nats_url:
        jobs.install(app, settings, app[METRICS].registry)
    app.add_routes(routes())
    return app


async def serve(settings: GatewaySettings) -> None:
    """Run until SIGTERM or SIGINT; then fail /readyz, drain, let in-flight requests finish, and stop."""
    app = create_app(settings)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=settings.grace_seconds)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port)
        try:
            await site.start()
        except OSError as exc:
            raise StartupError(f"cannot listen for HTTP on {settings.host}:{settings.port}: {exc.strerror}") from None
        port = runner.addresses[0][1]
        log.info(
            "gateway %s listening: http://%s:%d, upstream %s",
            inferencehub.__version__,
            settings.host,
            port,
            settings.upstream,
        )
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        await stopping.wait()
        app[STATE].draining = True
        log.info("draining for %.1fs", settings.drain_seconds)
        await asyncio.sleep(settings.drain_seconds)
        log.info("closing the listener; in-flight requests have %.1fs to finish", settings.grace_seconds)
    finally:
        await runner.cleanup()
    log.info("gateway stopped")
