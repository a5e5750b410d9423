"""Async inference through the gateway on a real NATS JetStream server: submit, poll, cancel, and every bad input.

One nats-server, one replica pulling jobs and one gateway (all subprocesses on loopback) for the module.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import (
    JOB_FINAL as FINAL,
)
from conftest import (
    JOB_UNKNOWN_ID as UNKNOWN_ID,
)
from conftest import (
    SHIPPED,
    TEST_MODELS,
    Gateway,
    NatsServer,
    Replica,
    model_repository,
    wait_for,
)
from conftest import (
    job_queue_ready as queue_ready,
)

IRIS_BODY = {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [6.3, 3.3, 6.0, 2.5]}]}
ASYNC = {"Prefer": "respond-async", "Content-Type": "application/json"}
OVERSIZED_BATCH = {
    "inputs": [
        {"name": "input", "shape": [17, 1], "datatype": "FP32", "data": [0.0] * 17},
        {"name": "tag", "shape": [17], "datatype": "INT64", "data": [0] * 17},
    ]
}


@pytest.fixture(scope="module")
def jobs_replica(nats, tmp_path_factory):
    repo = model_repository(
        tmp_path_factory.mktemp("job-models"),
        SHIPPED / "iris",
        SHIPPED / "mock",
        TEST_MODELS / "slow-one",
        TEST_MODELS / "always-fails",
        TEST_MODELS / "batch-echo",
    )
    server = Replica(
        "--models",
        str(repo),
        "--replica-name",
        "jobs-replica",
        "--nats",
        nats.url,
        "--jobs-lease-seconds",
        "3",
        "--grace-seconds",
        "3",
        "--drain-seconds",
        "0",
    )
    try:
        yield server.wait_serving()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def jobs_gateway(nats, jobs_replica):
    server = Gateway(
        f"ipv4:{jobs_replica.target}",
        "--nats",
        nats.url,
        "--max-body-bytes",
        str(8 * 1024 * 1024),
        "--max-message-bytes",
        str(8 * 1024 * 1024),
    )
    try:
        wait_for(lambda: queue_ready(server), what="the gateway's job queue")
        wait_for(lambda: "jobs: pulling" in jobs_replica.log, what="the replica to pull jobs")
        yield server
    finally:
        server.stop()


def submit(gateway: Gateway, model: str, body, headers: dict[str, str] | None = None):
    return gateway.request("POST", f"/v2/models/{model}/infer", body, {**ASYNC, **(headers or {})})


def poll(gateway: Gateway, job_id: str, timeout: float = 30.0) -> dict:
    def finished():
        response = gateway.request("GET", f"/v2/jobs/{job_id}")
        assert response.status == 200, response
        length = response.headers.get("inference-header-content-length")
        doc = json.loads(response.body[: int(length)] if length else response.body)
        return doc if doc["status"] in FINAL else None

    return wait_for(finished, timeout, interval=0.05, what=f"job {job_id} to finish")


def curl(*args: str) -> str:
    done = subprocess.run(["curl", "-s", *args], capture_output=True, text=True, timeout=30, check=True)
    return done.stdout


def readme_job_commands() -> tuple[list[str], list[str]]:
    """The async jobs page's curl commands: the runnable ones (sh) and those that take a JOB_ID (text)."""
    page = (Path(__file__).resolve().parents[2] / "docs" / "jobs.md").read_text()
    section = page.split("# Async inference", 1)[1].split("\n## ", 1)[0]
    sh = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    text = re.search(r"```text\n(.*?)```", section, re.S).group(1)
    return [c for c in sh.splitlines() if c.startswith("curl")], [c for c in text.splitlines() if c.startswith("curl")]


