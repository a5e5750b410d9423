"""Hostile clients and sloppy networks: small requests declaring huge tensors, slow or stalled clients, framings
the HTTP parser refuses, clients that hang up. Each costs its sender an error, never the server its memory,
its health answers or anybody else's requests."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from conftest import ALL_DATATYPES, TYPED_FIELDS, Gateway, Replica, health_status, wait_for

BILLIONS = 3_000_000_000  # elements declared; a request carries a handful of bytes


class HealthProbe:
    """Asks for health in a loop on a thread, recording how long each answer took."""

    def __init__(self, ask) -> None:
        self.ask, self.times, self.failures = ask, [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.perf_counter()
            try:
                self.ask()
            except Exception as exc:  # recorded, asserted on
                self.failures.append(repr(exc))
            self.times.append(time.perf_counter() - start)
            time.sleep(0.005)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


def _http_json_requests() -> list[tuple[str, bytes, dict]]:
    out = []
    for t in ALL_DATATYPES:
        value = "a" if t == "BYTES" else (True if t == "BOOL" else 1)
        body = {"inputs": [{"name": f"in_{t.lower()}", "shape": [BILLIONS], "datatype": t, "data": [value]}]}
        out.append((t, json.dumps(body).encode(), {}))
    return out


def _http_binary_requests() -> list[tuple[str, bytes, dict]]:
    out = []
    for t in ALL_DATATYPES:
        blob = struct.pack("<I", 1) + b"a" if t == "BYTES" else bytes(8)
        header = {
            "inputs": [
                {
                    "name": f"in_{t.lower()}",
                    "shape": [BILLIONS],
                    "datatype": t,
                    "parameters": {"binary_data_size": len(blob)},
                }
            ]
        }
        head = json.dumps(header).encode()
        out.append((t, head + blob, {"Inference-Header-Content-Length": str(len(head))}))
    return out


def _grpc_requests(typed: bool) -> list[tuple[str, pb.ModelInferRequest]]:
    out = []
    for t in ALL_DATATYPES:
        if typed and t not in TYPED_FIELDS:
            continue
        request = pb.ModelInferRequest(model_name="echo-all")
        tensor = request.inputs.add(name=f"in_{t.lower()}", datatype=t, shape=[BILLIONS])
        if typed:
            value = b"a" if t == "BYTES" else (True if t == "BOOL" else 1)
            getattr(tensor.contents, TYPED_FIELDS[t]).append(value)
        else:
            request.raw_input_contents.append(struct.pack("<I", 1) + b"a" if t == "BYTES" else bytes(8))
        out.append((t, request))
    return out


def _assert_bounded(process, before_mib: float, before_cpu: float, probe: HealthProbe, took: list[float]) -> None:
    """Memory and CPU in proportion to the bytes sent, health answered throughout. CPU time, not wall time, bounds
    the work (wall time on a shared machine measures the machine): the server's CPU over the run, the hostile
    requests and the health answers together, stays within 10 ms per request, where allocating or filling
    billions of elements would take seconds."""
    grown = process.rss_mib(peak=True) - before_mib
    assert grown < 10, f"peak RSS grew by {grown:.1f} MiB"
    assert not probe.failures, probe.failures[:3]
    assert probe.times, "health was never asked"
    answered = len(took) + len(probe.times)
    per_request = (process.cpu_seconds() - before_cpu) / answered
    assert per_request < 0.01, f"{per_request * 1000:.1f} ms of CPU per request ({answered} requests)"
    slowest = max(max(probe.times), max(took))
    assert slowest < 1.0, f"an answer took {slowest * 1000:.0f} ms: something blocked the server"


@pytest.mark.parametrize("form", ["json", "binary"])
def test_http_requests_declaring_billions_of_elements_cost_nothing(gateway, form):
    requests = _http_json_requests() if form == "json" else _http_binary_requests()
    before, before_cpu = gateway.rss_mib(peak=True), gateway.cpu_seconds()
    took = []
    with HealthProbe(lambda: urllib.request.urlopen(f"http://{gateway.url}/healthz", timeout=2).read()) as probe:
        for datatype, body, headers in requests:
            assert len(body) < 1024
            start = time.perf_counter()
            response = gateway.request("POST", "/v2/models/echo-all/infer", body, headers)
            took.append(time.perf_counter() - start)
            assert response.status == 400, (datatype, response)
            assert f"in_{datatype.lower()}" in response.json()["error"], (datatype, response)
    _assert_bounded(gateway, before, before_cpu, probe, took)


@pytest.mark.parametrize("form", ["raw", "typed"])
def test_grpc_requests_declaring_billions_of_elements_cost_nothing(replica, form):
    before, before_cpu = replica.rss_mib(peak=True), replica.cpu_seconds()
    took = []
    with grpc.insecure_channel(replica.target) as channel, HealthProbe(lambda: health_status(replica.target)) as probe:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for datatype, request in _grpc_requests(typed=form == "typed"):
            assert request.ByteSize() < 1024
            start = time.perf_counter()
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(request, timeout=10)
            took.append(time.perf_counter() - start)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (datatype, err.value)
            assert f"in_{datatype.lower()}" in err.value.details(), (datatype, err.value.details())
    _assert_bounded(replica, before, before_cpu, probe, took)


# --- slow, stalled and hostile connections -----------------------------------------------------


@pytest.fixture(scope="module")
def strict_gateway(replica):
    """A gateway with short read deadlines and few connections, so the limits show in seconds."""
    server = Gateway(
        f"ipv4:{replica.target}",
        "--header-timeout-seconds",
        "1",
        "--body-timeout-seconds",
        "1",
        "--max-connections",
        "8",
    )
    try:
        yield server
    finally:
        server.stop()


def exchange(port: int, parts: list[bytes], pause: float = 0.0, wait: float = 10.0) -> tuple[float, bytes]:
    """Send ``parts`` (``pause`` seconds apart), then read until the server closes; (seconds, what came back)."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        for part in parts:
            try:
                sock.sendall(part)
            except OSError:
                break
            time.sleep(pause)
        received = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            received += chunk
    return time.monotonic() - start, received


