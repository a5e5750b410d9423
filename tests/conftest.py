"""Shared test helpers: real inference replicas and gateways as subprocesses on loopback, port 0.

Test processes never import ``inferencehub.protocol``: tritonclient registers the same
``inference.*`` protobuf symbols, and one process cannot hold both. The servers run
in subprocesses, as users run them, and tests speak to them over real sockets.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inferencehub.processes import Child, ChildError, gateway_command, inference_command

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "services" / "inferencehub" / "model_repository"
TEST_MODELS = ROOT / "tests" / "models"
EXAMPLE_MODELS = ROOT / "examples" / "models"


def wait_for(condition, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):
    """Poll ``condition`` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def model_repository(tmp: Path, *folders: Path) -> Path:
    """A model repository in ``tmp`` made of links to the given model folders."""
    tmp.mkdir(parents=True, exist_ok=True)
    for folder in folders:
        (tmp / folder.name).symlink_to(folder)
    return tmp


def health_status(target: str, service: str = "", timeout: float = 2.0) -> str:
    with grpc.insecure_channel(target) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout
        )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


class Server(Child):
    """A server subprocess started by the project's harness, its log kept for assertions."""

    def __init__(self, command: list[str], env: dict[str, str] | None = None) -> None:
        super().__init__(command[2], command, env=env)
        try:
            self.addresses = self.wait_listening(60)
        except ChildError as exc:
            self.kill()
            raise AssertionError(str(exc)) from None

    def check_running(self) -> None:
        if not self.running:
            raise AssertionError(f"server exited with {self.returncode}:\n{self.log}")


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


class Replica(Server):
    """An inference replica."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(inference_command(*args, host=host, port=port), env)
        self.port, self.metrics_port = _port(self.addresses["grpc"]), _port(self.addresses["metrics"])
        self.target = f"{host}:{self.port}"

    def wait_serving(self, timeout: float = 60.0) -> Replica:
        wait_for(lambda: self._status() == "SERVING", timeout, what="SERVING")
        return self

    def _status(self) -> str | None:
        self.check_running()
        try:
            return health_status(self.target)
        except grpc.RpcError:
            return None


class Gateway(Server):
    """An HTTP gateway."""

    def __init__(self, upstream: str, *args: str, env: dict[str, str] | None = None) -> None:
        super().__init__(gateway_command(upstream, *args), env)
        self.port = _port(self.addresses["http"])
        self.url = f"127.0.0.1:{self.port}"
        wait_for(lambda: self.request("GET", "/readyz").status == 200, what="the gateway to be ready")

    def request(
        self,
        method: str,
        path: str,
        body: bytes | str | dict | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 30,
    ) -> Response:
        self.check_running()
        if isinstance(body, dict):
            body = json.dumps(body)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            raw = conn.getresponse()
            return Response(raw.status, {k.lower(): v for k, v in raw.getheaders()}, raw.read())
        finally:
            conn.close()


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.body[:300]!r}>"


@pytest.fixture(scope="session")
def replica(tmp_path_factory) -> Iterator[Replica]:
    """One replica serving the shipped models, an echo model of every datatype and the example custom model."""
    repo = model_repository(
        tmp_path_factory.mktemp("models"),
        *sorted(SHIPPED.iterdir()),
        TEST_MODELS / "echo-all",
        TEST_MODELS / "echo-typed",
        EXAMPLE_MODELS / "word-count",
    )
    server = Replica(
        "--models",
        str(repo),
        "--replica-name",
        "replica-under-test",
        "--processes",
        "2",
        "--max-message-bytes",
        str(4 * 1024 * 1024),
    )
    try:
        yield server.wait_serving()
    finally:
        server.terminate()
        server.kill()


@pytest.fixture(scope="session")
def gateway(replica) -> Iterator[Gateway]:
    """A gateway in front of the session's replica."""
    server = Gateway(
        f"ipv4:{replica.target}",
        "--max-message-bytes",
        str(4 * 1024 * 1024),
        "--max-body-bytes",
        str(8 * 1024 * 1024),
    )
    try:
        yield server
    finally:
        server.stop()