def shell(command: str, gateway: Gateway, job_id: str = "") -> str:
    command = command.replace("127.0.0.1:8080", gateway.url).replace("JOB_ID", job_id)
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=30, check=True)
    return done.stdout


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_submit_poll_and_cancel_with_curl_as_the_readme_writes_it(jobs_gateway):
    (submit_command, wait_command), (get_command, delete_command) = readme_job_commands()
    # Submit: 202, the job's address, the preference applied.
    head, _, payload = shell(submit_command, jobs_gateway).replace("\r\n", "\n").partition("\n\n")
    status_line, *lines = head.split("\n")
    assert " 202 " in status_line, head
    headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines)}
    doc = json.loads(payload)
    assert headers["location"] == f"/v2/jobs/{doc['id']}"
    assert headers["preference-applied"] == "respond-async"
    assert len(doc["id"]) == 32 and doc["status"] in {"queued", "running", "succeeded"}
    # Poll: the result is what the synchronous route answers; so is the answer to waiting.
    job = wait_for(
        lambda: (d := json.loads(shell(get_command, jobs_gateway, doc["id"])))["status"] == "succeeded" and d
    )
    sync = jobs_gateway.request("POST", "/v2/models/iris/infer", IRIS_BODY).json()
    assert job["result"] == sync
    assert json.loads(shell(wait_command, jobs_gateway)) == sync
    assert job["model_name"] == "iris" and job["model_version"] == "1" and job["attempts"] == 1
    assert job["created_at"] <= job["started_at"] <= job["finished_at"]
    # Cancel a finished job: 409.
    assert "already succeeded" in shell(delete_command, jobs_gateway, doc["id"])
    base = f"http://{jobs_gateway.url}"

    # slow-one runs one call at a time (800 ms) and the replica holds two of its jobs: the rest wait in the queue.
    ids = [submit(jobs_gateway, "slow-one", {"inputs": [{"name": "input", "shape": [1], "datatype": "FP32",
                                                         "data": [i]}]}).json()["id"] for i in range(4)]  # fmt: skip
    cancelled = json.loads(curl("-X", "DELETE", f"{base}/v2/jobs/{ids[3]}"))
    assert cancelled["status"] == "cancelled" and cancelled["attempts"] == 0
    again = jobs_gateway.request("DELETE", f"/v2/jobs/{ids[3]}")
    assert again.status == 409 and "already cancelled" in again.json()["error"]
    wait_for(lambda: jobs_gateway.request("GET", f"/v2/jobs/{ids[0]}").json()["status"] == "running")
    running = jobs_gateway.request("DELETE", f"/v2/jobs/{ids[0]}")
    assert running.status == 200 and running.json()["status"] == "cancelled"
    for job_id in ids[1:3]:
        assert poll(jobs_gateway, job_id)["status"] == "succeeded"
    # The running one stays cancelled (its result is discarded); the queued one never ran.
    assert poll(jobs_gateway, ids[0])["status"] == "cancelled"
    assert poll(jobs_gateway, ids[3])["attempts"] == 0


