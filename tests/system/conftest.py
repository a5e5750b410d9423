"""The system tier's harness: real inference replicas, gateways and NATS servers as subprocesses on loopback, port 0.

tests/system holds every test that starts a process, opens a socket or imports tritonclient (``pytest`` alone
runs this folder; ``make test`` runs it after tests/unit, in a process of its own), with the data they use:
``models/`` (test model repositories), ``clients/``, ``api/`` (schemathesis settings) and ``pki.py`` (certificates
made per test). In-process tests of the transport-free code go in tests/unit; tests/containers (the images, root,
``make test-containers``) loads this harness too.

Test processes never import ``inferencehub.protocol``: tritonclient registers the same
``inference.*`` protobuf symbols, and one process cannot hold both. The servers run
in subprocesses, as users run them, and tests speak to them over real sockets.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import functools
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import kubernetes_validate.utils
import numpy as np
import pytest
import yaml
from dnslib import QTYPE, RR, A
from dnslib.server import BaseResolver, DNSLogger, DNSServer
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inferencehub.processes import Child, ChildError, NatsChild, gateway_command, inference_command

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "services" / "inferencehub" / "model_repository"
TEST_MODELS = ROOT / "tests" / "system" / "models"
EXAMPLE_MODELS = ROOT / "examples" / "models"


# The modules that take longest, longest first (``pytest --durations=0`` on 2 cores). ``make test`` runs this tier
# in xdist workers that take units of work in collection order (``--no-loadscope-reorder``): starting the long
# ones first keeps one of them from running alone at the end.
LONGEST_FIRST = [
    "test_local_system",
    "test_load_balancing",
    "test_benchmarks",  # its units are its tests, about a minute at most each
    "test_tls",
    "test_jobs_failures",
    "test_openapi",
    "test_chart",
    "test_access",
    "test_up_supervision",
    "test_model_control",
    "test_streaming_gateway",
    "test_gateway_workers",
    "test_chart_access",
    "test_chart_jobs",
    "test_tracing",
    "test_batching",
    "test_coalescing",
    "test_streaming_replica",
    "test_jobs",
]
# Modules whose tests share nothing: each test a unit of work of its own (the benchmarks run side by side).
EACH_TEST_A_UNIT = {"test_benchmarks"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest modules first; each module keeps its own order."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__, len(rank)))  # stable


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """xdist's scheduler by scope, the scope being the module (its servers and its order stay together) or, in
    EACH_TEST_A_UNIT, the test. (xdist's own ``loadgroup`` cannot group by mark under this pytest.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return nodeid if Path(module).stem in EACH_TEST_A_UNIT else module

    return ByModule(config, log)


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


def failed_start(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run a replica that is expected to stop at start-up (exit code 2 for a bad configuration); its output."""
    return subprocess.run(inference_command(*args), capture_output=True, text=True, timeout=timeout)


class Server(Child):
    """A server subprocess started by the project's harness, its log kept for assertions."""

    def __init__(self, command: list[str], env: dict[str, str] | None = None) -> None:
        super().__init__(command[2], command, env=env)
        try:
            self.addresses = self.wait_listening(60)
        except BaseException as exc:  # a ChildError, or the test's timeout: the server never outlives its test
            self.kill()
            if isinstance(exc, ChildError):
                raise AssertionError(str(exc)) from None
            raise

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
        try:
            wait_for(lambda: self._status() == "SERVING", timeout, what="SERVING")
        except BaseException:  # never serving, or the test's timeout while waiting: no replica is left behind
            self.kill()
            raise
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
        # One serving process unless a test asks for more (--workers, which wins over the env var).
        super().__init__(gateway_command(upstream, *args), {"INFERENCEHUB_GATEWAY_WORKERS": "1", **(env or {})})
        self.port = _port(self.addresses["http"])
        self.url = f"127.0.0.1:{self.port}"
        try:
            wait_for(lambda: self.request("GET", "/readyz").status == 200, what="the gateway to be ready")
        except BaseException:  # as wait_serving: a gateway that never got ready is not left running
            self.kill()
            raise

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
        """The gateway's address, once up says everything is ready and its banner has reached this log (up prints
        the banner, then writes its listen file; the log comes through a pipe and a reader thread, and on a busy
        machine the file can be read first)."""
        try:
            address = self.wait_listening(timeout)["http"]
            self.wait_log(re.escape("Ctrl-C stops everything."), timeout)  # the banner's last line
            return address
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


# --- an emulated headless Service, and load through the gateway ----------------------------------------------

HEADLESS_NAME = "inference.test."  # the replicas' name in the tests' DNS server
FAST_BODY = {"inputs": [{"name": "input", "shape": [2], "datatype": "FP32", "data": [1.0, 2.0]}]}  # models/fast


class DnsRecords(BaseResolver):
    """A-records for one name (changeable while the server runs), as the cluster's DNS gives a headless Service;
    TTL 5 s by default, CoreDNS's for such records."""

    def __init__(self, name: str = HEADLESS_NAME, addresses: list[str] | None = None, ttl: int = 5) -> None:
        self.name, self.addresses, self.ttl = name.rstrip(".") + ".", list(addresses or []), ttl

    def resolve(self, request, handler):
        reply = request.reply()
        if str(request.q.qname) == self.name and request.q.qtype == QTYPE.A:
            for address in list(self.addresses):
                reply.add_answer(RR(self.name, QTYPE.A, rdata=A(address), ttl=self.ttl))
        return reply


@contextlib.contextmanager
def dns_server(records: DnsRecords) -> Iterator[int]:
    """A DNS server on a free loopback port answering ``records``; yields its port."""
    server = DNSServer(records, address="127.0.0.1", port=0, logger=DNSLogger(logf=lambda *_: None))
    server.start_thread()
    try:
        yield server.server.server_address[1]
    finally:
        server.stop()


@pytest.fixture
def dns() -> Iterator[tuple[DnsRecords, int]]:
    """The headless Service's records (empty at first) and the port of the DNS server answering them."""
    records = DnsRecords()
    with dns_server(records) as port:
        yield records, port


def dns_target(dns_port: int, port: int) -> str:
    """The gateway's upstream for replicas behind the tests' DNS server, as for a headless Service."""
    return f"dns://127.0.0.1:{dns_port}/{HEADLESS_NAME.rstrip('.')}:{port}"


@contextlib.contextmanager
def replicas_behind_dns(
    tmp: Path, records: DnsRecords, *args: str, count: int = 3, kind: type[Replica] = Replica
) -> Iterator[dict[str, Replica]]:
    """``count`` replicas of the test model ``fast`` on one port, named r1.. on 127.0.0.2.., serving, with ``records``
    pointing at them (a headless Service's DNS); ``args`` go to each. A test may add more (same port); every one
    is killed at the end."""
    repo = model_repository(tmp / "repository", TEST_MODELS / "fast")
    replicas: dict[str, Replica] = {}
    try:
        first = replicas["r1"] = kind("--models", str(repo), *args, "--replica-name", "r1", host="127.0.0.2")
        for i in range(2, count + 1):
            replicas[f"r{i}"] = kind(
                "--models", str(repo), *args, "--replica-name", f"r{i}", host=f"127.0.0.{i + 1}", port=first.port
            )
        for replica in replicas.values():
            replica.wait_serving()
        records.addresses = [f"127.0.0.{i + 1}" for i in range(1, count + 1)]
        yield replicas
    finally:
        for replica in replicas.values():
            replica.kill()


class Load:
    """Requests through the gateway from a few threads until stopped (bounded by ``seconds``)."""

    def __init__(self, gateway: Gateway, threads: int = 8, seconds: float = 30.0) -> None:
        self.gateway = gateway
        self.statuses: collections.Counter[int] = collections.Counter()
        self.replicas: collections.Counter[str] = collections.Counter()
        self.stopping = threading.Event()
        self.deadline = time.monotonic() + seconds
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for thread in self.threads:
            thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set() and time.monotonic() < self.deadline:
            try:
                response = self.gateway.request("POST", "/v2/models/fast/infer", FAST_BODY, timeout=40)
                status, replica = response.status, response.headers.get("x-inferencehub-replica", "")
            except OSError:
                status, replica = -1, ""
            with self.lock:
                self.statuses[status] += 1
                self.replicas[replica] += 1

    def stop(self) -> collections.Counter[int]:
        self.stopping.set()
        return self.finish()

    def finish(self) -> collections.Counter[int]:
        """Wait until the load has run its ``seconds``."""
        for thread in self.threads:
            thread.join(60 + max(0.0, self.deadline - time.monotonic()))
        return self.statuses


def check_drill(statuses: collections.Counter[int], sig: signal.Signals, threads: int = 8) -> None:
    """A draining replica (SIGTERM) costs no request. A replica that dies or freezes fails the calls it was
    running, each once, with a 503 (the gateway never replays a call a replica may have begun): at most one
    per client thread; every other request succeeds."""
    allowed = {200} if sig == signal.SIGTERM else {200, 503}
    assert set(statuses) <= allowed and statuses[503] <= threads, f"{sig.name}: {statuses}"
    assert statuses[200] > 50, f"{sig.name}: {statuses}"


def drill(gateway: Gateway, proc: subprocess.Popen, sig: signal.Signals, threads: int = 8) -> None:
    """Send ``sig`` to a replica while load runs through the gateway: once requests flow, and until 60 more have
    succeeded after the signal (the other replicas took over); then every request is accounted for (check_drill)."""
    load = Load(gateway, threads)
    try:
        wait_for(lambda: load.statuses[200] >= 20, timeout=30, interval=0.02, what="load through the gateway")
        before = load.statuses[200]
        proc.send_signal(sig)
        wait_for(lambda: load.statuses[200] >= before + 60, timeout=30, interval=0.02, what="requests after the signal")
    finally:
        statuses = load.stop()
    check_drill(statuses, sig, threads)


def served_by(gateway: Gateway, count: int) -> collections.Counter[str]:
    seen: collections.Counter[str] = collections.Counter()
    for _ in range(count):
        response = gateway.request("POST", "/v2/models/fast/infer", FAST_BODY)
        assert response.status == 200, response
        seen[response.headers["x-inferencehub-replica"]] += 1
    return seen


# --- the Helm chart: renders, and processes started as the rendered manifests say ----------------------------

CHART = ROOT / "charts" / "inferencehub"
TOOLS = ROOT / ".cache" / "tools"
HELMS = {"helm3": TOOLS / "helm-3" / "helm", "helm4": TOOLS / "helm-4" / "helm"}
NAMESPACE = "demo"
RELEASE = "inferencehub"
KUBERNETES = ["1.29.0", "1.37.0"]  # the oldest supported and the newest bundled schemas

# kubernetes_validate reads and parses its schema files (the shared definitions are megabytes of JSON) on every
# call; the chart tests validate hundreds of objects, so each file is parsed once per test process. The schemas
# are only read (jsonschema never changes them), so sharing the parsed ones changes no verdict.
kubernetes_validate.utils.schema_contents = functools.lru_cache(maxsize=None)(kubernetes_validate.utils.schema_contents)


def helm(version: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([str(HELMS[version]), *args], capture_output=True, text=True, timeout=60)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def validate_strictly(objects: list[dict], kubernetes: str) -> None:
    """Every rendered object against the Kubernetes version's schema, strictly (no unknown field); objects of
    CRDs the schemas lack: a ServiceMonitor's endpoint, an HTTPRoute's fields (check_http_route); cert-manager's
    are the chart access tests' to check."""
    for obj in objects:
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            assert obj["kind"] == "ServiceMonitor" and obj["spec"]["endpoints"][0]["path"] == "/metrics"
        elif obj["apiVersion"].startswith("gateway.networking.k8s.io/"):
            check_http_route(obj)
        elif obj["apiVersion"] != "cert-manager.io/v1":
            kubernetes_validate.validate(obj, kubernetes, strict=True)


def check_http_route(route: dict) -> None:
    """The fields of gateway.networking.k8s.io/v1 HTTPRoute the chart writes, as the v1 CRD defines them."""
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1" and route["kind"] == "HTTPRoute"
    spec = route["spec"]
    assert set(spec) <= {"parentRefs", "hostnames", "rules"}
    assert spec["parentRefs"] and all(
        set(ref) <= {"group", "kind", "name", "namespace", "sectionName", "port"} for ref in spec["parentRefs"]
    )
    for rule in spec["rules"]:
        assert set(rule) <= {"matches", "backendRefs", "timeouts", "filters"}
        for match in rule["matches"]:
            assert match["path"]["type"] in ("PathPrefix", "Exact") and match["path"]["value"].startswith("/")
        for ref in rule["backendRefs"]:
            assert set(ref) == {"name", "port"} and 1 <= ref["port"] <= 65535
        for key, value in rule.get("timeouts", {}).items():
            assert key in ("request", "backendRequest") and re.fullmatch(r"([0-9]{1,5}(h|m|s|ms)){1,4}", value)


def render(version: str = "helm3", values: list[str] | None = None) -> list[dict]:
    out = helm(version, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *(values or [])).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict], kind: str, component: str) -> dict:
    found = [o for o in by_kind(objects, kind) if o["metadata"]["labels"]["app.kubernetes.io/component"] == component]
    assert len(found) == 1, f"{kind} {component}: {len(found)}"
    return found[0]


def without_random_passwords(objects: list[dict]) -> list[dict]:
    """The objects with the job queue's generated NATS passwords (random at each render) blanked."""
    blanked = []
    for obj in objects:
        if obj["kind"] == "Secret" and obj["metadata"]["name"].endswith("-nats-auth"):
            obj = {**obj, "data": dict.fromkeys(obj["data"], "")}
        blanked.append(obj)
    return blanked


class Manifested(Server):
    """A process started with the command, args and env of a rendered container."""

    def __init__(self, container: dict, env_overrides: dict[str, str]) -> None:
        env = {}
        for item in container["env"]:
            if "value" in item:
                env[item["name"]] = item["value"]
            elif "secretKeyRef" in item["valueFrom"]:  # the job queue's password (no NATS server here)
                env[item["name"]] = "from-the-secret"
            else:  # the Downward API's pod name
                assert item["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
                env[item["name"]] = f"{container['name']}-pod-0"
        env.update(env_overrides)
        assert container["command"] == ["inferencehub"]
        super().__init__([sys.executable, "-m", "inferencehub", *container["args"]], env)


def grpc_probe(target: str, service: str) -> bool:
    try:
        return health_status(target, service) == "SERVING"
    except Exception:
        return False


def http_status(host: str, port: int, path: str) -> int:
    try:
        conn = http.client.HTTPConnection(host, port, timeout=2)
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return 0


# --- token streams (issue 21): the shipped generative mock, timed for a test -------------------------------------


def mock_llm_repository(
    tmp: Path, first_token_ms: float = 5.0, token_ms: float = 5.0, also: tuple[str, ...] = ()
) -> Path:
    """A model repository holding the shipped ``mock-llm`` with near-fixed first-token and per-token latencies, and
    links to the shipped models named in ``also``."""
    tmp.mkdir(parents=True, exist_ok=True)
    for name in also:
        (tmp / name).symlink_to(SHIPPED / name)
    shutil.copytree(SHIPPED / "mock-llm", tmp / "mock-llm")  # a copy: model_repository links, and this edits
    repo = tmp
    config_path = repo / "mock-llm" / "config.json"
    config = json.loads(config_path.read_text())
    for name, ms in (("first_token_latency", first_token_ms), ("token_latency", token_ms)):
        config["parameters"][name] = {"distribution": "lognormal", "median_ms": ms, "sigma": 0.01}
    config_path.write_text(json.dumps(config))
    return repo


@contextlib.contextmanager
def llm_serving(folder: Path, name: str, first_token_ms: float, token_ms: float, also: tuple[str, ...] = ()):
    """A replica named ``name`` serving ``mock-llm`` at that pace (and ``also``), and a gateway in front of it:
    ``(replica, gateway)``, both stopped at the end."""
    repo = mock_llm_repository(folder, first_token_ms=first_token_ms, token_ms=token_ms, also=also)
    replica = Replica("--models", str(repo), "--replica-name", name)
    try:
        replica.wait_serving()
        gateway = Gateway(f"ipv4:{replica.target}")
        try:
            yield replica, gateway
        finally:
            gateway.stop()
    finally:
        replica.stop()


def rss_bytes(pid: int) -> int:
    """A process's resident set size, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")