def status_and_error(received: bytes) -> tuple[int, str]:
    head, _, body = received.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    document = json.loads(body)
    assert set(document) == {"error"}, (document, received)
    return status, document["error"]


INFER = b"POST /v2/models/iris/infer HTTP/1.1\r\nHost: gateway\r\n"


def test_stalled_and_dripped_requests_are_cut_at_the_configured_time(strict_gateway):
    port = strict_gateway.port
    headers_dripped = [INFER, b"X-One: 1\r\n", b"X-Two: 2\r\n", b"X-Three: 3\r\n", b"X-Four: 4\r\n"]
    cases = {
        "headers a line at a time": (headers_dripped, 0.6),
        "a body shorter than its Content-Length": ([INFER + b"Content-Length: 100\r\n\r\n", b'{"inputs": '], 0),
        "a body dripped a byte at a time": ([INFER + b"Content-Length: 40\r\n\r\n", *[b"{"] * 40], 0.3),
    }
    for case, (parts, pause) in cases.items():
        took, received = exchange(port, parts, pause)
        assert 0.9 < took < 4, (case, took)  # cut after the 1 s limit, and not much later
        status, message = status_and_error(received)
        assert status == 408 and "within 1s" in message, (case, status, message)
    assert strict_gateway.request("GET", "/healthz").status == 200


def test_open_connections_are_bounded(strict_gateway):
    held = []
    try:
        for _ in range(8):  # each answered once, then kept open (keep-alive): surely counted
            sock = socket.create_connection(("127.0.0.1", strict_gateway.port), timeout=5)
            held.append(sock)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: g\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        _, received = exchange(strict_gateway.port, [b"GET /healthz HTTP/1.1\r\nHost: g\r\n\r\n"], wait=5)
        status, message = status_and_error(received)
        assert status == 503 and "connections" in message
    finally:
        for sock in held:
            sock.close()
    wait_for(lambda: strict_gateway.request("GET", "/healthz").status == 200, timeout=5, what="a free connection")
    assert 'route="(unparsed)",status="503"' in strict_gateway.request("GET", "/metrics").body.decode()


