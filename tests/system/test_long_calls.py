"""Long calls run once: connection ageing never cuts a call inside its deadline, and the gateway never
replays a call a replica may have begun.

The connection age is made short (1 s) and the model slow (the ``sleepy`` test model: 3 s), so a call always
outlives the connection it started on, as a 20 s call outlives the default 5 s age in production.
"""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time
import urllib.request

import pytest

from inferencehub.processes import gateway_command, inference_command

from conftest import TEST_MODELS, Gateway, Replica, model_repository, wait_for

BODY = {"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": [1.0]}]}
DEADLINE_HEADER = "X-InferenceHub-Deadline-Ms"
SLEEPY = "/v2/models/sleepy/infer"
# Connections age out after 1 s; calls may have deadlines up to 20 s (the sleepy model takes 3 s).
REPLICA_ARGS = ("--max-connection-age-seconds", "1", "--max-deadline-seconds", "20")
GATEWAY_ARGS = ("--max-deadline-seconds", "20", "--deadline-seconds", "10")


def replica_metrics(replica: Replica) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{replica.metrics_port}/metrics", timeout=5).read().decode()


def runs(replica: Replica, model: str = "sleepy") -> dict[str, float]:
    """ModelInfer calls the replica handled for ``model``, by gRPC status code."""
    pattern = rf'inferencehub_inference_requests_total\{{code="(\w+)",model="{model}"\}} ([0-9.e+]+)'
    return {code: float(count) for code, count in re.findall(pattern, replica_metrics(replica))}


def in_flight(replica: Replica, model: str = "sleepy") -> float:
    found = re.search(
        rf'inferencehub_inference_in_flight_requests\{{model="{model}"\}} ([0-9.e+]+)', replica_metrics(replica)
    )
    return float(found.group(1)) if found else 0.0


class Call(threading.Thread):
    """One request through the gateway, in the background."""

    def __init__(self, gateway: Gateway, headers: dict[str, str]) -> None:
        super().__init__(daemon=True)
        self.gateway, self.headers = gateway, headers
        self.response = None
        self.start()

    def run(self) -> None:
        self.response = self.gateway.request("POST", SLEEPY, BODY, self.headers, timeout=60)


@pytest.fixture
def sleepy_repo(tmp_path):
    return model_repository(tmp_path / "models", TEST_MODELS / "sleepy")


def test_calls_longer_than_the_connection_age_finish_and_run_once(sleepy_repo):
    replica = Replica("--models", str(sleepy_repo), *REPLICA_ARGS)
    gateway = None
    try:
        replica.wait_serving()
        gateway = Gateway(f"ipv4:{replica.target}", *GATEWAY_ARGS)
        calls = [Call(gateway, {DEADLINE_HEADER: "15000"}) for _ in range(3)]
        for call in calls:
            call.join(60)
        assert [c.response.status for c in calls] == [200, 200, 200], [c.response for c in calls]
        # Each call ran exactly once: no CANCELLED run cut by the connection's age, no replayed run.
        assert runs(replica) == {"OK": 3.0}
    finally:
        if gateway is not None:
            gateway.stop()
        replica.stop()


def test_a_replica_killed_mid_call_gives_one_clear_error_and_no_second_run(sleepy_repo):
    args = ("--models", str(sleepy_repo), *REPLICA_ARGS)
    replicas = [Replica(*args, "--replica-name", name) for name in ("a", "b")]
    gateway = None
    try:
        for replica in replicas:
            replica.wait_serving()
        gateway = Gateway(f"ipv4:{replicas[0].target},{replicas[1].target}", *GATEWAY_ARGS)
        call = Call(gateway, {DEADLINE_HEADER: "15000"})
        serving = wait_for(
            lambda: next((r for r in replicas if in_flight(r) >= 1), None), timeout=20, what="a replica to run it"
        )
        other = replicas[1 - replicas.index(serving)]
        serving.proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        call.join(60)
        response = call.response
        assert response is not None
        # One clear error, at once (not at the deadline), naming what happened; or one run elsewhere.
        if response.status == 200:
            assert response.headers["x-inferencehub-replica"] == ("b" if serving is replicas[0] else "a")
        else:
            assert response.status == 503, response
            assert "went away" in response.json()["error"] and "never replayed" in response.json()["error"]
            assert response.headers["retry-after"]
            assert time.monotonic() - killed < 10
        # The living replica ran it at most once; with no retry policy, not at all.
        assert sum(runs(other).values()) <= (1 if response.status == 200 else 0), runs(other)
        assert in_flight(other) == 0
    finally:
        if gateway is not None:
            gateway.stop()
        for replica in replicas:
            replica.kill()


def test_a_deadline_above_the_maximum_is_refused_by_name(gateway):
    """The session's gateway allows deadlines up to its default maximum, 300 s: longer is a 400, never a cap."""
    body = {"inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]}]}
    over = gateway.request("POST", "/v2/models/mock/infer", body, {DEADLINE_HEADER: "300001"})
    assert over.status == 400, over
    assert over.json()["error"] == (
        f"{DEADLINE_HEADER} is 300001 ms, above the longest deadline this gateway allows: 300000 ms "
        "(--max-deadline-seconds)"
    )
    # Up to the maximum, and above the default deadline (30 s), the client's deadline is the call's.
    assert gateway.request("POST", "/v2/models/mock/infer", body, {DEADLINE_HEADER: "300000"}).status == 200
    assert gateway.request("POST", "/v2/models/mock/infer", body, {DEADLINE_HEADER: "60000"}).status == 200


def test_the_async_path_refuses_the_same_deadline(gateway):
    """A request that would be queued is checked the same way (whether or not a job queue is configured)."""
    body = {"inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]}]}
    headers = {DEADLINE_HEADER: "999999999", "Prefer": "respond-async"}
    response = gateway.request("POST", "/v2/models/mock/infer", body, headers)
    assert response.status == 400 and DEADLINE_HEADER in response.json()["error"]


def _start_fails(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0, done
    return done


def test_a_replica_refuses_a_connection_age_grace_shorter_than_the_longest_deadline():
    done = _start_fails(inference_command("--max-deadline-seconds", "60", "--max-connection-age-grace-seconds", "10"))
    assert (
        "--max-connection-age-grace-seconds (10) is shorter than --max-deadline-seconds (60): calls inside their "
        "deadline would be cut when their connection ages out"
    ) in done.stderr
    assert "Traceback" not in done.stderr


def test_a_gateway_refuses_a_default_deadline_above_its_maximum():
    done = _start_fails(gateway_command("127.0.0.1:1", "--deadline-seconds", "60", "--max-deadline-seconds", "30"))
    assert "--deadline-seconds (60) must be positive and at most --max-deadline-seconds (30)" in done.stderr
    assert "Traceback" not in done.stderr
