"""The two images, proven together: compose.yaml run with rootful podman (`make test-containers`, not `make test`).

Both images are built from the Dockerfiles, started as compose.yaml declares them (one network, N inference
replicas behind the name "inference", uid 10001, read-only root with a tmpfs /tmp, no capabilities), and then:
traffic through the gateway container reaches every inference container; one inference container is stopped
under load with zero failed requests; one is added and gets traffic; everything stops cleanly (exit code 0).
Needs root (podman is rootful here); scripts/podman-prep.sh installs and configures podman when missing.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest
from compose_podman import Project, podman

from conftest import ROOT, wait_for

pytestmark = pytest.mark.timeout(1800)
MOCK = json.dumps({"inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]})
IRIS = json.dumps({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [6.3, 3.3, 6.0, 2.5]}]})
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def project() -> Iterator[Project]:
    if os.geteuid() != 0:
        pytest.fail("the container test needs root (rootful podman): run it as root, as CI does")
    prep = subprocess.run(
        ["bash", str(ROOT / "scripts" / "podman-prep.sh")], capture_output=True, text=True, timeout=1200
    )
    assert prep.returncode == 0, prep.stderr[-3000:]
    for word in prep.stdout.split():  # export CONTAINERS_CONF=... CONTAINERS_STORAGE_CONF=...
        if "=" in word:
            key, value = word.split("=", 1)
            os.environ[key] = value
    compose = Project(ROOT / "compose.yaml", name=f"inferencehub-test-{os.getpid()}", publish_any_port=True)
    started = time.monotonic()
    for service in compose.spec["services"]:
        # No registry is needed: the base image is local (or a stand-in podman-prep.sh built).
        TIMINGS[f"build {service}"] = compose.build(
            service, ("--format", "docker", "--network", "host", "--pull=never")
        )
    try:
        compose.up(health_timeout=180)
        TIMINGS["build and up"] = time.monotonic() - started
        yield compose
    finally:
        for service, containers in compose.containers.items():
            for container in containers:
                if compose.running(container):
                    print(f"--- {service} {container}\n{compose.logs(container)}")
        compose.down()
        print("timings:", {k: round(v, 1) for k, v in TIMINGS.items()})


@pytest.fixture(scope="module")
def gateway(project: Project) -> tuple[str, int]:
    (container,) = project.containers["gateway"]
    project.wait_healthy([container], timeout=60)
    return container, project.host_port(container, 8080)


def hostname(project: Project, container: str) -> str:
    return project.inspect(container)["Config"]["Hostname"]


def call(port: int, model: str = "mock", body: str = MOCK, conn: http.client.HTTPConnection | None = None):
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", f"/v2/models/{model}/infer", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.getheader("x-inferencehub-replica", ""), response.read()
    finally:
        if own:
            conn.close()


class Load:
    """Closed-loop load through the gateway: every failure (a non-200 or a broken connection) is counted."""

    def __init__(self, port: int, workers: int = 4) -> None:
        self.port, self.stop_event = port, threading.Event()
        self.replicas: Counter[str] = Counter()
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._work, daemon=True) for _ in range(workers)]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(timeout=90)

    def _work(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        while not self.stop_event.is_set():
            try:
                status, replica, body = call(self.port, conn=conn)
                outcome = None if status == 200 else f"{status} {body[:200]!r}"
            except (OSError, http.client.HTTPException) as error:
                outcome, replica = f"{type(error).__name__}: {error}", ""
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            with self.lock:
                if outcome:
                    self.failures.append(outcome)
                else:
                    self.replicas[replica.split(":")[0]] += 1
        conn.close()

    def served(self) -> Counter[str]:
        with self.lock:
            return Counter(self.replicas)


def test_containers_run_as_the_chart_runs_pods(project, gateway):
    for service, containers in project.containers.items():
        for container in containers:
            info = project.inspect(container)
            assert info["Config"]["User"] == "10001:10001", container
            assert info["HostConfig"]["ReadonlyRootfs"] is True, container
            probe = podman(
                "exec",
                container,
                "python",
                "-c",
                "import os, pathlib\n"
                "status = dict(l.split(':', 1) for l in open('/proc/1/status').read().splitlines())\n"
                "writable = []\n"
                "for path in ('/', '/opt/venv', '/tmp'):\n"
                "    try:\n"
                "        pathlib.Path(path, 'probe').write_text('x'); writable.append(path)\n"
                "    except OSError:\n"
                "        pass\n"
                "print(os.getuid(), os.getgid(), status['CapEff'].strip(), status['CapBnd'].strip(),"
                " status['NoNewPrivs'].strip(), ','.join(writable))",
            ).stdout.split()
            assert probe == ["10001", "10001", "0" * 16, "0" * 16, "1", "/tmp"], (service, container, probe)


def test_one_name_resolves_to_every_inference_container(project, gateway):
    addresses = set()
    for container in project.containers["inference"]:
        networks = project.inspect(container)["NetworkSettings"]["Networks"]
        addresses |= {n["IPAddress"] for n in networks.values()}
    assert len(addresses) == project.replicas("inference") >= 2
    resolved = podman(
        "exec",
        gateway[0],
        "python",
        "-c",
        "import socket; print(' '.join(sorted({a[4][0] for a in socket.getaddrinfo('inference', 8081)})))",
    ).stdout.split()
    assert set(resolved) == addresses


def test_traffic_through_the_gateway_reaches_every_inference_container(project, gateway):
    _, port = gateway
    status, _, body = call(port, "iris", IRIS)
    assert status == 200, body
    outputs = {o["name"]: o for o in json.loads(body)["outputs"]}
    assert outputs["label"]["data"] == [2]
    expected = {hostname(project, c) for c in project.containers["inference"]}
    with Load(port) as load:
        wait_for(lambda: set(load.served()) >= expected, timeout=60, interval=0.5, what="every replica to serve")
    assert not load.failures, load.failures[:5]
    assert set(load.served()) == expected, load.served()


def test_an_async_job_goes_through_the_job_queue_container(project, gateway):
    _, port = gateway

    def ask(method: str, path: str, body: str | None = None, headers: dict | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            conn.request(method, path, body, headers or {})
            answer = conn.getresponse()
            return answer.status, dict(answer.getheaders()), answer.read()
        finally:
            conn.close()

    status, headers, body = ask("POST", "/v2/models/mock/infer", MOCK, {"Prefer": "respond-async"})
    assert status == 202 and headers["Preference-Applied"] == "respond-async", body
    location = headers["Location"]
    deadline = time.monotonic() + 60
    while True:
        status, _, body = ask("GET", location)
        job = json.loads(body)
        if status == 200 and job["status"] == "succeeded":
            break
        assert status == 200 and job["status"] in ("queued", "running") and time.monotonic() < deadline, job
        time.sleep(0.2)
    assert job["result"]["outputs"][0]["data"] == [1.0, 2.0]
    assert job["attempts"] >= 1  # an inference container pulled it and ran it


def test_stopping_an_inference_container_under_load_fails_no_request(project, gateway):
    _, port = gateway
    victim = project.containers["inference"][0]
    victim_host = hostname(project, victim)
    with Load(port) as load:
        wait_for(lambda: load.served()[victim_host] >= 20, timeout=60, interval=0.2, what="load on the victim")
        started = time.monotonic()
        exit_code = project.stop(victim)  # SIGTERM: NOT_SERVING, drain, in-flight calls finish, exit
        TIMINGS["graceful stop under load"] = time.monotonic() - started
        before = load.served()
        wait_for(lambda: sum(load.served().values()) > sum(before.values()) + 50, timeout=60, what="more traffic")
    assert exit_code == 0, project.logs(victim)
    assert not load.failures, load.failures[:5]
    assert load.served()[victim_host] == before[victim_host], "the stopped replica still got calls"
    survivors = {hostname(project, c) for c in project.containers["inference"][1:]}
    assert all(load.served()[h] > before[h] for h in survivors), load.served()


def test_an_added_inference_container_gets_traffic(project, gateway):
    _, port = gateway
    added = project.start("inference")  # `docker compose up --scale inference=N+1`, one more replica
    project.wait_healthy([added], timeout=120)
    added_host = hostname(project, added)
    with Load(port) as load:
        # The gateway re-resolves "inference" when a connection ages out (10 s here), and then uses the new one.
        wait_for(lambda: load.served()[added_host] >= 10, timeout=90, interval=0.5, what="the new replica to serve")
    assert not load.failures, load.failures[:5]


def test_killing_an_inference_container_under_load_fails_only_its_calls_in_flight(project, gateway):
    # SIGKILL: the calls the replica was running break with its connection. The gateway never replays a call a
    # replica may have begun, so each of those fails once, with a clear 503; once the gateway has noticed, every
    # request goes to the others and nothing more fails.
    _, port = gateway
    victim = next(c for c in project.containers["inference"] if project.running(c))
    victim_host = hostname(project, victim)
    with Load(port) as load:
        wait_for(lambda: load.served()[victim_host] >= 20, timeout=60, interval=0.2, what="load on the victim")
        project.kill(victim)
        before = sum(load.served().values())
        wait_for(lambda: sum(load.served().values()) > before + 100, timeout=60, what="more traffic")
        failed_at_the_kill = len(load.failures)
        wait_for(lambda: sum(load.served().values()) > before + 300, timeout=60, what="still more traffic")
    assert len(load.failures) == failed_at_the_kill, load.failures[failed_at_the_kill:][:5]
    assert len(load.failures) <= len(load.threads), load.failures[:5]  # at most one call in flight per client
    assert all(f.startswith("503 ") and "never replayed" in f for f in load.failures), load.failures[:5]


def test_everything_stops_cleanly(project, gateway):
    for service in ("gateway", "inference"):  # the entry point first, as a rolling shutdown would
        for container in project.containers[service]:
            if project.running(container):
                started = time.monotonic()
                assert project.stop(container) == 0, (container, project.logs(container))
                TIMINGS[f"stop {container.split('_', 1)[1]}"] = time.monotonic() - started
    project.down()
    label = f"label=com.docker.compose.project={project.name}"
    assert podman("ps", "--all", "--filter", label, "--format", "{{.Names}}").stdout.split() == []
    networks = podman("network", "ls", "--format", "{{.Name}}").stdout.split()
    assert not [n for n in networks if n.startswith(project.name)]
