"""Model control at run time (Triton's model repository extension), through stock clients and real processes.

Two replicas in ``explicit`` mode behind one gateway: the index, load and unload over HTTP (tritonclient.http, against
the gateway: each call must reach both replicas) and gRPC (tritonclient.grpc, against one replica); a config override
on load; traffic to another model that never fails while one model is loaded, replaced and unloaded; calls in flight
on a model being unloaded that finish, and later ones that get a 404 naming it; health names and the ready metric
following; ``none`` mode refusing; API key roles; ``poll`` mode reloading a model whose files change.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import shutil
import threading
import urllib.request
from pathlib import Path

import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from conftest import SHIPPED, Gateway, NatsServer, Replica, health_status, job_queue_ready, wait_for

IRIS_BODY = {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]}
MOCK_BODY = {"inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]}]}
ADMIN_KEY, USER_KEY = "admin-key-0123456789", "user-key-0123456789"


def mock_config(version: str = "1", latency_ms: int = 0, mode: str = "sleep") -> dict:
    return {
        "name": "mock",
        "version": version,
        "runtime": "mock",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, -1]}],
        "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, -1]}],
        "parameters": {"mode": mode, "latency": {"distribution": "fixed", "ms": latency_ms}},
    }


def repository(folder: Path) -> Path:
    """iris (shipped, copied) and a mock model whose config the tests may rewrite."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copytree(SHIPPED / "iris", folder / "iris")
    (folder / "mock").mkdir()
    (folder / "mock" / "config.json").write_text(json.dumps(mock_config()))
    return folder


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return repository(tmp_path_factory.mktemp("control") / "models")


@pytest.fixture(scope="module")
def pair(repo):
    """Two replicas in explicit mode, each loading iris at start."""
    replicas = []
    try:
        for i in range(2):
            replicas.append(
                Replica(
                    "--models",
                    str(repo),
                    "--model-control-mode",
                    "explicit",
                    "--load",
                    "iris",
                    "--replica-name",
                    f"control-{i + 1}",
                    "--processes",
                    "1",
                    "--grace-seconds",
                    "5",
                )
            )
        for replica in replicas:
            replica.wait_serving()
        yield replicas
    finally:
        for replica in replicas:
            replica.terminate()
            replica.kill()


@pytest.fixture(scope="module")
def front(pair):
    server = Gateway("ipv4:" + ",".join(r.target for r in pair))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture()
def unloaded(front, pair):
    """Each test starts with mock unloaded everywhere and its config back to the original."""
    yield
    assert front.request("POST", "/v2/repository/models/mock/unload").status == 200


def ready_everywhere(pair, model: str) -> list[bool]:
    result = []
    for replica in pair:
        client = triton_grpc.InferenceServerClient(replica.target)
        try:
            result.append(client.is_model_ready(model))
        finally:
            client.close()
    return result


def metric(replica: Replica, name: str, labels: str) -> float | None:
    text = urllib.request.urlopen(f"http://127.0.0.1:{replica.metrics_port}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and labels in line:
            return float(line.rsplit(" ", 1)[1])
    return None


class Traffic(threading.Thread):
    """A bounded loop of requests to one model through the gateway, counting each answer's status."""

    def __init__(self, gateway: Gateway, model: str, body: dict, limit: int = 2000) -> None:
        super().__init__(daemon=True)
        self.gateway, self.model, self.body, self.limit = gateway, model, json.dumps(body), limit
        self.statuses: dict[int, int] = {}
        self.failures: list[str] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.gateway.port, timeout=30)
        try:
            for _ in range(self.limit):
                if self.stopping.is_set():
                    break
                conn.request("POST", f"/v2/models/{self.model}/infer", body=self.body)
                response = conn.getresponse()
                payload = response.read()
                self.statuses[response.status] = self.statuses.get(response.status, 0) + 1
                if response.status != 200:
                    self.failures.append(f"{response.status} {payload[:200]!r}")
        finally:
            conn.close()

    def finish(self) -> int:
        self.stopping.set()
        self.join(60)
        return sum(self.statuses.values())


