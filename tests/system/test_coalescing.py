"""Cross-hop coalescing at the gateway: concurrent requests for a batching model share one upstream call,
and each caller gets exactly what it would have got alone (bytes, id, replica, error, deadline)."""

from __future__ import annotations

import json
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import ROOT, SHIPPED, TEST_MODELS, Gateway, Replica, model_repository

DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"]
RANGES = {
    "UINT8": (0, 2**8 - 1),
    "UINT16": (0, 2**16 - 1),
    "UINT32": (0, 2**32 - 1),
    "UINT64": (0, 2**64 - 1),
    "INT8": (-(2**7), 2**7 - 1),
    "INT16": (-(2**15), 2**15 - 1),
    "INT32": (-(2**31), 2**31 - 1),
    "INT64": (-(2**63), 2**63 - 1),
}


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    repo = model_repository(
        tmp_path_factory.mktemp("models"), TEST_MODELS / "batch-echo-all", TEST_MODELS / "batch-picky", SHIPPED / "iris"
    )
    server = Replica("--models", str(repo), "--replica-name", "coalescing-replica").wait_serving()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def coalescing(replica):
    # A generous maximum delay, so requests sent together reliably wait for each other on a busy machine.
    server = Gateway(f"ipv4:{replica.target}", "--coalesce-max-delay-ms", "200")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def alone(replica):
    # The reference also runs on the standard asyncio loop (the default is uvloop): the answers must not differ.
    server = Gateway(f"ipv4:{replica.target}", "--coalesce", "off", "--event-loop", "asyncio")
    yield server
    server.stop()


def uses_uvloop(server) -> bool:
    return "uvloop" in Path(f"/proc/{server.proc.pid}/maps").read_text()


def values(rng: random.Random, datatype: str, count: int) -> list:
    if datatype == "BOOL":
        return [rng.random() < 0.5 for _ in range(count)]
    if datatype in RANGES:
        low, high = RANGES[datatype]
        return [rng.choice([low, high, 0, rng.randint(low, high)]) for _ in range(count)]
    return [rng.choice([0.0, -1.5, 3.25, rng.uniform(-1e3, 1e3), 1e-3]) for _ in range(count)]


def echo_request(i: int) -> dict:
    """Request i: 1 to 3 rows of every datatype; some ask for binary outputs, some for a subset of outputs."""
    rng = random.Random(i)
    rows = 1 + i % 3
    inputs = [
        {"name": f"in_{t.lower()}", "datatype": t, "shape": [rows, 2], "data": values(rng, t, rows * 2)}
        for t in DATATYPES
    ]
    texts = [rng.choice(["", "a", "héllo", "x" * rng.randint(1, 40), "tab\tnew\nline"]) for _ in range(rows * 2)]
    inputs.append({"name": "in_bytes", "datatype": "BYTES", "shape": [rows, 2], "data": texts})
    request: dict = {"id": f"request-{i}", "inputs": inputs}
    if i % 4 == 1:
        request["parameters"] = {"binary_data_output": True}
    if i % 4 == 2:
        request["outputs"] = [{"name": "out_bytes"}, {"name": "out_fp16"}, {"name": "out_uint64"}]
    return request


NUMPY = {"BOOL": "?", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "<i1", "INT16": "<i2"}
NUMPY.update({"INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"})


def binary(request: dict) -> tuple[bytes, dict[str, str]]:
    """The same request with every input as binary tensor data (raw little-endian bytes after the JSON header)."""
    import struct

    import numpy as np

    header = {**request, "inputs": []}
    blobs = []
    for tensor in request["inputs"]:
        if tensor["datatype"] == "BYTES":
            raw = b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in tensor["data"])
        else:
            raw = np.array(tensor["data"], dtype=NUMPY[tensor["datatype"]]).tobytes()
        described = {k: v for k, v in tensor.items() if k != "data"}
        header["inputs"].append({**described, "parameters": {"binary_data_size": len(raw)}})
        blobs.append(raw)
    head = json.dumps(header).encode()
    return head + b"".join(blobs), {"Inference-Header-Content-Length": str(len(head))}


def send(gateway: Gateway, model: str, request: dict, as_binary: bool):
    if not as_binary:
        return post(gateway, model, request)
    body, headers = binary(request)
    return gateway.request("POST", f"/v2/models/{model}/infer", body, headers)


def post(gateway: Gateway, model: str, body: dict, headers: dict[str, str] | None = None):
    return gateway.request(
        "POST", f"/v2/models/{model}/infer", json.dumps(body), {"Content-Type": "application/json", **(headers or {})}
    )


def together(calls: list, workers: int | None = None) -> list:
    """Run the calls at the same moment, each in its own thread; their results in order."""
    barrier = threading.Barrier(len(calls))

    def run(call):
        barrier.wait(30)
        return call()

    with ThreadPoolExecutor(workers or len(calls)) as pool:
        return list(pool.map(run, calls))


def metric(gateway: Gateway, name: str) -> float:
    text = gateway.request("GET", "/metrics").body.decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


