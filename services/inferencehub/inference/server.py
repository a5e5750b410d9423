"""The inference service process: a grpc.aio server with health, reflection and metrics.

Lifecycle:
- start: listen, report NOT_SERVING, load every model, then report SERVING
  (for ``""``, ``inference.GRPCInferenceService`` and each model's name; ``inferencehub.liveness``
  is SERVING throughout, for liveness probes);
- SIGTERM/SIGINT: report NOT_SERVING at once, keep serving for ``drain_seconds`` while
  clients' health checks move traffic away, then refuse new calls, give in-flight
  calls ``grace_seconds`` to finish, and return (the process exits 0).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from inferencehub import model_state, tls, tracing
from inferencehub.errors import InferenceHubError
from inferencehub.inference.control import ModelControl
from inferencehub.inference.engine import Engine, ServedModel, State
from inferencehub.inference.generate import StreamingServicer
from inferencehub.inference.jobs import JobRunner
from inferencehub.inference.load_report import LoadReporter
from inferencehub.inference.metrics import InferenceMetrics
from inferencehub.inference.repository import SHIPPED_MODELS
from inferencehub.inference.servicer import SERVICE_NAME
from inferencehub.inference.streams import HealthServicer, ReflectionServicer
from inferencehub.inference.workers import Workers, cpu_count
from inferencehub.processes import announce
from inferencehub.protocol.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from inferencehub.settings import InferenceSettings

log = logging.getLogger(__name__)

# SERVING from start to exit, whatever the models do: for liveness probes, which must not fail
# while models load or while the replica drains (readiness probes use the other names).
LIVENESS = "inferencehub.liveness"


class StartupError(InferenceHubError):
    """The server could not start (a port taken, a model that fails to load...)."""


def connection_age_grace(settings: InferenceSettings) -> float:
    """How long calls on an aged connection get to finish: at least the longest deadline a call may have.

    When a connection reaches ``max_connection_age`` the server sends GOAWAY (no new calls on it) and closes it
    once its calls end, or when the grace runs out, cutting what still runs. A call that began just before the
    GOAWAY may run its whole deadline; a grace shorter than ``max_deadline_seconds`` cuts calls inside their
    deadline, and the client sees UNAVAILABLE for work the replica did. So the grace defaults to
    ``max_deadline_seconds`` (one value to set, never inconsistent), and a grace set explicitly below it is a
    start-up error rather than a silent cut. A long grace costs nothing: an aged connection closes as soon as
    its last call ends, and new calls go over a new connection at once.
    """
    if settings.max_deadline_seconds <= 0:
        raise StartupError(f"--max-deadline-seconds must be positive, not {settings.max_deadline_seconds:g}")
    grace = settings.max_connection_age_grace_seconds
    if grace == 0:
        return settings.max_deadline_seconds
    if grace < settings.max_deadline_seconds:
        raise StartupError(
            f"--max-connection-age-grace-seconds ({grace:g}) is shorter than --max-deadline-seconds "
            f"({settings.max_deadline_seconds:g}): calls inside their deadline would be cut when their connection "
            "ages out; raise the grace, lower the longest deadline, or leave the grace at 0 (= the longest deadline)"
        )
    return grace


def server_options(settings: InferenceSettings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # Cycle connections so clients behind a headless Service re-resolve and find new replicas; calls on an
        # aged connection finish within their deadline (see connection_age_grace).
        ("grpc.max_connection_age_ms", int(settings.max_connection_age_seconds * 1000)),
        ("grpc.max_connection_age_grace_ms", int(connection_age_grace(settings) * 1000)),
        # Let clients ping (their ping timeout detects a frozen replica); never answer too_many_pings.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
        ("grpc.http2.max_ping_strikes", 0),
        # A taken port is an error, not a second listener sharing it.
        ("grpc.so_reuseport", 0),
    ]


@dataclass
class InferenceServer:
    settings: InferenceSettings
    engine: Engine
    metrics: InferenceMetrics
    server: grpc.aio.Server
    health: HealthServicer
    streams_stopping: asyncio.Event
    port: int
    metrics_port: int
    replica: str
    load_reporter: LoadReporter
    health_server: grpc.aio.Server | None = None  # plaintext, health only (see tls.py and --health-port)
    health_port: int | None = None
    tracing: tracing.Tracing | None = None
    jobs: JobRunner | None = None
    control: ModelControl | None = None
    startup_models: list = field(default_factory=list)  # the configs loaded at start
    ready_versions: dict[str, set[str]] = field(default_factory=dict)  # model -> versions its ready metric is 1 for

    @property
    def health_names(self) -> list[str]:
        return ["", SERVICE_NAME, *self.engine.models]

    async def set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self.health_names:
            await self.health.set(name, status)

    async def model_changed(self, name: str, served: ServedModel | None) -> None:
        """A model started (``served``) or stopped (None) taking traffic: its health name, ready metric and load
        share follow, at start and at run time alike."""
        versions = self.engine.versions.get(name, {}) if served is not None else {}
        for gone in self.ready_versions.pop(name, set()) - set(versions):
            self.metrics.model_ready.labels(name, gone).set(0)
        if served is not None:
            for version, instance in versions.items():
                if instance.scheduler is not None:
                    self.load_reporter.watch({name: instance.scheduler})
                self.metrics.model_ready.labels(name, version).set(1)
            self.ready_versions[name] = set(versions)
            if self.jobs is not None:
                self.jobs.follow(name)
            if self.engine.state is State.SERVING:  # at start, every name turns SERVING together
                await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
            return
        self.load_reporter.forget(name)
        await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def load(self) -> None:
        assert self.control is not None
        shared = None
        if self.settings.nats_url and self.control.mode == "explicit":
            shared = await model_state.read(self.settings.nats_url)  # None (logged) if NATS does not answer
        await self.control.start(self.startup_models, shared)
        await self.set_health(True)
        log.info("replica %s ready: %s", self.replica, ", ".join(self.engine.models))
        if self.settings.nats_url:
            self.jobs = JobRunner(self.settings, self.engine, self.metrics.registry, self.replica, self.tracing)
            self.jobs.start()

    async def stop(self) -> None:
        """Drain, then stop: NOT_SERVING, wait, refuse new calls, let in-flight ones finish."""
        # Jobs stop being pulled at once; held ones finish within the grace, alongside the synchronous drain.
        jobs = asyncio.ensure_future(self.jobs.stop(self.settings.grace_seconds)) if self.jobs else None
        if self.engine.state is State.SERVING:
            self.engine.state = State.DRAINING
            await self.set_health(False)
            log.info("draining for %.1fs", self.settings.drain_seconds)
            await asyncio.sleep(self.settings.drain_seconds)
        log.info("refusing new calls; in-flight calls have %.1fs to finish", self.settings.grace_seconds)
        self.streams_stopping.set()  # open health Watch and reflection streams end now, with OK
        await self.server.stop(self.settings.grace_seconds)
        if self.health_server is not None:
            await self.health_server.stop(0)
        await self.load_reporter.stop()
        if self.control is not None:
            await self.control.stop()
        if jobs is not None:
            await jobs
        await self.engine.close()
        self.engine.workers.close()
        self.metrics.close()
        if self.tracing is not None:
            self.tracing.shutdown()
        log.info("replica %s stopped", self.replica)


def worker_pids(workers: Workers) -> list[int]:
    """The model worker processes' ids (for the CPU share in the load report)."""
    pool = workers.processes
    return list(getattr(pool, "_processes", None) or ()) if pool is not None else []