def test_200_concurrent_iris_jobs_equal_the_synchronous_answers(jobs_gateway):
    rng = np.random.default_rng(7)
    bodies = [
        {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": rng.uniform(0, 8, 4).tolist()}]}
        for _ in range(200)
    ]

    def sync(body):
        response = jobs_gateway.request("POST", "/v2/models/iris/infer", body)
        assert response.status == 200, response
        return response.json()

    def job(i_body):
        i, body = i_body
        # Half of them ask to wait for the result (RFC 7240 wait), half poll.
        prefer = "respond-async, wait=20" if i % 2 else "respond-async"
        response = jobs_gateway.request("POST", "/v2/models/iris/infer", body, {"Prefer": prefer})
        if response.status == 200:
            assert "preference-applied" not in response.headers
            return response.json()
        assert response.status == 202, response
        doc = poll(jobs_gateway, response.json()["id"], timeout=60)
        assert doc["status"] == "succeeded", doc
        return doc["result"]

    with ThreadPoolExecutor(32) as pool:
        expected = list(pool.map(sync, bodies))
    with ThreadPoolExecutor(64) as pool:
        got = list(pool.map(job, enumerate(bodies)))
    # The same answers, to float32's precision: a row's probabilities may differ in their last bits with the
    # batch it was computed in (numpy's matrix product blocks differently by batch size).
    assert len(got) == len(expected)
    for job_answer, sync_answer in zip(got, expected, strict=True):
        assert _without_data(job_answer) == _without_data(sync_answer)
        for a, b in zip(job_answer["outputs"], sync_answer["outputs"], strict=True):
            if a["datatype"] == "FP32":
                np.testing.assert_allclose(a["data"], b["data"], rtol=1e-5, atol=1e-9)
            else:
                assert a["data"] == b["data"]


def _without_data(answer: dict) -> dict:
    return {**answer, "outputs": [{k: v for k, v in o.items() if k != "data"} for o in answer["outputs"]]}


def test_binary_outputs_come_back_as_the_binary_extension(jobs_gateway):
    body = dict(IRIS_BODY, parameters={"binary_data_output": True})
    job_id = submit(jobs_gateway, "iris", body).json()["id"]
    poll(jobs_gateway, job_id)
    response = jobs_gateway.request("GET", f"/v2/jobs/{job_id}")
    assert response.headers["content-type"] == "application/octet-stream"
    length = int(response.headers["inference-header-content-length"])
    doc = json.loads(response.body[:length])
    assert doc["status"] == "succeeded"
    sizes = [o["parameters"]["binary_data_size"] for o in doc["result"]["outputs"]]
    assert sizes == [12, 8] and len(response.body) == length + 20
    label = np.frombuffer(response.body[length + 12 :], dtype=np.int64)
    assert label.tolist() == [2]


def test_bad_input_is_refused_before_queueing_with_the_synchronous_answer(jobs_gateway):
    cases = [
        ("iris", b"{not json", 400),
        ("iris", {"inputs": []}, 400),
        ("iris", {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [1, 2]}]}, 400),
        ("iris", {"inputs": [{"name": "nope", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}, 400),
        ("iris", {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "INT32", "data": [1, 2, 3, 4]}]}, 400),
        ("iris", {"inputs": [{"name": "features", "shape": [4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}, 400),
        ("iris", dict(IRIS_BODY, outputs=[{"name": "nope"}]), 400),
        ("no-such-model", IRIS_BODY, 404),
        ("batch-echo", OVERSIZED_BATCH, 400),  # 17 rows, max_batch_size 16: the scheduler's check
    ]
    for model, body, status in cases:
        queued = submit(jobs_gateway, model, body)
        sync = jobs_gateway.request("POST", f"/v2/models/{model}/infer", body)
        assert queued.status == sync.status == status, (body, queued, sync)
        assert queued.json() == sync.json()
        assert "location" not in queued.headers


def test_unknown_and_malformed_job_ids_are_404(jobs_gateway):
    for job_id in (UNKNOWN_ID, "not-a-job", "x" * 200):
        for method in ("GET", "DELETE"):
            response = jobs_gateway.request(method, f"/v2/jobs/{job_id}")
            assert response.status == 404, response
            assert f"job '{job_id}' not found" in response.json()["error"]


def test_a_payload_over_the_queue_limit_is_413_naming_it_and_still_served_synchronously(jobs_gateway):
    size = 300_000  # 1.2 MB of FP32: under the gateway's body limit, over NATS's default max_payload (1 MiB)
    header = json.dumps(
        {
            "inputs": [
                {"name": "input", "shape": [1, size], "datatype": "FP32", "parameters": {"binary_data_size": size * 4}}
            ]
        }
    ).encode()
    body = header + np.zeros(size, dtype=np.float32).tobytes()
    headers = {"Inference-Header-Content-Length": str(len(header))}
    queued = jobs_gateway.request("POST", "/v2/models/mock/infer", body, {**headers, "Prefer": "respond-async"})
    assert queued.status == 413, queued
    error = queued.json()["error"]
    assert "max_payload is 1048576 bytes" in error and "at most 1047552 bytes" in error
    assert jobs_gateway.request("POST", "/v2/models/mock/infer", body, headers).status == 200


def test_idempotency_key_returns_the_same_job(jobs_gateway):
    key = f"order-{random.getrandbits(64)}"
    first = submit(jobs_gateway, "iris", IRIS_BODY, {"Idempotency-Key": key})
    second = submit(jobs_gateway, "iris", IRIS_BODY, {"Idempotency-Key": key})
    assert first.status == second.status == 202
    assert first.json()["id"] == second.json()["id"]
    assert poll(jobs_gateway, first.json()["id"])["status"] == "succeeded"
    third = submit(jobs_gateway, "iris", IRIS_BODY, {"Idempotency-Key": key})
    assert third.json() == {"id": first.json()["id"], "status": "succeeded"}
    other_model = submit(jobs_gateway, "mock", {"inputs": [{"name": "input", "shape": [1, 1], "datatype": "FP32",
                                                            "data": [1]}]}, {"Idempotency-Key": key})  # fmt: skip
    assert other_model.status == 409 and "already names job" in other_model.json()["error"]
    too_long = submit(jobs_gateway, "iris", IRIS_BODY, {"Idempotency-Key": "k" * 300})
    assert too_long.status == 400 and "Idempotency-Key" in too_long.json()["error"]


def test_a_deterministic_model_error_fails_the_job_once_with_its_message(jobs_gateway, jobs_replica):
    body = {"inputs": [{"name": "input", "shape": [2], "datatype": "FP32", "data": [1, 2]}]}
    job_id = submit(jobs_gateway, "always-fails", body).json()["id"]
    doc = poll(jobs_gateway, job_id)
    assert doc["status"] == "failed" and doc["attempts"] == 1
    assert "injected failure" in doc["error"]
    # Waiting for a failed job answers as the synchronous call does.
    waited = jobs_gateway.request("POST", "/v2/models/always-fails/infer", body, {"Prefer": "respond-async, wait=10"})
    sync = jobs_gateway.request("POST", "/v2/models/always-fails/infer", body)
    assert waited.status == sync.status == 500 and waited.json() == sync.json()
    metrics = http_text(f"127.0.0.1:{jobs_replica.metrics_port}", "/metrics")
    assert 'inferencehub_jobs_total{model="always-fails",outcome="failed"} 2.0' in metrics


def http_text(address: str, path: str) -> str:
    import http.client

    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", path)
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def test_wait_preference_answers_with_the_inference_response(jobs_gateway):
    waited = submit(jobs_gateway, "iris", IRIS_BODY, {"Prefer": "respond-async, wait=10"})
    sync = jobs_gateway.request("POST", "/v2/models/iris/infer", IRIS_BODY)
    assert waited.status == 200 and waited.json() == sync.json()
    # A job that does not finish within the wait: 202 all the same.
    body = {"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": [1]}]}
    slow = submit(jobs_gateway, "slow-one", body, {"Prefer": "respond-async, wait=0.1"})
    assert slow.status == 202 and slow.json()["status"] in {"queued", "running"}
    assert poll(jobs_gateway, slow.json()["id"])["status"] == "succeeded"