SECRET = b"s3cr3t-input"
FRAMINGS = {
    "duplicate Content-Length": (INFER + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello", 400),
    "non-numeric Content-Length": (INFER + b"Content-Length: " + SECRET + b"\r\n\r\nhello", 400),
    "Content-Length with chunked": (INFER + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\nhello", 400),
    "bad chunk size": (INFER + b"Transfer-Encoding: chunked\r\n\r\n" + SECRET + b"\r\nhello\r\n", 400),
    "control bytes in a header": (INFER + b"X-Thing: a\x01" + SECRET + b"\r\n\r\n", 400),
    "oversized header": (INFER + b"X-Big: " + SECRET * 2000 + b"\r\n\r\n", 431),
    "not HTTP at all": (b"\x16\x03\x01" + SECRET + b"\r\n\r\n", 400),
    "bad request line": (b"GET /" + SECRET + b" HTTQ/1.1\r\n\r\n", 400),
}


@pytest.mark.parametrize("framing", FRAMINGS)
def test_framings_the_parser_refuses_get_json_errors_without_echo(strict_gateway, framing):
    raw, expected = FRAMINGS[framing]
    lines_before = len(strict_gateway.lines)
    _, received = exchange(strict_gateway.port, [raw])
    status, message = status_and_error(received)
    assert status == expected, (status, message)
    assert SECRET.decode() not in message and SECRET not in received
    logged = list(strict_gateway.lines)[lines_before:]
    assert not any("Traceback" in line or " ERROR " in line for line in logged), logged
    metrics = strict_gateway.request("GET", "/metrics").body.decode()
    assert f'route="(unparsed)",status="{expected}"' in metrics


def test_a_client_that_hangs_up_mid_body_is_a_499_not_a_server_error(strict_gateway):
    lines_before = len(strict_gateway.lines)
    with socket.create_connection(("127.0.0.1", strict_gateway.port)) as sock:
        sock.sendall(INFER + b"Content-Length: 1000\r\n\r\n" + b'{"inputs": [')
        time.sleep(0.2)

    def counted() -> bool:
        text = strict_gateway.request("GET", "/metrics").body.decode()
        return 'route="/v2/models/{model}/infer",status="499"' in text

    wait_for(counted, timeout=5, what="the 499 to be counted")
    metrics = strict_gateway.request("GET", "/metrics").body.decode()
    assert 'route="/v2/models/{model}/infer",status="500"' not in metrics
    logged = list(strict_gateway.lines)[lines_before:]
    assert not any("Traceback" in line or " ERROR " in line for line in logged), logged


@pytest.mark.parametrize("value", ["\u00b3", "\u0663", "-5", "1e3", "5 ms", "0"])
def test_deadline_header_takes_only_ascii_digits(gateway, value):
    body = {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    response = gateway.request(
        "POST", "/v2/models/iris/infer", body, {"X-InferenceHub-Deadline-Ms": value.encode().decode("latin-1")}
    )
    assert response.status == 400, response
    assert "X-InferenceHub-Deadline-Ms" in response.json()["error"]


def test_bytes_outputs_are_exact_or_refused_naming_the_output(gateway):
    blob = struct.pack("<I", 3) + b"\xff\xfeA" + struct.pack("<I", 2) + "é".encode()
    header = {
        "inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": len(blob)}}],
        "outputs": [{"name": "upper"}],
    }
    head = json.dumps(header).encode()
    as_json = gateway.request(
        "POST", "/v2/models/word-count/infer", head + blob, {"Inference-Header-Content-Length": str(len(head))}
    )
    assert as_json.status == 400, as_json
    assert "'upper'" in as_json.json()["error"] and "binary_data" in as_json.json()["error"]

    header["outputs"] = [{"name": "upper", "parameters": {"binary_data": True}}]
    head = json.dumps(header).encode()
    exact = gateway.request(
        "POST", "/v2/models/word-count/infer", head + blob, {"Inference-Header-Content-Length": str(len(head))}
    )
    assert exact.status == 200, exact
    length = int(exact.headers["inference-header-content-length"])
    out = json.loads(exact.body[:length])["outputs"][0]
    assert out["name"] == "upper" and out["parameters"]["binary_data_size"] == len(blob)
    assert exact.body[length:] == struct.pack("<I", 3) + b"\xff\xfeA" + struct.pack("<I", 2) + "é".encode().upper()


