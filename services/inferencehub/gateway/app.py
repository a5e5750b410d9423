"""The gateway: an aiohttp app speaking the OIP REST API, proxying to the inference service over gRPC.

Routes convert and delegate: HTTP/JSON is parsed by ``rest``, sent by ``upstream``,
and errors become HTTP answers in ``http_errors``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import HttpVersion11, web
from prometheus_client import CONTENT_TYPE_LATEST

import inferencehub
from inferencehub import logs, tracing
from inferencehub.errors import InferenceHubError, InvalidInput
from inferencehub.gateway import generate, jobs, openai_api, repository, rest, siblings, statistics, streaming
from inferencehub.gateway.auth import Access
from inferencehub.gateway.body_budget import BodyBudget, read_body
from inferencehub.gateway.coalescer import coalescer_for
from inferencehub.gateway.connections import BodyTimeout, GatewayRunner, Limits
from inferencehub.gateway.deadlines import deadline
from inferencehub.gateway.http_errors import error_response, upstream_error_response
from inferencehub.gateway.keys import (
    BODY_BUDGET,
    COALESCER,
    JOBS,
    METRICS,
    REPLICAS,
    SETTINGS,
    STATE,
    TRACING,
    TRAFFIC,
    UPSTREAM,
    GatewayState,
)
from inferencehub.gateway.metrics import GatewayMetrics
from inferencehub.gateway.openapi import openapi_document
from inferencehub.gateway.replicas import ReplicaSet
from inferencehub.gateway.siblings import RUN_DIR_ENV, WORKER_ENV
from inferencehub.gateway.status import Traffic, status
from inferencehub.gateway.traced import traced_requests
from inferencehub.gateway.upstream import Upstream, UpstreamError, channel_options
from inferencehub.metadata import REPLICA_KEY, REQUEST_ID_HEADER
from inferencehub.model_state import Desired
from inferencehub.processes import announce
from inferencehub.protocol.inference import grpc_predict_v2_pb2 as pb
from inferencehub.settings import GatewaySettings

log = logging.getLogger(__name__)

REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:/=+-]{1,128}$")
UNPARSED = "(unparsed)"  # the route label of answers given before a request could be routed
CLIENT_CLOSED = 499  # nginx's status for a client that went away before the answer
BINARY_EXTENSION = "binary_tensor_data"
UI_PAGE = (Path(__file__).parent / "ui" / "index.html").read_bytes()


class StartupError(InferenceHubError):
    """The gateway could not start (a port taken...)."""


# --- middlewares ---------------------------------------------------------------------------


@web.middleware
async def observe(request: web.Request, handler) -> web.StreamResponse:
    """Request id in and out, metrics by route template, a log line for every failure."""
    incoming = request.headers.get(REQUEST_ID_HEADER, "")
    request_id = incoming if incoming and REQUEST_ID_PATTERN.match(incoming) else logs.new_request_id()
    token = logs.request_id.set(request_id)
    start = time.perf_counter()
    route = request.match_info.route.resource
    template = route.canonical if route is not None else "unmatched"
    status = CLIENT_CLOSED  # until an answer is made
    response = None
    try:
        response = await handler(request)
        transport = request.transport
        status = CLIENT_CLOSED if transport is None or transport.is_closing() else response.status
        response.headers[REQUEST_ID_HEADER] = request_id
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        elapsed = time.perf_counter() - start
        request.app[METRICS].request(template, request.method, status, elapsed)
        if template.endswith("/infer"):  # the live page's last minute
            replica = response.headers.get(REPLICA_KEY, "") if response is not None else ""
            request.app[TRAFFIC].record(replica, elapsed, status >= 400)
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
    except BodyTimeout as exc:
        response = error_response(408, str(exc))
        response.force_close()
        return response
    except ConnectionError:  # the client hung up (mid-body, or before the answer): not our failure
        return error_response(CLIENT_CLOSED, "the client closed the connection")
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
    body = request.app[METRICS].scrape()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


async def server_live(request: web.Request) -> web.Response:
    response, _ = await call(request, "ServerLive", pb.ServerLiveRequest())
    if not response.live:
        return error_response(503, "the inference service is not live")
    return web.json_response({"live": True})


async def server_ready(request: web.Request) -> web.Response:
    response, _ = await call(request, "ServerReady", pb.ServerReadyRequest())
    if not response.ready:
        return error_response(503, "the inference service is not ready (loading or draining)")
    return web.json_response({"ready": True})


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
    if not response.ready:
        return error_response(503, f"model '{name}' is not ready")
    return web.json_response({"name": name, "ready": True})


async def model_statistics(request: web.Request) -> web.Response:
    """Triton's statistics extension, summed over every replica (see ``gateway.statistics``)."""
    name, version = request.match_info.get("model", ""), request.match_info.get("version", "")
    body, headers = await statistics.gather(
        request.app[REPLICAS],
        request.app[UPSTREAM],
        name,
        version,
        request_id=logs.request_id.get(),
        timeout=deadline(request),
    )
    return web.json_response(body, headers=headers)


