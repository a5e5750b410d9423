"""The gateway bounds the request body bytes it holds at once (--max-decoding-bytes), across requests.

Bodies of 3 MiB against a 4 MiB budget: while one is held (its call runs 3 s on the ``sleepy`` model), others get
503 with Retry-After at once, before their bodies are read; the budget comes back to zero afterwards.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import socket
import struct
import subprocess
import threading
import time

import pytest

from inferencehub.processes import gateway_command

from conftest import TEST_MODELS, Gateway, Replica, model_repository, wait_for

MIB = 1024 * 1024
COUNT = 3 * MIB // 4  # FP32 elements: a 3 MiB body


def binary_body(count: int = COUNT) -> tuple[bytes, dict[str, str]]:
    header = json.dumps(
        {
            "inputs": [
                {"name": "input", "shape": [count], "datatype": "FP32", "parameters": {"binary_data_size": 4 * count}}
            ]
        }
    ).encode()
    return header + struct.pack("<f", 1.0) * count, {"Inference-Header-Content-Length": str(len(header))}


def decoding_bytes(gateway: Gateway) -> float:
    text = gateway.request("GET", "/metrics").body.decode()
    return float(re.search(r"^inferencehub_gateway_decoding_bytes ([0-9.e+]+)$", text, re.M).group(1))


@pytest.fixture
def budgeted(tmp_path):
    repo = model_repository(tmp_path / "models", TEST_MODELS / "sleepy", TEST_MODELS / "fast")
    replica = Replica("--models", str(repo), "--max-message-bytes", str(16 * MIB)).wait_serving()
    gateway = None
    try:
        gateway = Gateway(
            f"ipv4:{replica.target}",
            "--max-body-bytes",
            str(4 * MIB),
            "--max-decoding-bytes",
            str(4 * MIB),
            "--max-message-bytes",
            str(16 * MIB),
        )
        yield gateway
    finally:
        if gateway is not None:
            gateway.stop()
        replica.stop()


def test_concurrent_large_bodies_over_the_budget_get_503_and_the_budget_comes_back(budgeted):
    body, headers = binary_body()
    results: list[tuple[float, object]] = []
    lock = threading.Lock()

    def post() -> None:
        response = budgeted.request("POST", "/v2/models/sleepy/infer", body, headers, timeout=60)
        with lock:
            results.append((time.monotonic(), response))

    threads = [threading.Thread(target=post, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    statuses = sorted(r.status for _, r in results)
    assert len(statuses) == 4 and set(statuses) <= {200, 503}, [r for _, r in results]
    assert 200 in statuses and 503 in statuses, statuses
    refused = [(at, r) for at, r in results if r.status == 503]
    for _, response in refused:
        assert response.headers["retry-after"] == "1"
        assert "--max-decoding-bytes" in response.json()["error"] and "4.0 MiB" in response.json()["error"]
    # Refused at once, while a held body's 3 s call still ran.
    first_answer = min(at for at, r in results if r.status == 200)
    assert max(at for at, _ in refused) < first_answer
    # Nothing stays held, and the gateway answers normally again.
    wait_for(lambda: decoding_bytes(budgeted) == 0, timeout=10, what="the budget to come back to zero")
    again = budgeted.request("POST", "/v2/models/sleepy/infer", body, headers, timeout=60)
    assert again.status == 200, again
    assert decoding_bytes(budgeted) == 0


def test_a_chunked_body_is_counted_as_it_arrives_and_expect_100_is_answered_503(budgeted):
    body, headers = binary_body()
    held = threading.Thread(
        target=lambda: budgeted.request("POST", "/v2/models/sleepy/infer", body, headers, timeout=60), daemon=True
    )
    held.start()
    wait_for(lambda: decoding_bytes(budgeted) > 0, timeout=20, what="a body to be held")
    conn = http.client.HTTPConnection("127.0.0.1", budgeted.port, timeout=30)
    try:
        chunks = (body[i : i + 256 * 1024] for i in range(0, len(body), 256 * 1024))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # it may answer before the last chunk
            conn.request("POST", "/v2/models/sleepy/infer", body=chunks, headers=headers, encode_chunked=True)
        response = conn.getresponse()
        assert response.status == 503
        assert response.getheader("Retry-After") == "1"
        assert "--max-decoding-bytes" in json.loads(response.read())["error"]
    finally:
        conn.close()
    # A client that waits for 100 Continue is refused before it sends its body.
    with socket.create_connection(("127.0.0.1", budgeted.port), timeout=30) as raw:
        raw.sendall(
            b"POST /v2/models/sleepy/infer HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
        )
        answer = b""
        while b"\r\n\r\n" not in answer:
            data = raw.recv(65536)
            assert data, answer
            answer += data
        assert answer.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in answer, answer
    held.join(60)
    wait_for(lambda: decoding_bytes(budgeted) == 0, timeout=10, what="the budget to come back to zero")
    small = {"inputs": [{"name": "input", "shape": [2], "datatype": "FP32", "data": [1.0, 2.0]}]}
    assert budgeted.request("POST", "/v2/models/fast/infer", small).status == 200


def test_a_body_over_the_size_limit_gets_413_before_it_is_read(budgeted):
    body, headers = binary_body(5 * MIB // 4)
    response = budgeted.request("POST", "/v2/models/sleepy/infer", body, headers)
    assert response.status == 413, response
    assert decoding_bytes(budgeted) == 0


def test_a_budget_smaller_than_one_body_stops_start_up():
    command = gateway_command("127.0.0.1:1", "--max-body-bytes", str(8 * MIB), "--max-decoding-bytes", str(4 * MIB))
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "--max-decoding-bytes (4194304) must be 0 (no limit) or at least --max-body-bytes (8388608)" in done.stderr