def test_metrics_count_jobs_and_show_the_queue(jobs_gateway, jobs_replica):
    body = {"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": [1]}]}
    ids = [submit(jobs_gateway, "slow-one", body).json()["id"] for _ in range(4)]

    def gateway_sees_a_queue():
        text = jobs_gateway.request("GET", "/metrics").body.decode()
        depth = _sample(text, 'inferencehub_jobs_queue_depth{model="slow-one"}')
        age = _sample(text, 'inferencehub_jobs_oldest_age_seconds{model="slow-one"}')
        return depth is not None and depth >= 1 and age is not None and age > 0

    wait_for(gateway_sees_a_queue, 10, what="queue depth and oldest age on the gateway's /metrics")
    text = jobs_gateway.request("GET", "/metrics").body.decode()
    assert _sample(text, 'inferencehub_gateway_jobs_submitted_total{model="slow-one",outcome="accepted"}') >= 4
    for job_id in ids:
        poll(jobs_gateway, job_id)
    replica = http_text(f"127.0.0.1:{jobs_replica.metrics_port}", "/metrics")
    assert _sample(replica, 'inferencehub_jobs_total{model="slow-one",outcome="succeeded"}') >= 4
    assert _sample(replica, 'inferencehub_jobs_queued_seconds_count{model="slow-one"}') >= 4
    assert _sample(replica, 'inferencehub_jobs_running_seconds_sum{model="slow-one"}') >= 4 * 0.8


