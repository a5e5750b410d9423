"""Shared test helpers: real inference replicas as subprocesses on loopback, port 0."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "services" / "inferencehub" / "model_repository"
TEST_MODELS = ROOT / "tests" / "models"
EXAMPLE_MODELS = ROOT / "examples" / "models"
LISTENING = re.compile(r"listening: gRPC on [\d.]+:(\d+), metrics on [\d.]+:(\d+)")


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


class Replica:
    """An inference replica in a subprocess, its log kept for assertions."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "inferencehub.inference",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--metrics-port",
                "0",
                *args,
            ],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        match = wait_for(self._listening, what="the replica to listen")
        self.port, self.metrics_port = int(match.group(1)), int(match.group(2))
        self.target = f"127.0.0.1:{self.port}"

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def _listening(self):
        if self.proc.poll() is not None and not self._reader.is_alive():
            raise AssertionError("replica exited at start:\n" + self.log)
        return next((m for line in list(self.lines) if (m := LISTENING.search(line))), None)

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def wait_serving(self, timeout: float = 60.0) -> Replica:
        wait_for(lambda: self._status() == "SERVING", timeout, what="SERVING")
        return self

    def _status(self) -> str | None:
        if self.proc.poll() is not None:
            raise AssertionError(f"replica exited with {self.proc.returncode}:\n{self.log}")
        try:
            return health_status(self.target)
        except grpc.RpcError:
            return None

    def terminate(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._reader.join(5)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="session")
def replica(tmp_path_factory) -> Iterator[Replica]:
    """One replica serving the shipped models, an echo model of every datatype and the example custom model."""
    repo = model_repository(
        tmp_path_factory.mktemp("models"),
        *sorted(SHIPPED.iterdir()),
        TEST_MODELS / "echo-all",
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