async def repository_index(request: web.Request) -> web.Response:
    """Triton's repository index, merged over every replica (see ``gateway.repository``)."""
    doc = repository.parse_body(await request.read(), repository.IndexRequest, "repository index")
    if doc.repository_name:
        return error_response(404, f"repository '{doc.repository_name}' not found: there is one (leave it out)")
    return await repository.index(request.app[REPLICAS], doc.ready, deadline(request))


def forget_model(app: web.Application, name: str) -> None:
    """Drop what this gateway process cached about a model just loaded, replaced or unloaded (its batch size for
    coalescing, its metadata for jobs); other gateway processes refresh theirs within their cache's lifetime."""
    limits = getattr(app[COALESCER], "limits", None)
    queue = app.get(JOBS)
    for cache in (limits, getattr(queue, "metadata", None)):
        if isinstance(cache, dict):
            for key in [k for k in cache if k[0] == name]:
                cache.pop(key, None)


async def repository_load(request: web.Request) -> web.Response:
    """Load (or reload) a model on every replica; an admin action when API keys are on."""
    name = request.match_info["model"]
    action = f"load of model '{name}'"
    doc = repository.parse_body(await request.read(), repository.LoadRequest, action)
    message = repository.load_request(name, doc.parameters)
    replicas = request.app[REPLICAS]
    response, succeeded = await repository.fan_out(replicas, "RepositoryModelLoad", message, deadline(request), action)
    if succeeded:
        forget_model(request.app, name)
        config = doc.parameters.get("config")
        desired = Desired(name, True, config if isinstance(config, str) else None)
        await repository.remember(request.app.get(JOBS), desired, request.app[SETTINGS].jobs_replicas)
    return response


async def repository_unload(request: web.Request) -> web.Response:
    """Unload a model on every replica; an admin action when API keys are on."""
    name = request.match_info["model"]
    action = f"unload of model '{name}'"
    repository.parse_body(await request.read(), repository.LoadRequest, action)  # Triton's unload_dependents: no-op
    message = pb.RepositoryModelUnloadRequest(model_name=name)
    replicas = request.app[REPLICAS]
    response, succeeded = await repository.fan_out(
        replicas, "RepositoryModelUnload", message, deadline(request), action
    )
    if succeeded:
        forget_model(request.app, name)
        await repository.remember(request.app.get(JOBS), Desired(name, False), request.app[SETTINGS].jobs_replicas)
    return response


async def status_json(request: web.Request) -> web.Response:
    """The live status (README: "Live status"): replicas, the last minute's traffic, latency, errors."""
    replicas = request.app[REPLICAS]
    replicas.watch()
    if not replicas.views or any(v.checked == 0 for v in replicas.views.values()):
        await replicas.poll_once()  # answer with each replica's health, not an empty list
    state = request.app[STATE]
    ready = state.started and not state.draining
    window = request.app[TRAFFIC].window()
    streams = [request.app[streaming.STREAMS].window.part()]
    workers: list[dict] = []
    run_dir = os.environ.get(RUN_DIR_ENV)
    if run_dir:  # one of several workers: the whole gateway's minute (see gateway.siblings)
        own = siblings.window_part(window, streams[0], ready=ready, draining=state.draining)
        others, _ = await siblings.gather(Path(run_dir), int(os.environ.get(WORKER_ENV, "0")))
        parts = [own, *others]
        window = siblings.merged(parts)
        streams = [p["streams"] for p in parts]
        workers = sorted(
            (
                {k: p[k] for k in ("pid", "ready", "draining")}
                | {"requests": sum(p["replicas"].values()), "streams": p["streams"]["started"]}
                for p in parts
            ),
            key=lambda w: w["pid"],
        )
    body = status(window, replicas, ready=ready, draining=state.draining, workers=workers)
    queue = request.app.get(JOBS)
    if queue is not None:
        body["jobs"] = await queue.recent_jobs()
    body["streams"] = streaming.summary(streams)
    return web.json_response(body, headers={"Cache-Control": "no-store"})