def test_a_replica_with_open_streams_stops_quietly_and_promptly(tmp_path):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    from conftest import SHIPPED, model_repository

    replica = Replica("--models", str(model_repository(tmp_path, SHIPPED / "iris")), "--drain-seconds", "0.2")
    try:
        replica.wait_serving()
        with grpc.insecure_channel(replica.target) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            hold = threading.Event()

            def asks():
                yield reflection_pb2.ServerReflectionRequest(list_services="")
                hold.wait(30)

            reflect = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(asks())
            assert next(reflect).list_services_response.service
            start = time.monotonic()
            replica.proc.send_signal(15)
            statuses = [reply.status for reply in watch]  # NOT_SERVING, then the stream ends with OK
            assert statuses == [health_pb2.HealthCheckResponse.NOT_SERVING]
            assert list(reflect) == []  # ends with OK too
            hold.set()
            assert replica.proc.wait(15) == 0
            assert time.monotonic() - start < 5  # not held for the 10 s grace
    finally:
        replica.kill()
    assert "Traceback" not in replica.log and " ERROR " not in replica.log, replica.log[-2000:]


def test_models_whose_modules_share_a_name_each_run_their_own_code(tmp_path):
    repo = tmp_path / "models"
    for name, factor in (("double", 2), ("triple", 3)):
        folder = repo / name
        folder.mkdir(parents=True)
        (folder / "helpers.py").write_text(f"FACTOR = {factor}\n")
        (folder / "model.py").write_text(
            "import numpy as np\nfrom inferencehub.model import Model\nfrom . import helpers\n\n\n"
            "class Scale(Model):\n"
            "    def predict(self, inputs):\n"
            "        return {'y': inputs['x'] * helpers.FACTOR}\n"
        )
        (folder / "config.json").write_text(
            json.dumps(
                {
                    "name": name,
                    "runtime": "python",
                    "execution": "thread",
                    "inputs": [{"name": "x", "datatype": "INT64", "shape": [-1]}],
                    "outputs": [{"name": "y", "datatype": "INT64", "shape": [-1]}],
                    "parameters": {"class": "model:Scale"},
                }
            )
        )
    replica = Replica("--models", str(repo))
    try:
        replica.wait_serving()
        with grpc.insecure_channel(replica.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for name, factor in (("double", 2), ("triple", 3)):
                request = pb.ModelInferRequest(model_name=name)
                request.inputs.add(name="x", datatype="INT64", shape=[2])
                request.raw_input_contents.append(np.array([5, 7], np.int64).tobytes())
                response = stub.ModelInfer(request, timeout=10)
                assert np.frombuffer(response.raw_output_contents[0], np.int64).tolist() == [5 * factor, 7 * factor]
    finally:
        replica.stop()


def test_expect_header_is_100_continue_or_a_json_417(strict_gateway):
    body = json.dumps({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]})
    head = INFER + b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n" % len(body)
    _, received = exchange(strict_gateway.port, [head + b"Expect: 100-continue\r\n\r\n", body.encode()], pause=0.2)
    assert received.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK"), received[:200]
    _, received = exchange(strict_gateway.port, [head + b"Expect: " + SECRET + b"\r\n\r\n" + body.encode()])
    status, message = status_and_error(received)
    assert status == 417 and SECRET.decode() not in message