async def start(settings: InferenceSettings) -> InferenceServer:
    """Listen and report NOT_SERVING; the caller then awaits ``load()``."""
    options = server_options(settings)  # inconsistent connection settings stop start-up here
    secure = tls.server_enabled(settings)
    credentials = tls.server_credentials(settings) if secure else None  # bad TLS files stop start-up here
    client_names = tls.client_names(settings)
    tracer = tracing.setup("inferencehub-inference", settings.otlp_endpoint)  # a bad configuration stops us here
    repository = settings.models or SHIPPED_MODELS
    workers = Workers(settings.threads, settings.processes or cpu_count())
    metrics = InferenceMetrics()
    engine = Engine(workers, metrics, drain_seconds=settings.grace_seconds)
    control = ModelControl(
        engine, repository, settings.model_control_mode, settings.load, settings.repository_poll_seconds
    )
    configs = control.initial()  # a bad repository stops start-up here, before listening

    server = grpc.aio.server(
        options=options,
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs or None,
        interceptors=[tls.ClientNames(client_names)] if client_names else None,
    )
    address = f"{settings.host}:{settings.port}"
    try:
        port = server.add_secure_port(address, credentials) if secure else server.add_insecure_port(address)
    except RuntimeError as exc:
        raise StartupError(f"cannot listen for gRPC on {address}: {exc} (is the port taken?)") from None
    if port == 0:
        raise StartupError(f"cannot listen for gRPC on {address} (is the port taken?)")
    try:
        metrics_port = metrics.serve(settings.host, settings.metrics_port)
    except OSError as exc:
        raise StartupError(f"cannot serve metrics on {settings.host}:{settings.metrics_port}: {exc}") from None
    replica = settings.replica_name or f"{socket.gethostname()}:{port}"

    streams_stopping = asyncio.Event()
    health = HealthServicer(streams_stopping)
    load_reporter = LoadReporter(replica, cpus=cpu_count(), worker_pids=lambda: worker_pids(workers))
    servicer = StreamingServicer(engine, metrics, replica, tracer, load_reporter, control)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(ReflectionServicer(names, streams_stopping), server)
    instance = InferenceServer(
        settings,
        engine,
        metrics,
        server,
        health,
        streams_stopping,
        port,
        metrics_port,
        replica,
        load_reporter,
        tracing=tracer,
        control=control,
        startup_models=configs,
    )
    engine.listener = instance.model_changed
    await health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
    await instance.set_health(False)
    for config in configs:  # each model's name is known, and NOT_SERVING, while it loads
        await health.set(config.name, health_pb2.HealthCheckResponse.NOT_SERVING)
    if settings.health_port >= 0:
        instance.health_server, instance.health_port = await _health_only_server(settings, health)
    await server.start()
    load_reporter.start()
    log.info(
        "replica %s listening: gRPC on %s:%d, metrics on %s:%d; loading %d model(s)",
        replica,
        settings.host,
        port,
        settings.host,
        metrics_port,
        len(configs),
    )
    if instance.health_port is not None or secure:
        log.info(
            "replica %s gRPC port speaks %s; plaintext health-only port: %s",
            replica,
            "mutual TLS only" if secure else "plaintext",
            f"{settings.host}:{instance.health_port}" if instance.health_port is not None else "none",
        )
    if secure:
        log.info(
            "replica %s serves clients whose certificate %s",
            replica,
            f"names one of: {', '.join(sorted(client_names))}"
            if client_names
            else "the client CA signed, whatever its name (--tls-client-names narrows it)",
        )
    addresses = {"grpc": f"{settings.host}:{port}", "metrics": f"{settings.host}:{metrics_port}"}
    if instance.health_port is not None:
        addresses["health"] = f"{settings.host}:{instance.health_port}"
    announce(settings.listen_file, "inference", **addresses)
    return instance


async def _health_only_server(settings: InferenceSettings, health: HealthServicer):
    """A second, plaintext gRPC server carrying only grpc.health.v1: the kubelet's gRPC probe speaks no TLS."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    address = f"{settings.host}:{settings.health_port}"
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise StartupError(f"cannot listen for health checks on {address}: {exc} (is the port taken?)") from None
    if port == 0:
        raise StartupError(f"cannot listen for health checks on {address} (is the port taken?)")
    await server.start()
    return server, port


async def serve(settings: InferenceSettings) -> None:
    """Run until SIGTERM or SIGINT, then drain and stop."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    instance = await start(settings)
    loading = asyncio.ensure_future(instance.load())
    waiting = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait({loading, waiting}, return_when=asyncio.FIRST_COMPLETED)
        if loading.done():
            loading.result()  # a model that failed to load stops start-up
            await waiting
        else:
            loading.cancel()
    finally:
        waiting.cancel()
        await instance.stop()