def test_index_over_http_and_grpc_lists_loaded_and_loadable_models(front, pair):
    client = triton_http.InferenceServerClient(front.url)
    index = {e["name"]: e for e in client.get_model_repository_index()}
    assert index["iris"]["state"] == "READY" and index["iris"]["version"] == "1"
    assert index["mock"]["state"] == "UNAVAILABLE" and index["mock"]["reason"] == "not loaded"
    assert [e["name"] for e in front.request("POST", "/v2/repository/index", {"ready": True}).json()] == ["iris"]
    grpc_client = triton_grpc.InferenceServerClient(pair[0].target)
    try:
        models = grpc_client.get_model_repository_index(as_json=True)["models"]
    finally:
        grpc_client.close()
    assert {m["name"]: m.get("state") for m in models} == {"iris": "READY", "mock": "UNAVAILABLE"}


def test_load_and_unload_through_the_gateway_reach_every_replica(front, pair, unloaded):
    client = triton_http.InferenceServerClient(front.url)
    assert ready_everywhere(pair, "mock") == [False, False]
    client.load_model("mock")
    assert ready_everywhere(pair, "mock") == [True, True]
    assert [health_status(r.target, "mock") for r in pair] == ["SERVING", "SERVING"]
    assert [metric(r, "inferencehub_model_ready", 'model="mock"') for r in pair] == [1.0, 1.0]
    for _ in range(4):  # both replicas answer (round robin)
        assert front.request("POST", "/v2/models/mock/infer", MOCK_BODY).status == 200

    client.unload_model("mock")
    assert ready_everywhere(pair, "mock") == [False, False]
    assert [health_status(r.target, "mock") for r in pair] == ["NOT_SERVING", "NOT_SERVING"]
    assert [metric(r, "inferencehub_model_ready", 'model="mock"') for r in pair] == [0.0, 0.0]
    answer = front.request("POST", "/v2/models/mock/infer", MOCK_BODY)
    assert answer.status == 404 and "model 'mock' is not loaded" in answer.json()["error"], answer


def test_load_over_grpc_on_one_replica_with_a_config_override(front, pair, unloaded):
    client = triton_grpc.InferenceServerClient(pair[0].target)
    try:
        client.load_model("mock", config=json.dumps(mock_config(version="7")))
        assert client.get_model_metadata("mock", as_json=True)["versions"] == ["7"]
        client.unload_model("mock")
        assert not client.is_model_ready("mock")
    finally:
        client.close()
    # Over HTTP through the gateway, on both: the config's name may be left out (it is the path's).
    override = {k: v for k, v in mock_config(version="8").items() if k != "name"}
    triton_http.InferenceServerClient(front.url).load_model("mock", config=json.dumps(override))
    for _ in range(4):
        answer = front.request("POST", "/v2/models/mock/infer", MOCK_BODY)
        assert answer.status == 200 and answer.json()["model_version"] == "8", answer


def test_bad_loads_get_clear_errors_naming_the_replicas(front, pair):
    bad_json = front.request("POST", "/v2/repository/models/mock/load", {"parameters": {"config": "{oops"}})
    assert bad_json.status == 400
    message = bad_json.json()["error"]
    assert "failed on 2 of 2 replica(s)" in message and "control-1" in message and "control-2" in message
    assert "not valid JSON" in message
    bad_field = front.request(
        "POST", "/v2/repository/models/mock/load", {"parameters": {"config": json.dumps({"runtime": "nope"})}}
    )
    assert bad_field.status == 400 and "runtime" in bad_field.json()["error"], bad_field
    unknown = front.request("POST", "/v2/repository/models/nope/load")
    assert unknown.status == 404 and "model 'nope' is not in the model repository" in unknown.json()["error"]
    garbage = front.request("POST", "/v2/repository/models/mock/load", "[1, 2]")
    assert garbage.status == 400 and "load of model 'mock'" in garbage.json()["error"]
    with pytest.raises(InferenceServerException, match="not valid JSON"):
        triton_http.InferenceServerClient(front.url).load_model("mock", config="{oops")
    assert ready_everywhere(pair, "mock") == [False, False]


def test_loading_replacing_and_unloading_one_model_fails_no_request_to_another(front, pair, unloaded):
    client = triton_http.InferenceServerClient(front.url)
    traffic = Traffic(front, "iris", IRIS_BODY)
    traffic.start()
    try:
        for cycle in range(6):
            client.load_model("mock")
            client.load_model("mock", config=json.dumps(mock_config(version=str(cycle + 2))))  # a replacement
            client.unload_model("mock")
    finally:
        sent = traffic.finish()
    assert sent > 0 and traffic.failures == [], traffic.failures[:5]