def _sample(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_a_full_queue_is_429_and_nats_down_is_503_while_sync_is_unaffected(jobs_replica, tmp_path):
    """A second NATS nobody consumes from: queue limit 2, then the server stops."""
    nats = NatsServer(tmp_path / "nats")
    gateway = None
    try:
        gateway = Gateway(f"ipv4:{jobs_replica.target}", "--nats", nats.url, "--jobs-max-queue", "2")
        wait_for(lambda: queue_ready(gateway), what="the gateway's job queue")
        first, second = (submit(gateway, "iris", IRIS_BODY) for _ in range(2))
        assert first.status == second.status == 202
        full = submit(gateway, "iris", IRIS_BODY)
        assert full.status == 429 and full.headers["retry-after"] == "1"
        assert full.json()["error"] == "the job queue of model 'iris' is full (2 unfinished jobs); retry later"
        # Another model has its own queue; cancelling a queued job frees its place at once.
        other = submit(gateway, "mock", {"inputs": [{"name": "input", "shape": [1, 1], "datatype": "FP32",
                                                     "data": [1]}]})  # fmt: skip
        assert other.status == 202
        assert gateway.request("DELETE", f"/v2/jobs/{first.json()['id']}").status == 200
        assert submit(gateway, "iris", IRIS_BODY).status == 202

        nats.stop()
        down = submit(gateway, "iris", IRIS_BODY)
        assert down.status == 503 and down.headers["retry-after"] == "1"
        assert "the job queue (NATS JetStream stream INFERENCEHUB_JOBS at nats://127.0.0.1:" in down.json()["error"]
        assert gateway.request("GET", f"/v2/jobs/{second.json()['id']}").status == 503
        sync = gateway.request("POST", "/v2/models/iris/infer", IRIS_BODY)
        assert sync.status == 200 and sync.json()["outputs"][1]["data"] == [2]
        started = time.monotonic()
        assert submit(gateway, "iris", IRIS_BODY).status == 503
        assert time.monotonic() - started < 1.0  # refused at once, not after a timeout
    finally:
        if gateway is not None:
            gateway.stop()
        nats.stop()


def test_without_a_queue_the_preference_is_not_applied(gateway):
    """The session's gateway has no --nats: the request is served synchronously, as RFC 7240 allows."""
    response = gateway.request("POST", "/v2/models/iris/infer", IRIS_BODY, {"Prefer": "respond-async"})
    assert response.status == 200 and "preference-applied" not in response.headers
    assert response.json()["outputs"][1]["data"] == [2]
    assert gateway.request("GET", f"/v2/jobs/{UNKNOWN_ID}").status == 404


def test_an_idempotent_retry_completes_a_submission_that_stopped_half_way(nats, jobs_gateway):
    """A gateway that died after claiming the key but before queueing: the retry queues the same job id."""
    import asyncio

    import nats as nats_client

    from inferencehub import jobqueue

    key, job_id = f"half-{random.getrandbits(64)}", jobqueue.new_job_id()

    async def claim_key_only() -> None:
        nc = await nats_client.connect(nats.url)
        try:
            kv = await nc.jetstream().key_value(jobqueue.BUCKET)
            await kv.create(jobqueue.idempotency_key(key), job_id.encode())
        finally:
            await nc.close()

    asyncio.run(claim_key_only())
    assert jobs_gateway.request("GET", f"/v2/jobs/{job_id}").status == 404
    retried = submit(jobs_gateway, "iris", IRIS_BODY, {"Idempotency-Key": key})
    assert retried.status == 202 and retried.json()["id"] == job_id
    assert poll(jobs_gateway, job_id)["result"]["outputs"][1]["data"] == [2]


def test_the_status_endpoint_lists_recent_jobs_with_their_state(jobs_gateway):
    iris = {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [6.3, 3.3, 6.0, 2.5]}]}
    ids = []
    for _ in range(3):
        answer = submit(jobs_gateway, "iris", iris)
        assert answer.status == 202, answer
        ids.append(answer.json()["id"])
    for job_id in ids:
        poll(jobs_gateway, job_id)

    def listed():
        jobs = jobs_gateway.request("GET", "/status.json").json()["jobs"]
        return jobs if [j["id"] for j in jobs[:3]] == ids[::-1] else None  # newest first

    jobs = wait_for(listed, 10, what="the three jobs on the status endpoint")
    for job in jobs[:3]:
        assert job["model_name"] == "iris" and job["status"] == "succeeded", job
        assert job["created_at"].endswith("Z") and job["finished_at"] and job["replica"]
