"""``--workers N``: several gateway processes on one port, supervised by the gateway's main process.

Real processes on loopback: a replica serving the shipped ``iris`` and ``mock-llm``, a gateway with two workers.
Both workers serve traffic (requests and token streams) on the one port, one scrape of /metrics and one
/status.json see the whole gateway, and the workers end with their parent: SIGKILL of the parent leaves none,
SIGTERM drains every worker.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator

import pytest

from inferencehub.processes import gateway_command

from conftest import (
    IRIS_ROW,
    SHIPPED,
    Gateway,
    Replica,
    alive,
    children_of,
    mock_llm_repository,
    sample_value,
    wait_for,
)

REQUESTS = 40
INFER_ROUTE = "/v2/models/{model}/infer"


@pytest.fixture(scope="module")
def iris_replica(tmp_path_factory) -> Iterator[Replica]:
    repo = mock_llm_repository(tmp_path_factory.mktemp("models"))
    (repo / "iris").symlink_to(SHIPPED / "iris")
    server = Replica("--models", str(repo))
    try:
        yield server.wait_serving()
    finally:
        server.stop()


def two_workers(replica: Replica) -> Gateway:
    return Gateway(replica.target, "--workers", "2", "--drain-seconds", "0.5", "--grace-seconds", "5")


def worker_pids(gateway: Gateway) -> set[int]:
    return {w["pid"] for w in gateway.request("GET", "/status.json").json()["workers"]}


def test_two_workers_share_the_port_and_one_scrape_and_status_see_both(iris_replica) -> None:
    gateway = two_workers(iris_replica)
    try:
        workers = wait_for(lambda: children_of(gateway.pid) if len(children_of(gateway.pid)) == 2 else None)
        for _ in range(REQUESTS):  # a new connection each: the kernel spreads connections over the listeners
            response = gateway.request("POST", "/v2/models/iris/infer", {"inputs": [IRIS_ROW]})
            assert response.status == 200, response
        status = gateway.request("GET", "/status.json").json()
        assert {w["pid"] for w in status["workers"]} == workers
        assert all(w["requests"] > 0 and w["ready"] for w in status["workers"]), status["workers"]
        assert sum(w["requests"] for w in status["workers"]) == status["requests"]["count"] == REQUESTS
        for _ in range(4):  # whichever worker answers the scrape, it counts both workers' requests
            text = gateway.request("GET", "/metrics").body.decode()
            counted = sample_value(
                text, "inferencehub_gateway_requests_total", route=INFER_ROUTE, method="POST", status="200"
            )
            assert counted == REQUESTS
            assert sample_value(text, "inferencehub_gateway_request_duration_seconds_count", route=INFER_ROUTE)
    finally:
        gateway.stop()


STREAMS = 12
OPEN_STREAMS = 6


def open_streams(gateway: Gateway) -> float:
    """The open-stream gauge of one scrape: one series for the whole gateway (no per-worker ``pid`` label)."""
    text = gateway.request("GET", "/metrics").body.decode()
    found = re.findall(r'^inferencehub_gateway_open_streams\{model="mock-llm"\} (\S+)$', text, re.MULTILINE)
    assert len(found) == 1, [line for line in text.splitlines() if line.startswith("inferencehub_gateway_open_s")]
    return float(found[0])


def test_status_counts_every_workers_token_streams(iris_replica) -> None:
    gateway = two_workers(iris_replica)
    held: list[http.client.HTTPConnection] = []
    try:
        wait_for(lambda: len(children_of(gateway.pid)) == 2)
        for _ in range(STREAMS):  # a new connection each, as above: both workers get some
            response = gateway.request(
                "POST", "/v2/models/mock-llm/generate_stream", {"text_input": "many workers", "max_tokens": 3}
            )
            assert response.status == 200 and response.body.count(b"data:") == 3, response
        for _ in range(4):  # whichever worker answers, it counts both workers' streams
            status = gateway.request("GET", "/status.json").json()
            streams = status["streams"]
            assert (streams["started"], streams["errors"], streams["tokens"]) == (STREAMS, 0, 3 * STREAMS), streams
            assert streams["time_to_first_token_ms"]["p50"] > 0
            assert all(w["streams"] > 0 for w in status["workers"]), status["workers"]  # both served streams
            assert sum(w["streams"] for w in status["workers"]) == STREAMS
        for _ in range(OPEN_STREAMS):  # streams that stay open (about 20 s of tokens), each on its own connection
            conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
            held.append(conn)
            conn.request(
                "POST", "/v2/models/mock-llm/generate_stream", json.dumps({"text_input": "x", "max_tokens": 4000})
            )
            answer = conn.getresponse()
            assert answer.status == 200 and answer.readline().startswith(b"data:")
        for _ in range(4):
            assert gateway.request("GET", "/status.json").json()["streams"]["open"] == OPEN_STREAMS
            assert open_streams(gateway) == OPEN_STREAMS
        for conn in held:  # hang up: every worker's streams close, and the sums say so
            conn.close()
        wait_for(lambda: open_streams(gateway) == 0, timeout=10, what="the hung-up streams to close")
        assert gateway.request("GET", "/status.json").json()["streams"]["open"] == 0
    finally:
        for conn in held:
            conn.close()
        gateway.stop()


def test_sigkill_of_the_parent_leaves_no_worker(iris_replica) -> None:
    gateway = two_workers(iris_replica)
    try:
        workers = wait_for(lambda: children_of(gateway.pid) if len(children_of(gateway.pid)) == 2 else None)
        assert worker_pids(gateway) == workers
    finally:
        gateway.kill()
    wait_for(lambda: not any(alive(pid) for pid in workers), timeout=10, what="the workers to end")


def test_sigterm_drains_every_worker_and_exits_cleanly(iris_replica) -> None:
    gateway = two_workers(iris_replica)
    workers = wait_for(lambda: children_of(gateway.pid) if len(children_of(gateway.pid)) == 2 else None)
    os.kill(gateway.pid, signal.SIGTERM)
    gateway.wait_log("draining for", timeout=20)
    os.kill(gateway.pid, signal.SIGTERM)  # repeated during the drain (as kubelet and people do): still a clean stop
    assert gateway.terminate(30) == 0, gateway.log
    assert not any(alive(pid) for pid in workers)
    assert gateway.log.count("draining for 0.5s") == 2, gateway.log
    assert gateway.log.count("gateway stopped") == 2, gateway.log


def test_a_worker_that_dies_is_restarted(iris_replica) -> None:
    gateway = two_workers(iris_replica)
    try:
        workers = wait_for(lambda: children_of(gateway.pid) if len(children_of(gateway.pid)) == 2 else None)
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        replaced = wait_for(
            lambda: children_of(gateway.pid) if len(children_of(gateway.pid) - {victim}) == 2 else None,
            what="a new worker",
        )
        assert victim not in replaced
        wait_for(lambda: worker_pids(gateway) == replaced, what="the new worker to answer")
        assert gateway.running
    finally:
        gateway.stop()


def test_rate_limits_keep_one_process(iris_replica) -> None:
    """Token buckets live in one process: N workers would each allow the whole rate."""
    refused = subprocess.run(
        gateway_command(f"ipv4:{iris_replica.target}", "--workers", "2", "--rate-limit", "5"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2, refused.stderr
    assert "--rate-limit needs one gateway process" in refused.stderr and "Traceback" not in refused.stderr
    gateway = Gateway(f"ipv4:{iris_replica.target}", "--workers", "0", "--rate-limit", "50")
    try:
        assert not children_of(gateway.pid)
    finally:
        gateway.stop()
