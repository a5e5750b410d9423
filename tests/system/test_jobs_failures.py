"""Async jobs when things die: a replica SIGKILLed holding jobs, a job that kills every replica it reaches, a
gateway killed right after its 202s, a replica stopped with SIGTERM, one node of a 3-node JetStream cluster
killed mid-run, and the NATS server killed and started again with an empty store. Every accepted job succeeds, and
no job is ever reported twice with different results."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from conftest import (
    JOB_FINAL as FINAL,
)
from conftest import (
    JOB_UNKNOWN_ID as UNKNOWN_ID,
)
from conftest import (
    TEST_MODELS,
    Gateway,
    NatsServer,
    Replica,
    model_repository,
    nats_cluster,
    wait_for,
)
from conftest import (
    job_queue_ready as queue_ready,
)

LEASE = "1.5"


def body(value: float) -> dict:
    return {"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": [value]}]}


def submit(gateway: Gateway, model: str, value: float):
    return gateway.request("POST", f"/v2/models/{model}/infer", body(value), {"Prefer": "respond-async"})


def job(gateway: Gateway, job_id: str) -> dict:
    response = gateway.request("GET", f"/v2/jobs/{job_id}")
    assert response.status == 200, response
    return response.json()


def finished(gateway: Gateway, job_id: str, timeout: float = 60) -> dict:
    return wait_for(lambda: (d := job(gateway, job_id))["status"] in FINAL and d, timeout, 0.05, f"job {job_id}")


def assert_succeeded_once(gateway: Gateway, jobs: dict[str, float], timeout: float = 60) -> list[dict]:
    """Every job succeeded with its own input echoed back, and reads back the same afterwards."""
    docs = []
    for job_id, value in jobs.items():
        doc = finished(gateway, job_id, timeout)
        assert doc["status"] == "succeeded", doc
        assert doc["result"]["outputs"][0]["data"] == [value], doc
        docs.append(doc)
    for doc in docs:  # a second read: nothing was rewritten by a late delivery
        assert job(gateway, doc["id"]) == doc
    return docs


@pytest.fixture
def repo(tmp_path):
    return model_repository(tmp_path / "models", TEST_MODELS / "steady", TEST_MODELS / "crasher")


def start_replica(repo, nats_url: str, name: str, *args: str) -> Replica:
    return Replica(
        "--models", str(repo), "--replica-name", name, "--nats", nats_url, "--jobs-lease-seconds", LEASE,
        "--drain-seconds", "0", "--grace-seconds", "5", *args,
    ).wait_serving()  # fmt: skip


def start_gateway(replicas: str, nats_url: str, *args: str) -> Gateway:
    gateway = Gateway(replicas, "--nats", nats_url, *args)
    wait_for(lambda: queue_ready(gateway), what="the gateway's job queue")
    return gateway


def test_a_replica_killed_holding_jobs_has_them_redelivered(nats, repo):
    first = start_replica(repo, nats.url, "first")
    gateway = start_gateway(f"ipv4:{first.target}", nats.url)
    second = None
    try:
        wait_for(lambda: "jobs: pulling" in first.log)
        jobs = {submit(gateway, "steady", i).json()["id"]: float(i) for i in range(16)}
        # steady runs 2 at a time for 150 ms and the replica holds 4: kill it while it holds some.
        wait_for(lambda: sum(job(gateway, j)["status"] == "running" for j in jobs) >= 2, what="jobs running")
        first.kill()
        second = start_replica(repo, nats.url, "second")
        docs = assert_succeeded_once(gateway, jobs)
        assert any(d["attempts"] == 2 for d in docs), "no job was running on the killed replica"
        assert all(d["attempts"] <= 2 for d in docs)
    finally:
        gateway.stop()
        first.kill()
        if second is not None:
            second.stop()


def test_a_job_that_kills_every_replica_fails_after_its_attempts(nats, repo):
    first = start_replica(repo, nats.url, "first", "--jobs-max-attempts", "1")
    gateway = start_gateway(f"ipv4:{first.target}", nats.url)
    second = None
    try:
        wait_for(lambda: "jobs: pulling" in first.log)
        job_id = submit(gateway, "crasher", 1).json()["id"]
        wait_for(lambda: first.proc.poll() is not None, what="the crasher to kill the replica")
        assert job(gateway, job_id)["status"] == "running"
        second = start_replica(repo, nats.url, "second", "--jobs-max-attempts", "1")
        doc = finished(gateway, job_id)
        assert doc["status"] == "failed" and doc["attempts"] == 1
        assert "delivered 1 times and no replica finished it" in doc["error"]
        second.check_running()  # the last delivery only recorded the failure: it did not run the model
        assert submit(gateway, "steady", 5).status == 202
    finally:
        gateway.stop()
        first.kill()
        if second is not None:
            second.stop()


def test_a_gateway_killed_right_after_its_202s_loses_no_job(nats, repo):
    replica = start_replica(repo, nats.url, "replica")
    gateway = start_gateway(f"ipv4:{replica.target}", nats.url)
    other = None
    try:
        jobs = {}
        for i in range(30):
            response = submit(gateway, "steady", 100 + i)
            assert response.status == 202
            jobs[response.json()["id"]] = 100.0 + i
        gateway.kill()
        other = start_gateway(f"ipv4:{replica.target}", nats.url)
        assert_succeeded_once(other, jobs)
    finally:
        gateway.kill()
        if other is not None:
            other.stop()
        replica.stop()


def test_sigterm_stops_pulling_and_finishes_held_jobs(nats, repo, tmp_path):
    slow = model_repository(tmp_path / "slow", TEST_MODELS / "slow-one")
    replica = start_replica(slow, nats.url, "leaving")
    gateway = start_gateway(f"ipv4:{replica.target}", nats.url)
    try:
        wait_for(lambda: "jobs: pulling" in replica.log)
        jobs = {submit(gateway, "slow-one", i).json()["id"]: float(i) for i in range(3)}
        ids = list(jobs)
        # slow-one: one call at a time, 800 ms; the replica holds two jobs, the third waits in the stream.
        wait_for(lambda: job(gateway, ids[0])["status"] == "running" and job(gateway, ids[1])["status"] == "running")
        assert job(gateway, ids[2])["status"] == "queued"
        assert replica.terminate(timeout=15) == 0
        assert "2 held job(s) have 5.0s to finish" in replica.log
        assert_succeeded_once(gateway, {ids[0]: 0.0, ids[1]: 1.0}, timeout=5)
        assert job(gateway, ids[2])["status"] == "queued"  # never pulled after SIGTERM
    finally:
        gateway.stop()
        replica.stop()


def test_a_nats_server_restarted_empty_is_set_up_again_without_restarting_the_services(tmp_path, repo):
    first = NatsServer(tmp_path / "store-1")
    servers = [first]
    replica = start_replica(repo, first.url, "replica")
    gateway = start_gateway(f"ipv4:{replica.target}", first.url)
    try:
        wait_for(lambda: "jobs: pulling" in replica.log)
        before = submit(gateway, "steady", 1)
        assert before.status == 202, before
        assert_succeeded_once(gateway, {before.json()["id"]: 1.0})
        # A consumer deleted under the running replica: its next fetch fails, and it creates the consumer again.
        delete_consumer(first.url, "inferencehub-steady")
        again = submit(gateway, "steady", 3)
        assert again.status == 202, again
        assert_succeeded_once(gateway, {again.json()["id"]: 3.0}, timeout=30)
        # The job stream deleted under both (no reconnection to tell them): the gateway's next publish finds nothing
        # answering, creates the stream again and publishes; the replica creates its consumer again.
        delete_stream(first.url, "INFERENCEHUB_JOBS")
        once_more = submit(gateway, "steady", 4)
        assert once_more.status == 202, once_more
        assert_succeeded_once(gateway, {once_more.json()["id"]: 4.0}, timeout=30)
        first.kill()
        # The same port, a new empty store: no stream, no bucket, no consumer.
        second = NatsServer(tmp_path / "store-2", "-p", str(first.port))
        servers.append(second)
        assert not list((tmp_path / "store-2").rglob("INFERENCEHUB_JOBS"))
        # The services reconnect by themselves; the first job submitted afterwards succeeds.
        wait_for(lambda: gateway.request("GET", f"/v2/jobs/{UNKNOWN_ID}").status == 404, 30, what="the queue again")
        after = submit(gateway, "steady", 2)
        assert after.status == 202, after
        assert_succeeded_once(gateway, {after.json()["id"]: 2.0}, timeout=30)
        assert "reconnected" in gateway.log and "reconnected" in replica.log
        gateway.check_running()
        replica.check_running()
    finally:
        gateway.stop()
        replica.stop()
        for server in servers:
            server.stop()


def delete_consumer(url: str, name: str) -> None:
    asyncio.run(_jetstream(url, lambda js: js.delete_consumer("INFERENCEHUB_JOBS", name)))


def delete_stream(url: str, name: str) -> None:
    asyncio.run(_jetstream(url, lambda js: js.delete_stream(name)))


async def _jetstream(url: str, call) -> None:
    import nats as nats_client

    nc = await nats_client.connect(url)
    try:
        assert await call(nc.jetstream())
    finally:
        await nc.close()


def stream_leader(url: str) -> str:
    import nats as nats_client

    async def leader() -> str:
        nc = await nats_client.connect(url)
        try:
            info = await nc.jetstream().stream_info("INFERENCEHUB_JOBS")
            return info.cluster.leader
        finally:
            await nc.close()

    return asyncio.run(leader())


def test_one_node_of_a_three_node_cluster_killed_mid_run(tmp_path, repo):
    nodes = nats_cluster(tmp_path / "cluster")
    urls = ",".join(n.url for n in nodes)
    replica = gateway = None
    try:
        replica = start_replica(repo, urls, "replica")
        gateway = start_gateway(f"ipv4:{replica.target}", urls, "--jobs-replicas", "3")
        wait_for(lambda: "jobs: pulling" in replica.log)
        accepted: dict[str, float] = {}
        refused = []
        done = threading.Event()

        def load() -> None:
            i = 0
            while not done.is_set():
                response = submit(gateway, "steady", 1000 + i)
                if response.status == 202:
                    accepted[response.json()["id"]] = 1000.0 + i
                else:
                    assert response.status == 503, response  # the queue said so plainly while it failed over
                    refused.append(response)
                i += 1
                time.sleep(0.02)

        thread = threading.Thread(target=load)
        thread.start()
        try:
            wait_for(lambda: len(accepted) >= 20, what="jobs before the failure")
            leader = stream_leader(nodes[0].url)
            victim = next(n for n in nodes if n.args[1] == leader)
            victim.kill()
            count = len(accepted)
            wait_for(lambda: len(accepted) >= count + 20, 30, what="jobs accepted after the failure")
        finally:
            done.set()
            thread.join(30)
        assert_succeeded_once(gateway, accepted, timeout=90)
        assert job(gateway, next(iter(accepted)))["attempts"] >= 1
        assert gateway.request("GET", f"/v2/jobs/{UNKNOWN_ID}").status == 404
        print(json.dumps({"accepted": len(accepted), "refused_during_failover": len(refused)}))
    finally:
        if gateway is not None:
            gateway.stop()
        if replica is not None:
            replica.stop()
        for node in nodes:
            node.stop()