async def ui(request: web.Request) -> web.Response:
    """The live page: static HTML and JS, no build step, reading /status.json every second."""
    return web.Response(body=UI_PAGE, content_type="text/html", headers={"Cache-Control": "no-store"})


async def infer(request: web.Request) -> web.Response:
    name, version = model_and_version(request)
    encoding = request.headers.get("Content-Encoding", "identity").lower()
    if encoding != "identity":
        return error_response(415, f"Content-Encoding {encoding!r} is not supported; send the body uncompressed")
    timeout = deadline(request)  # checked for jobs too: a deadline header is refused the same way on both paths
    budget = request.app[BODY_BUDGET]
    body, held = await read_body(request, budget, request.app[SETTINGS].max_body_bytes)
    try:  # the body's bytes stay taken while it, its decoded form or its gRPC message is alive
        header_length = rest.parse_header_length(request.headers.get(rest.HEADER_LENGTH), len(body))
        tracer = request.app[TRACING]
        with tracing.NULL if tracer is None else tracer.span("parse"):
            message, plan = rest.parse_infer_request(body, header_length, name, version)
        del body
        wait = jobs.async_preference(request)
        if wait is not None:
            return await jobs.submit(request, message, plan, wait)
        coalescer = request.app[COALESCER]
        response, replica = await coalescer.infer(message, request_id=logs.request_id.get(), timeout=timeout)
        payload, headers = rest.render_infer_response(response, plan)
    finally:
        budget.give_back(held)
    headers[REPLICA_KEY] = replica
    return web.Response(body=payload, headers=headers)


async def expect(request: web.Request) -> web.Response | None:
    """The ``Expect`` header (answered before any middleware runs): 100-continue, or a JSON 417."""
    if request.headers.get("Expect", "").lower() == "100-continue":
        budget, length = request.app[BODY_BUDGET], request.content_length
        if length is not None and not budget.fits(length):  # refused before the client sends its body
            refusal = budget.refusal(length)
            response = error_response(503, refusal.text or "", _kept_headers(refusal))
            response.force_close()
            return response
        if request.version == HttpVersion11:
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # the answer proper has not started
        return None
    response = error_response(417, "the Expect header supports only 100-continue")
    response.force_close()
    return response


def routes() -> list[web.RouteDef]:
    get = functools.partial(web.get, expect_handler=expect)
    table = [
        get("/healthz", healthz),
        get("/readyz", readyz),
        get("/metrics", metrics),
        get("/openapi.json", openapi),
        get("/status.json", status_json),
        get("/ui", ui),
        get("/v2", server_metadata),
        get("/v2/health/live", server_live),
        get("/v2/health/ready", server_ready),
        get("/v2/models/stats", model_statistics),  # before /v2/models/{model}
        web.post("/v2/repository/index", repository_index, expect_handler=expect),
        web.post("/v2/repository/models/{model}/load", repository_load, expect_handler=expect),
        web.post("/v2/repository/models/{model}/unload", repository_unload, expect_handler=expect),
    ]
    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        table += [
            get(prefix, model_metadata),
            get(prefix + "/ready", model_ready),
            get(prefix + "/config", model_config),
            get(prefix + "/stats", model_statistics),
            web.post(prefix + "/infer", infer, expect_handler=expect),
        ]
    return table + generate.routes() + openai_api.routes() + jobs.routes()


# --- the app and its process ---------------------------------------------------------------


async def _upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    app[UPSTREAM] = Upstream(app[SETTINGS], app[METRICS], app[TRACING])
    app[COALESCER] = coalescer_for(app[SETTINGS], app[UPSTREAM], app[METRICS])
    app[REPLICAS] = ReplicaSet(app[SETTINGS].upstream, channel_options(app[SETTINGS]), app[UPSTREAM].tls)
    app[REPLICAS].watch()  # a first look at the replicas, to learn each address's name early
    app[STATE].started = True
    yield
    await app[REPLICAS].close()
    await app[COALESCER].close()
    await app[UPSTREAM].close()
    tracer = app[TRACING]
    if tracer is not None:
        tracer.shutdown()


def check_settings(settings: GatewaySettings) -> None:
    """Settings that contradict each other stop start-up with a message naming them."""
    if not 0 < settings.deadline_seconds <= settings.max_deadline_seconds:
        raise StartupError(
            f"--deadline-seconds ({settings.deadline_seconds:g}) must be positive and at most "
            f"--max-deadline-seconds ({settings.max_deadline_seconds:g})"
        )
    if settings.max_decoding_bytes and not settings.max_body_bytes <= settings.max_decoding_bytes:
        raise StartupError(
            f"--max-decoding-bytes ({settings.max_decoding_bytes}) must be 0 (no limit) or at least "
            f"--max-body-bytes ({settings.max_body_bytes}): a body between the two could never be decoded"
        )


