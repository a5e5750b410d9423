"""OpenTelemetry traces across the hop, received by a real OTLP/HTTP endpoint on loopback."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from conftest import SHIPPED, Gateway, NatsServer, Replica, wait_for

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
DIGITS_ROW = {"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}


class Collector(http.server.ThreadingHTTPServer):
    """Decodes every OTLP/HTTP protobuf export it receives into a flat list of spans."""

    def __init__(self) -> None:
        self.spans: list[dict] = []
        self.paths: list[str] = []
        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def add(self, path: str, body: bytes) -> None:
        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    attributes = {}
                    for a in span.attributes:
                        value = a.value
                        attributes[a.key] = value.int_value if value.HasField("int_value") else value.string_value
                    self.spans.append(
                        {
                            "service": resource.get("service.name"),
                            "name": span.name,
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent": span.parent_span_id.hex(),
                            "start": span.start_time_unix_nano,
                            "end": span.end_time_unix_nano,
                            "attributes": attributes,
                            "links": [(link.trace_id.hex(), link.span_id.hex()) for link in span.links],
                        }
                    )
        self.paths.append(path)


class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        assert self.headers["Content-Type"] == "application/x-protobuf"
        self.server.add(self.path, body)  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def traced() -> Iterator[tuple[Collector, Replica, Gateway]]:
    collector = Collector()
    thread = threading.Thread(target=collector.serve_forever, daemon=True)
    thread.start()
    replica = gateway = None
    fast_export = {"OTEL_BSP_SCHEDULE_DELAY": "50"}
    try:
        # The replica is configured by the standard variable, the gateway by its flag.
        replica = Replica(
            "--models",
            str(SHIPPED),
            "--replica-name",
            "traced-replica",
            "--processes",
            "1",
            env={**fast_export, "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url},
        ).wait_serving()
        gateway = Gateway(f"ipv4:{replica.target}", "--otlp-endpoint", collector.url, env=fast_export)
        yield collector, replica, gateway
    finally:
        if gateway is not None:
            gateway.stop()
        if replica is not None:
            replica.stop()
        collector.shutdown()


def spans_of(collector: Collector, trace_id: str, count: int) -> dict[str, dict]:
    found = wait_for(
        lambda: len(s := [x for x in collector.spans if x["trace_id"] == trace_id]) >= count and s,
        timeout=15,
        what=f"{count} spans of trace {trace_id}",
    )
    return {s["name"]: s for s in found}


def test_one_request_is_one_trace_across_the_hop(traced):
    collector, _, gateway = traced
    # The first call for a model also reads its batching config (coalescing), a span of its own: not this one.
    assert gateway.request("POST", "/v2/models/digits/infer", {"inputs": [DIGITS_ROW]}).status == 200
    traceparent = f"00-{TRACE_ID}-{CALLER_SPAN}-01"
    response = gateway.request(
        "POST", "/v2/models/digits/infer", {"inputs": [DIGITS_ROW]}, {"traceparent": traceparent}
    )
    assert response.status == 200, response
    spans = spans_of(collector, TRACE_ID, 7)
    assert set(spans) == {
        "POST /v2/models/{model}/infer",
        "parse",
        "upstream ModelInfer",
        "ModelInfer",
        "queue",
        "batch",
        "execute",
    }
    server = spans["POST /v2/models/{model}/infer"]
    assert server["parent"] == CALLER_SPAN  # the caller's trace continues
    assert server["service"] == "inferencehub-gateway"
    assert server["attributes"]["http.response.status_code"] == 200
    assert spans["parse"]["parent"] == server["span_id"]
    upstream = spans["upstream ModelInfer"]
    assert upstream["parent"] == server["span_id"]
    assert upstream["attributes"]["inferencehub.replica"] == "traced-replica"
    infer = spans["ModelInfer"]
    assert infer["parent"] == upstream["span_id"]  # carried in gRPC metadata
    assert infer["service"] == "inferencehub-inference"
    assert infer["attributes"]["inferencehub.replica"] == "traced-replica"
    for name in ("queue", "batch", "execute"):
        assert spans[name]["parent"] == infer["span_id"], name
        assert infer["start"] <= spans[name]["start"] <= spans[name]["end"] <= infer["end"], name
    assert spans["batch"]["attributes"]["inferencehub.batch_size"] == 1
    assert spans["execute"]["attributes"]["inferencehub.batch_size"] == 1
    assert (
        spans["queue"]["end"] <= spans["batch"]["start"] + 1 and spans["batch"]["end"] <= spans["execute"]["start"] + 1
    )
    assert set(collector.paths) == {"/v1/traces"}
    # Probes, scrapes and the live page's polling make no spans.
    for path in ("/healthz", "/metrics", "/status.json"):
        assert gateway.request("GET", path).status == 200
    assert gateway.request("GET", "/v2/models/digits").status == 200
    wait_for(lambda: any(s["name"] == "GET /v2/models/{model}" for s in collector.spans), timeout=15, what="a span")
    names = {s["name"] for s in collector.spans}
    assert not names & {"GET /healthz", "GET /metrics", "GET /status.json"}, names


def test_a_stream_is_traced_like_a_unary_call(traced):
    """Each request on ModelStreamInfer is a replica span continuing the caller's trace, with its queue and run."""
    import queue

    import numpy as np
    import tritonclient.grpc as grpcclient

    collector, replica, _ = traced
    trace_id, caller = "5bf92f3577b34da6a3ce929d0e0e4736", "10f067aa0ba902b7"
    results: queue.Queue = queue.Queue()
    with grpcclient.InferenceServerClient(replica.target) as client:
        client.start_stream(
            callback=lambda result, error: results.put((result, error)),
            headers={"traceparent": f"00-{trace_id}-{caller}-01"},
        )
        prompt = grpcclient.InferInput("text_input", [1], "BYTES")
        prompt.set_data_from_numpy(np.array([b"trace me"], dtype=object))
        limit = grpcclient.InferInput("max_tokens", [1], "INT32")
        limit.set_data_from_numpy(np.array([3], dtype=np.int32))
        client.async_stream_infer("mock-llm", [prompt, limit])
        for _ in range(3):
            _, error = results.get(timeout=10)
            assert error is None, error
        client.stop_stream()
    spans = spans_of(collector, trace_id, 4)
    assert set(spans) == {"ModelStreamInfer", "queue", "batch", "execute"}
    stream = spans["ModelStreamInfer"]
    assert stream["parent"] == caller and stream["service"] == "inferencehub-inference"
    assert stream["attributes"]["inferencehub.replica"] == "traced-replica"
    assert stream["attributes"]["inferencehub.model"] == "mock-llm"
    assert stream["attributes"]["rpc.grpc.status_code"] == 0
    for name in ("queue", "batch", "execute"):
        assert spans[name]["parent"] == stream["span_id"], name
        assert stream["start"] <= spans[name]["start"] <= spans[name]["end"] <= stream["end"], name
    assert spans["execute"]["end"] - spans["execute"]["start"] > 20_000_000  # the generation: 3 tokens


