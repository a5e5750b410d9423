"""``--workers N``: several gateway processes on one port, supervised by the gateway's main process.

Real processes on loopback: a replica serving the shipped ``iris``, a gateway with two workers. Both workers
serve traffic on the one port, one scrape of /metrics and one /status.json see the whole gateway, and the
workers end with their parent: SIGKILL of the parent leaves none, SIGTERM drains every worker.
"""

from __future__ import annotations

import os
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
    model_repository,
    sample_value,
    wait_for,
)

REQUESTS = 40
INFER_ROUTE = "/v2/models/{model}/infer"


@pytest.fixture(scope="module")
def iris_replica(tmp_path_factory) -> Iterator[Replica]:
    server = Replica("--models", str(model_repository(tmp_path_factory.mktemp("models"), SHIPPED / "iris")))
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
