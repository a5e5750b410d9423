"""Shared test helpers: real inference replicas and gateways as subprocesses on loopback, port 0.

Test processes never import ``inferencehub.protocol``: tritonclient registers the same
``inference.*`` protobuf symbols, and one process cannot hold both. The servers run
in subprocesses, as users run them, and tests speak to them over real sockets.
"""

from __future__ import annotations

import contextlib
import csv
import http.client
import json
import os
import re
import signal
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inferencehub.processes import Child, ChildError, NatsChild, gateway_command, inference_command

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


def _parents() -> dict[int, int]:
    """Every process's parent, from /proc (Linux)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            found[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return found


def children_of(pid: int) -> set[int]:
    return {child for child, parent in _parents().items() if parent == pid}


def descendants(pid: int) -> set[int]:
    """Children, their children, and so on (a snapshot: take it before the parent dies)."""
    parents = _parents()
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def start_time(pid: int) -> str:
    """When the process started (in clock ticks since boot; "" if it is gone): with the pid, names one process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet collected by whoever adopted it, is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def model_repository(tmp: Path, *folders: Path) -> Path:
    """A model repository in ``tmp`` made of links to the given model folders."""
    tmp.mkdir(parents=True, exist_ok=True)
    for folder in folders:
        (tmp / folder.name).symlink_to(folder)
    return tmp


def build_example_models(out: Path) -> Path:
    """The example scikit-learn and ONNX models, built into ``out`` by the project's script (a few seconds)."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "build_models.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return out


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


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class NatsServer(NatsChild):
    """A nats-server with JetStream on a loopback port, its store in a temporary folder; ready once it says so."""

    def __init__(self, store: Path, *args: str) -> None:
        self.store = store
        self.args = args
        super().__init__("nats", str(store), *args)
        try:
            self.url = self.wait_listening(60)["nats"]
            self.wait_log("Server is ready", 60)  # JetStream up (a cluster node: its quorum found)
        except ChildError as exc:
            self.kill()
            raise AssertionError(str(exc)) from None
        self.port = int(self.url.rsplit(":", 1)[1])

    def check_running(self) -> None:
        if not self.running:
            raise AssertionError(f"nats-server exited with {self.returncode}:\n{self.log}")


def nats_cluster(tmp: Path, size: int = 3) -> list[NatsServer]:
    """A JetStream cluster of ``size`` nats-server processes routed to each other on loopback."""
    ports = [free_port() for _ in range(size)]
    routes = ",".join(f"nats://127.0.0.1:{p}" for p in ports)
    servers: list[NatsServer] = []
    procs = []
    # The nodes must start together: each waits for a quorum before it says it is ready.
    for i, port in enumerate(ports):
        procs.append(
            threading.Thread(
                target=lambda i=i, port=port: servers.append(
                    NatsServer(
                        tmp / f"node{i}",
                        "--name",
                        f"node{i}",
                        "--cluster_name",
                        "inferencehub-test",
                        "--cluster",
                        f"nats://127.0.0.1:{port}",
                        "--routes",
                        routes,
                    )
                )
            )
        )
    for thread in procs:
        thread.start()
    for thread in procs:
        thread.join(60)
    if len(servers) != size:
        for server in servers:
            server.stop()
        raise AssertionError("the NATS cluster did not start")
    return sorted(servers, key=lambda s: s.args[1])


@pytest.fixture(scope="module")
def nats(tmp_path_factory) -> Iterator[NatsServer]:
    """A single-node NATS server with JetStream, for one test module."""
    server = NatsServer(tmp_path_factory.mktemp("nats"))
    try:
        yield server
    finally:
        server.stop()


JOB_UNKNOWN_ID = "0123456789abcdef0123456789abcdef"
JOB_FINAL = {"succeeded", "failed", "cancelled"}


def job_queue_ready(gateway: Gateway) -> bool:
    """The gateway's job queue answers (an unknown job is 404, not 503)."""
    return gateway.request("GET", f"/v2/jobs/{JOB_UNKNOWN_ID}").status == 404


CLI = [sys.executable, "-m", "inferencehub"]


class Up(Child):
    """``inferencehub up`` as a user runs it; its banner and its children's prefixed logs in one log. Where
    everything listens, and the children's pids, come from its listen file (rewritten after each restart)."""

    def __init__(self, *args: str) -> None:
        super().__init__("up", [*CLI, "up", *args])
        self.seen: dict[int, str] = {}  # every process seen under it, and when it started: finish() ends them

    def wait_up(self, timeout: float = 90) -> str:
        """The gateway's address, once up says everything is ready."""
        try:
            return self.wait_listening(timeout)["http"]
        except ChildError as exc:
            raise AssertionError(str(exc)) from None

    def announced(self) -> dict:
        return json.loads(self.listen_file.read_text())

    def snapshot(self) -> set[int]:
        """Every process under up now (its children and theirs)."""
        found = descendants(self.pid)
        self.seen.update({pid: started for pid in found if (started := start_time(pid))})
        return found

    def wait_line(self, text: str, timeout: float = 60) -> str:
        """The first log line containing ``text`` (AssertionError if up exits or the time passes first)."""
        try:
            return self.wait_log(re.escape(text), timeout).string
        except ChildError as exc:
            raise AssertionError(str(exc)) from None

    def finish(self) -> None:
        """However the test went: SIGKILL up and anything of its that is still running, by pid."""
        if self.running:
            self.snapshot()
        self.kill()
        for pid, started in self.seen.items():
            if alive(pid) and start_time(pid) == started:  # that process, not another that got its pid
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def start_up() -> Iterator:
    """Start ``inferencehub up`` with the given arguments; whatever happens, nothing of it outlives the test."""
    started: list[Up] = []

    def start(*args: str) -> Up:
        started.append(Up(*args))
        return started[-1]

    yield start
    for up in started:
        up.finish()


# --- data and metric helpers shared by several test modules --------------------------------------------------

ALL_DATATYPES = [
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
]


def sample(datatype: str, n: int = 5) -> np.ndarray:
    if datatype == "BOOL":
        return np.array([True, False, True, True, False][:n])
    if datatype == "BYTES":
        return np.array([b"a", b"", "héllo".encode(), b"\x00\xff", b"z" * 300][:n], dtype=object)
    np_dtype = np.dtype(datatype.replace("FP", "float").replace("UINT", "uint").replace("INT", "int").lower())
    info = np.iinfo(np_dtype) if np_dtype.kind in "iu" else np.finfo(np_dtype)
    return np.array([info.min, info.max, 0, 1, 2][:n], dtype=np_dtype)


def held_out_iris() -> tuple[np.ndarray, np.ndarray]:
    with (ROOT / "data" / "iris.csv").open() as f:
        rows = list(csv.reader(f))[1:]
    classes = ["setosa", "versicolor", "virginica"]
    test = [r for i, r in enumerate(rows) if i % 5 == 4]
    x = np.array([[float(v) for v in r[:4]] for r in test], dtype=np.float32)
    y = np.array([classes.index(r[4]) for r in test], dtype=np.int64)
    return x, y


TYPED_FIELDS = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}  # the OIP's typed field of each datatype, written out here rather than taken from the code under test


IRIS_ROW = {"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}


def scrape(replica) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{replica.metrics_port}/metrics", timeout=5).read().decode()


def sample_value(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