def test_a_request_without_traceparent_starts_a_trace_and_logs_carry_its_id(traced):
    collector, replica, gateway = traced
    bad = {"inputs": [{**DIGITS_ROW, "datatype": "FP64"}]}  # refused by the replica: both sides log it
    response = gateway.request("POST", "/v2/models/digits/infer", bad)
    assert response.status == 400
    server = wait_for(
        lambda: next(
            (
                s
                for s in collector.spans
                if s["name"].startswith("POST")
                and not s["parent"]
                and s["attributes"].get("http.response.status_code") == 400
            ),
            None,
        ),
        timeout=15,
        what="a new trace's server span",
    )
    trace_id = server["trace_id"]
    spans = spans_of(collector, trace_id, 4)
    assert spans["ModelInfer"]["parent"] == spans["upstream ModelInfer"]["span_id"]
    wait_for(lambda: f"trace={trace_id}" in gateway.log, timeout=5, what="the trace id in the gateway's log")
    wait_for(lambda: f"trace={trace_id}" in replica.log, timeout=5, what="the trace id in the replica's log")


def test_tracing_off_by_default_logs_no_trace_ids(gateway, replica):
    gateway.request("POST", "/v2/models/digits/infer", {"inputs": [{**DIGITS_ROW, "datatype": "FP64"}]})
    assert "trace=" not in gateway.log and "trace=" not in replica.log


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--otlp-endpoint", "collector:4318"], {}, "expected an http:// or https:// URL"),
        (
            ["--otlp-endpoint", "http://127.0.0.1:4317"],
            {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            "OTEL_EXPORTER_OTLP_PROTOCOL=grpc: InferenceHub exports OTLP over http/protobuf only",
        ),
    ],
)
def test_a_tracing_configuration_that_cannot_work_stops_start_up_with_a_clear_error(args, env, message):
    done = subprocess.run(
        [sys.executable, "-m", "inferencehub.gateway", "--host", "127.0.0.1", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_an_async_job_run_links_back_to_the_request_that_submitted_it(tmp_path):
    collector = Collector()
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    nats = NatsServer(tmp_path / "nats")
    env = {"OTEL_BSP_SCHEDULE_DELAY": "50"}
    replica = gateway = None
    try:
        replica = Replica(
            "--models",
            str(SHIPPED),
            "--processes",
            "1",
            "--replica-name",
            "job-replica",
            "--nats",
            nats.url,
            "--otlp-endpoint",
            collector.url,
            env=env,
        ).wait_serving()
        gateway = Gateway(f"ipv4:{replica.target}", "--nats", nats.url, "--otlp-endpoint", collector.url, env=env)
        wait_for(lambda: gateway.request("GET", "/v2/jobs/" + "0" * 32).status == 404, what="the job queue")
        traceparent = f"00-{TRACE_ID[::-1]}-{CALLER_SPAN}-01"
        answer = gateway.request(
            "POST",
            "/v2/models/mock/infer",
            {"inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]},
            {"Prefer": "respond-async, wait=20", "traceparent": traceparent},
        )
        assert answer.status == 200, answer
        caller = TRACE_ID[::-1]
        submitted = wait_for(
            lambda: next((s for s in collector.spans if s["trace_id"] == caller and s["name"][:4] == "POST"), None),
            timeout=15,
            what="the submitting request's span",
        )
        run = wait_for(
            lambda: next((s for s in collector.spans if s["name"] == "job mock"), None),
            timeout=15,
            what="the job's span",
        )
        assert run["service"] == "inferencehub-inference" and run["trace_id"] != submitted["trace_id"]
        assert (submitted["trace_id"], submitted["span_id"]) in run["links"]
        assert run["attributes"]["inferencehub.replica"] == "job-replica"
        assert len(run["attributes"]["inferencehub.job_id"]) == 32
    finally:
        for server in (gateway, replica, nats):
            if server is not None:
                server.stop()
        collector.shutdown()


def test_a_token_stream_is_one_trace_with_its_upstream_call(traced):
    collector, _, gateway = traced
    trace_id = "5" * 32
    response = gateway.request(
        "POST",
        "/v2/models/mock-llm/generate_stream",
        {"text_input": "trace me", "max_tokens": 3},
        {"traceparent": f"00-{trace_id}-{CALLER_SPAN}-01"},
    )
    assert response.status == 200 and response.body.count(b"data:") == 3, response
    found = wait_for(
        lambda: (
            {s["name"]: s for s in collector.spans if s["trace_id"] == trace_id}.get("upstream ModelStreamInfer")
            and {s["name"]: s for s in collector.spans if s["trace_id"] == trace_id}
        ),
        timeout=15,
        what="the stream's spans",
    )
    server = found["POST /v2/models/{model}/generate_stream"]
    assert server["parent"] == CALLER_SPAN and server["attributes"]["http.response.status_code"] == 200
    upstream = found["upstream ModelStreamInfer"]
    assert upstream["parent"] == server["span_id"]
    assert upstream["attributes"]["inferencehub.replica"] == "traced-replica"
    assert server["start"] <= upstream["start"] <= upstream["end"] <= server["end"]  # the span covers the stream