def create_app(settings: GatewaySettings) -> web.Application:
    check_settings(settings)
    tracer = tracing.setup("inferencehub-gateway", settings.otlp_endpoint)
    middlewares = [observe, errors] if tracer is None else [traced_requests(tracer), observe, errors]
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=middlewares)
    app[TRACING] = tracer
    app[SETTINGS] = settings
    app[METRICS] = GatewayMetrics()
    app[BODY_BUDGET] = BodyBudget(settings.max_decoding_bytes)
    app[METRICS].watch(app[METRICS].decoding_bytes, lambda: app[BODY_BUDGET].in_use)
    app[STATE] = GatewayState()
    access = Access.from_settings(settings, app[METRICS].registry)
    if access is not None:  # API keys and rate limits: after observe (ids, metrics), before the routes
        app.middlewares.insert(app.middlewares.index(observe) + 1, access.middleware())
    app.middlewares.insert(app.middlewares.index(observe) + 1, openai_api.openai_errors)  # wraps keys and errors
    app[TRAFFIC] = Traffic()
    streaming.install(app)
    app.cleanup_ctx.append(_upstream_ctx)
    if settings.nats_url:
        jobs.install(app, settings, app[METRICS].registry, app[TRACING])
    app.add_routes(routes())
    return app


def listen(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """The bound, listening HTTP socket on the first address ``host`` resolves to; StartupError if it cannot be.
    ``reuse_port``: shared with the gateway's other workers (SO_REUSEPORT)."""
    try:
        family, _, _, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        return socket.create_server(address, family=family, backlog=128, reuse_port=reuse_port)
    except OSError as exc:
        raise StartupError(f"cannot listen for HTTP on {host}:{port}: {exc.strerror or exc}") from None


async def _refresh_metrics(metrics: GatewayMetrics) -> None:
    while True:
        metrics.refresh()
        await asyncio.sleep(1.0)


async def serve(settings: GatewaySettings) -> None:
    """Run until SIGTERM or SIGINT; then fail /readyz, drain, let in-flight requests finish, and stop."""
    app = create_app(settings)
    limits = Limits(settings.header_timeout_seconds, settings.body_timeout_seconds, settings.max_connections)
    metrics = app[METRICS]

    def record(status: int) -> None:  # answers given before a request reaches the app
        metrics.requests.labels(UNPARSED, "", str(status)).inc()

    run_dir = os.environ.get(RUN_DIR_ENV)  # one of several workers (see gateway.workers)
    # before anything starts: a taken port leaves nothing to undo
    listener = listen(settings.host, settings.port, reuse_port=bool(run_dir))
    runner = GatewayRunner(
        app, limits, record, access_log=None, handle_signals=False, shutdown_timeout=settings.grace_seconds
    )
    metrics.watch(metrics.connections, runner.open_connections)
    part_runner = None
    refresher: asyncio.Task | None = None
    try:
        await runner.setup()
        await web.SockSite(runner, listener).start()
        if run_dir:
            refresher = asyncio.create_task(_refresh_metrics(metrics))
            state = app[STATE]
            traffic = app[TRAFFIC]
            streams = app[streaming.STREAMS].window

            def part() -> dict:
                ready = state.started and not state.draining
                return siblings.window_part(traffic.window(), streams.part(), ready=ready, draining=state.draining)

            part_runner = await siblings.serve_part(Path(run_dir), int(os.environ.get(WORKER_ENV, "0")), part)
        port = runner.addresses[0][1]
        log.info(
            "gateway %s listening: http://%s:%d, upstream %s",
            inferencehub.__version__,
            settings.host,
            port,
            settings.upstream,
        )
        announce(settings.listen_file, "gateway", http=f"{settings.host}:{port}")
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        await stopping.wait()
        app[STATE].draining = True
        log.info("draining for %.1fs", settings.drain_seconds)
        await asyncio.sleep(settings.drain_seconds)
        log.info("closing the listener; in-flight requests have %.1fs to finish", settings.grace_seconds)
        app[streaming.STREAMS].end_open_streams(settings.grace_seconds)
    finally:
        if refresher is not None:
            refresher.cancel()
        await runner.cleanup()
        if part_runner is not None:
            await part_runner.cleanup()
        listener.close()  # already closed once its site has started and stopped; not if setup failed
    log.info("gateway stopped")