def test_a_replacement_takes_traffic_only_when_ready_and_fails_no_call_to_the_model(front, pair, unloaded):
    client = triton_http.InferenceServerClient(front.url)
    client.load_model("mock", config=json.dumps(mock_config(version="1", latency_ms=5)))
    traffic = Traffic(front, "mock", MOCK_BODY)
    traffic.start()
    try:
        for version in ("2", "3", "4"):
            client.load_model("mock", config=json.dumps(mock_config(version=version, latency_ms=5)))
    finally:
        sent = traffic.finish()
    assert sent > 0 and traffic.failures == [], traffic.failures[:5]
    assert front.request("POST", "/v2/models/mock/infer", MOCK_BODY).json()["model_version"] == "4"


def test_calls_in_flight_on_an_unloaded_model_finish_and_later_ones_get_404_naming_it(front, pair, unloaded):
    client = triton_http.InferenceServerClient(front.url)
    client.load_model("mock", config=json.dumps(mock_config(latency_ms=1500)))
    answers: list = []
    callers = [
        threading.Thread(target=lambda: answers.append(front.request("POST", "/v2/models/mock/infer", MOCK_BODY)))
        for _ in range(4)
    ]
    for caller in callers:
        caller.start()
    in_flight = lambda: sum(metric(r, "inferencehub_inference_in_flight_requests", 'model="mock"') or 0 for r in pair)  # noqa: E731
    wait_for(lambda: in_flight() >= 4, 30, what="4 calls in flight on mock")
    client.unload_model("mock")  # returns once the calls in flight are done
    for caller in callers:
        caller.join(30)
    assert [a.status for a in answers] == [200] * 4, answers
    later = front.request("POST", "/v2/models/mock/infer", MOCK_BODY)
    assert later.status == 404 and "'mock'" in later.json()["error"], later


def test_api_keys_make_load_and_unload_admin_actions(tmp_path, pair):
    keys = tmp_path / "keys"
    keys.write_text(f"{ADMIN_KEY} operator admin\n{USER_KEY} app user\n")
    server = Gateway("ipv4:" + ",".join(r.target for r in pair), "--api-keys-file", str(keys))
    try:
        as_user = {"Authorization": f"Bearer {USER_KEY}"}
        as_admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        refused = server.request("POST", "/v2/repository/models/mock/load", headers=as_user)
        assert refused.status == 403, refused
        assert refused.json()["error"] == "load of model 'mock' is an admin action: API key 'app' is not an admin's"
        refused = server.request("POST", "/v2/repository/models/mock/unload", headers=as_user)
        assert refused.status == 403 and "unload of model 'mock'" in refused.json()["error"]
        assert server.request("POST", "/v2/repository/index", headers=as_user).status == 200
        assert server.request("POST", "/v2/models/iris/infer", IRIS_BODY, headers=as_user).status == 200
        assert server.request("POST", "/v2/repository/models/mock/load", headers=as_admin).status == 200
        assert ready_everywhere(pair, "mock") == [True, True]
        assert server.request("POST", "/v2/repository/models/mock/unload", headers=as_admin).status == 200
        assert server.request("POST", "/v2/repository/models/mock/load").status == 401
    finally:
        server.stop()


def test_none_mode_loads_everything_and_refuses_load_and_unload(tmp_path):
    replica = Replica("--models", str(repository(tmp_path / "models")), "--processes", "1")
    try:
        replica.wait_serving()
        server = Gateway(f"ipv4:{replica.target}")
        try:
            refused = server.request("POST", "/v2/repository/models/mock/unload")
            assert refused.status == 400
            assert (
                "unload of model 'mock' refused: this replica's model control mode is 'none'" in refused.json()["error"]
            )
            index = server.request("POST", "/v2/repository/index").json()
            assert {e["name"]: e["state"] for e in index} == {"iris": "READY", "mock": "READY"}
        finally:
            server.stop()
        client = triton_grpc.InferenceServerClient(replica.target)
        try:
            with pytest.raises(InferenceServerException, match=r"FAILED_PRECONDITION.*model control mode is 'none'"):
                client.load_model("mock")
        finally:
            client.close()
    finally:
        replica.terminate()
        replica.kill()