def test_coalesced_results_equal_one_at_a_time_for_every_datatype(coalescing, alone):
    requests = [echo_request(i) for i in range(48)]
    as_binary = [i % 3 == 0 for i in range(48)]  # a third send binary tensor data, across every output variant
    expected = [send(alone, "batch-echo-all", r, b) for r, b in zip(requests, as_binary, strict=True)]
    assert all(r.status == 200 for r in expected), expected[0]
    # Sanity: the reference is an echo (JSON outputs hold the request's values, by name).
    first = expected[0].json()
    assert first["id"] == "request-0"
    assert {o["name"]: o["data"] for o in first["outputs"]}["out_int64"] == requests[0]["inputs"][8]["data"]

    calls_before = metric(coalescing, "inferencehub_gateway_coalesced_requests_count")
    carried_before = metric(coalescing, "inferencehub_gateway_coalesced_requests_sum")
    for _ in range(2):
        got = together(
            [
                lambda r=r, b=b: send(coalescing, "batch-echo-all", r, b)
                for r, b in zip(requests, as_binary, strict=True)
            ]
        )
        for i, (want, have) in enumerate(zip(expected, got, strict=True)):
            assert have.status == 200, (i, have)
            assert have.body == want.body, f"request {i}: coalesced answer differs from the one-at-a-time answer"
            assert have.headers["content-type"] == want.headers["content-type"]
            assert have.headers.get("inference-header-content-length") == want.headers.get(
                "inference-header-content-length"
            )
            assert have.headers["x-inferencehub-replica"] == "coalescing-replica"
    calls = metric(coalescing, "inferencehub_gateway_coalesced_requests_count") - calls_before
    carried = metric(coalescing, "inferencehub_gateway_coalesced_requests_sum") - carried_before
    assert carried == 2 * len(requests)  # every request travelled in exactly one call
    assert calls < carried / 2, f"{carried:.0f} requests in {calls:.0f} calls: they were not coalesced"


def test_the_event_loop_is_uvloop_unless_turned_off(coalescing, alone, replica):
    assert uses_uvloop(coalescing) and uses_uvloop(replica)
    assert not uses_uvloop(alone)


def test_coalescing_can_be_turned_off_for_one_model(replica):
    server = Gateway(f"ipv4:{replica.target}", "--coalesce-off-models", "iris,batch-picky")
    try:
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}
        got = together([lambda: post(server, "batch-picky", body) for _ in range(6)])
        assert all(r.status == 200 for r in got)
        assert metric(server, "inferencehub_gateway_coalesced_requests_count") == 0  # never went through it
    finally:
        server.stop()


def test_each_request_keeps_its_own_request_id(coalescing):
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}
    ids = [f"caller-{i}" for i in range(8)]
    got = together([lambda i=i: post(coalescing, "batch-picky", body, {"X-Request-Id": i}) for i in ids])
    assert [r.headers["x-request-id"] for r in got] == ids
    assert all(r.status == 200 and r.json()["outputs"][0]["data"] == [2, 4, 6] for r in got)


def test_a_failed_coalesced_call_does_not_fail_the_requests_that_succeed_alone(coalescing):
    retried = metric(coalescing, "inferencehub_gateway_coalesce_retried_requests_total")

    def body(i: int) -> dict:
        sign = -1 if i % 4 == 3 else 1
        return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [sign * i, i, i]}]}

    # The first call is under way when the others arrive: they wait for it and travel together.
    got = together([lambda i=i: post(coalescing, "batch-picky", body(i)) for i in range(12)])
    for i, response in enumerate(got):
        if i % 4 == 3:
            assert response.status == 400 and "negative values" in response.json()["error"], (i, response)
        else:
            assert response.status == 200, (i, response)
            assert response.json()["outputs"][0]["data"] == [2 * i, 2 * i, 2 * i]
    assert metric(coalescing, "inferencehub_gateway_coalesce_retried_requests_total") > retried


def test_a_short_deadline_does_not_cut_the_others_short(coalescing):
    """batch-picky takes 100 ms: a request allowed 50 ms must time out, the others in its call must not."""
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 1, 1]}]}
    deadlines = ["50"] + ["30000"] * 7
    got = together(
        [lambda d=d: post(coalescing, "batch-picky", body, {"X-InferenceHub-Deadline-Ms": d}) for d in deadlines]
    )
    assert got[0].status == 504, got[0]
    assert [r.status for r in got[1:]] == [200] * 7, got


def test_models_without_a_batch_dimension_and_unknown_models_go_alone(coalescing, replica):
    unknown = post(
        coalescing, "no-such-model", {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}
    )
    assert unknown.status == 404 and "no-such-model" in unknown.json()["error"]
    iris = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 4], "data": [5.1, 3.5, 1.4, 0.2]}]}
    got = together([lambda: post(coalescing, "iris", iris) for _ in range(16)])
    assert all(r.status == 200 and r.json()["outputs"][1]["data"] == [0] for r in got)


def test_bad_coalescing_flags_are_refused(replica):
    import subprocess
    import sys

    for flags, message in [
        (["--coalesce", "maybe"], "--coalesce must be on or off"),
        (["--coalesce-max-delay-ms", "-1"], "--coalesce-max-delay-ms"),
    ]:
        done = subprocess.run(
            [sys.executable, "-m", "inferencehub.gateway", "--port", "0", "--upstream", replica.target, *flags],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert done.returncode == 2 and message in done.stderr, done.stderr