def test_a_bad_load_flag_stops_start_up_with_a_clear_error(tmp_path):
    models = repository(tmp_path / "models")
    with pytest.raises(AssertionError, match="--load: model 'nope' is not in the repository"):
        Replica("--models", str(models), "--model-control-mode", "explicit", "--load", "nope")
    with pytest.raises(AssertionError, match="--load is for --model-control-mode explicit"):
        Replica("--models", str(models), "--load", "mock")


def test_poll_mode_reloads_a_changed_model_without_failing_a_request(tmp_path):
    models = repository(tmp_path / "models")
    config = models / "mock" / "config.json"
    replica = Replica(
        "--models", str(models), "--model-control-mode", "poll", "--repository-poll-seconds", "0.2", "--processes", "1"
    )
    try:
        replica.wait_serving()
        server = Gateway(f"ipv4:{replica.target}")
        traffic = Traffic(server, "mock", MOCK_BODY)
        traffic.start()
        try:
            version = lambda: server.request("GET", "/v2/models/mock").json()["versions"]  # noqa: E731
            partial = config.with_name("config.json.new")
            partial.write_text(json.dumps(mock_config(version="2", latency_ms=2)))
            partial.replace(config)
            wait_for(lambda: version() == ["2"], 30, what="version 2 to be served")
            config.write_text("{ not json")  # a broken edit: logged, and version 2 keeps serving
            wait_for(lambda: "cannot be loaded" in replica.log, 30, what="the broken config to be noticed")
            assert version() == ["2"]
            shutil.rmtree(models / "mock")
            wait_for(lambda: server.request("GET", "/v2/models/mock").status == 404, 30, what="mock to be unloaded")
        finally:
            traffic.finish()
        served = [f for f in traffic.failures if "not loaded" not in f]  # after the folder was removed: 404s
        assert traffic.statuses.get(200, 0) > 0 and served == [], served[:5]
        server.stop()
    finally:
        replica.terminate()
        replica.kill()


def test_a_replica_started_after_a_load_serves_the_same_models_through_the_shared_state(tmp_path):
    models = repository(tmp_path / "models")
    nats = NatsServer(tmp_path / "nats")
    started: list[Replica] = []

    def replica(*flags: str) -> Replica:
        server = Replica("--models", str(models), "--model-control-mode", "explicit", "--processes", "1", *flags)
        started.append(server)
        return server.wait_serving()

    try:
        first = replica("--load", "iris", "--nats", nats.url)
        server = Gateway(f"ipv4:{first.target}", "--nats", nats.url)
        try:
            wait_for(lambda: job_queue_ready(server), 30, what="the gateway's job queue")
            client = triton_http.InferenceServerClient(server.url)
            client.load_model("mock", config=json.dumps(mock_config(version="9")))
            # A model loaded at run time gets its async jobs pulled too.
            job = server.request("POST", "/v2/models/mock/infer", MOCK_BODY, {"Prefer": "respond-async, wait=20"})
            assert job.status == 200 and job.json()["model_version"] == "9", job
            client.unload_model("iris")
        finally:
            server.stop()
        later = replica("--load", "iris", "--nats", nats.url)
        grpc_client = triton_grpc.InferenceServerClient(later.target)
        try:
            assert grpc_client.get_model_metadata("mock", as_json=True)["versions"] == ["9"]
            assert not grpc_client.is_model_ready("iris")  # unloaded through the gateway: --load iris is overruled
        finally:
            grpc_client.close()
        assert "unloaded through the gateway earlier" in later.log

        nats.stop()  # NATS gone: a new replica says so and starts with what --load says
        alone = replica("--load", "iris", "--nats", nats.url)
        grpc_client = triton_grpc.InferenceServerClient(alone.target)
        try:
            assert grpc_client.is_model_ready("iris") and not grpc_client.is_model_ready("mock")
        finally:
            grpc_client.close()
        assert "starting with the models --load names" in alone.log
    finally:
        for server in started:
            server.terminate()
            server.kill()
        nats.stop()


def child_pids(pid: int) -> set[int]:
    """The replica's model worker processes (spawned children; not multiprocessing's resource tracker)."""
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found |= {int(p) for p in (task / "children").read_text().split()}
    workers = set()
    for child in found:
        with contextlib.suppress(OSError):
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                workers.add(child)
    return workers


def test_process_models_load_and_unload_in_fresh_worker_processes_without_failing_calls(tmp_path):
    models = repository(tmp_path / "models")
    for name in ("proc-a", "proc-b"):
        (models / name).mkdir()
        config = {**mock_config(latency_ms=5, mode="busy"), "name": name, "execution": "process"}
        (models / name / "config.json").write_text(json.dumps(config))
    replica = Replica(
        "--models", str(models), "--model-control-mode", "explicit", "--load", "proc-a", "--processes", "1"
    )
    try:
        replica.wait_serving()
        server = Gateway(f"ipv4:{replica.target}")
        try:
            workers_a = wait_for(lambda: child_pids(replica.proc.pid), 30, what="proc-a's worker process")
            traffic = Traffic(server, "proc-a", MOCK_BODY)
            traffic.start()
            try:
                client = triton_http.InferenceServerClient(server.url)
                client.load_model("proc-b")  # new workers hold both; the old ones exit once their calls are done
                assert server.request("POST", "/v2/models/proc-b/infer", MOCK_BODY).status == 200
                client.unload_model("proc-b")
            finally:
                sent = traffic.finish()
            assert sent > 0 and traffic.failures == [], traffic.failures[:5]
            wait_for(lambda: not (child_pids(replica.proc.pid) & workers_a), 30, what="the first workers to exit")
            client.unload_model("proc-a")  # the last process model: no worker process is left
            wait_for(lambda: not child_pids(replica.proc.pid), 30, what="every worker process to exit")
            assert server.request("POST", "/v2/models/proc-a/infer", MOCK_BODY).status == 404
        finally:
            server.stop()
    finally:
        replica.terminate()
        replica.kill()


def test_versions_follow_the_version_policy_everywhere(tmp_path):
    models = repository(tmp_path / "models")
    config = {k: v for k, v in mock_config().items() if k not in ("name", "version")}
    (models / "multi").mkdir()
    for version in ("1", "2", "3"):
        (models / "multi" / version).mkdir()  # version folders: the mock runtime needs no files in them
    (models / "multi" / "config.json").write_text(
        json.dumps({**config, "name": "multi", "version_policy": {"latest": {"num_versions": 2}}})
    )
    replica = Replica(
        "--models", str(models), "--model-control-mode", "explicit", "--load", "multi", "--processes", "1"
    )
    try:
        replica.wait_serving()
        server = Gateway(f"ipv4:{replica.target}")
        try:

            def infer(path: str):
                return server.request("POST", f"{path}/infer", MOCK_BODY)

            assert server.request("GET", "/v2/models/multi").json()["versions"] == ["2", "3"]
            assert infer("/v2/models/multi").json()["model_version"] == "3"  # the default: the highest
            assert infer("/v2/models/multi/versions/2").json()["model_version"] == "2"
            missing = infer("/v2/models/multi/versions/1")
            assert missing.status == 404 and "has no version '1' (served: 2, 3)" in missing.json()["error"]
            assert server.request("GET", "/v2/models/multi/versions/2/ready").status == 200
            index = server.request("POST", "/v2/repository/index", {"ready": True}).json()
            assert [(e["name"], e["version"]) for e in index] == [("multi", "2"), ("multi", "3")]
            stats = server.request("GET", "/v2/models/multi/versions/2/stats").json()["model_stats"]
            assert [(s["version"], s["inference_count"]) for s in stats] == [("2", 1)]
            assert metric(replica, "inferencehub_model_ready", 'model="multi",version="3"') == 1.0

            client = triton_http.InferenceServerClient(server.url)
            client.load_model("multi", config=json.dumps({**config, "version_policy": {"specific": {"versions": [1]}}}))
            assert server.request("GET", "/v2/models/multi").json()["versions"] == ["1"]
            assert metric(replica, "inferencehub_model_ready", 'model="multi",version="3"') == 0.0
            client.load_model("multi", config=json.dumps({**config, "version_policy": {"all": {}}}))
            assert server.request("GET", "/v2/models/multi").json()["versions"] == ["1", "2", "3"]
            bad = {**config, "version_policy": {"specific": {"versions": [7]}}}
            refused = server.request(
                "POST", "/v2/repository/models/multi/load", {"parameters": {"config": json.dumps(bad)}}
            )
            assert refused.status == 400 and "selects none of the versions (1, 2, 3)" in refused.json()["error"]
            assert server.request("GET", "/v2/models/multi").json()["versions"] == ["1", "2", "3"]  # unchanged
        finally:
            server.stop()
    finally:
        replica.terminate()
        replica.kill()
