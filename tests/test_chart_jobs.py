"""The chart's job queue, proven without a cluster: the NATS StatefulSet, the env both components get, an existing
NATS instead, the optional KEDA ScaledObject (never with the HPA), the schema, and the rendered containers run as
real processes: a nats-server started with the StatefulSet's args, the gateway and a replica with their env."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import kubernetes_validate
import pytest
import yaml

from inferencehub import jobqueue
from inferencehub.processes import Child, nats_server_binary

from conftest import (
    ROOT,
    SHIPPED,
    Server,
    free_port,
    model_repository,
    wait_for,
)

CHART = ROOT / "charts" / "inferencehub"
HELM = ROOT / ".cache" / "tools" / "helm-3" / "helm"
NAMESPACE = "demo"
RELEASE = "inferencehub"
NATS_SERVICE = f"{RELEASE}-nats"
KEDA = ["--set", "jobs.keda.enabled=true", "--set", "inference.autoscaling.enabled=false"]


@pytest.fixture(scope="module", autouse=True)
def helm_installed():
    assert HELM.exists(), "run `make tools` (or `python scripts/install_tools.py`)"


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=60)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def render(*values: str) -> list[dict]:
    out = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *values).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def of(objects: list[dict], kind: str, component: str | None = None) -> list[dict]:
    return [
        o
        for o in objects
        if o["kind"] == kind
        and (component is None or o["metadata"]["labels"]["app.kubernetes.io/component"] == component)
    ]


def env_of(objects: list[dict], component: str) -> dict[str, str]:
    deployment = of(objects, "Deployment", component)[0]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value") for e in container["env"]}


def test_defaults_run_a_single_node_jetstream_on_a_pvc_and_wire_both_components():
    objects = render()
    (statefulset,) = of(objects, "StatefulSet", "nats")
    (service,) = of(objects, "Service", "nats")
    spec = statefulset["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert spec["replicas"] == 1 and spec["serviceName"] == service["metadata"]["name"] == NATS_SERVICE
    assert container["image"].startswith("nats:") and container["args"] == ["--config", "/etc/nats/nats.conf"]
    config = nats_config(objects)
    assert "jetstream {" in config and 'store_dir: "/data"' in config and "max_payload: 1048576" in config
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    (claim,) = spec["volumeClaimTemplates"]
    assert mounts["/data"] == claim["metadata"]["name"] and claim["spec"]["resources"]["requests"]["storage"] == "1Gi"
    # The same policies as the chart's Deployments.
    assert pod["automountServiceAccountToken"] is False and pod["securityContext"]["runAsNonRoot"] is True
    assert container["livenessProbe"] and container["readinessProbe"] and container["resources"]["limits"]["memory"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # The Service selects the pods and its ports are the container's.
    assert service["spec"]["selector"].items() <= pod_labels(statefulset).items()
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["client"]["targetPort"] in named and ports["client"]["port"] == named["client"]
    url = f"nats://{NATS_SERVICE}.{NAMESPACE}.svc.cluster.local:{named['client']}"
    gateway, inference = env_of(objects, "gateway"), env_of(objects, "inference")
    assert gateway["INFERENCEHUB_NATS_URL"] == inference["INFERENCEHUB_NATS_URL"] == url
    assert gateway["INFERENCEHUB_JOBS_MAX_QUEUE"] == "10000" and inference["INFERENCEHUB_JOBS_MAX_ATTEMPTS"] == "3"
    assert f"port: {named['client']}" in config and f"http_port: {named['monitor']}" in config
    assert not of(objects, "ScaledObject")
    for version in ("1.29.0", "1.37.0"):
        for obj in (statefulset, service):
            kubernetes_validate.validate(obj, version, strict=True)


def nats_config(objects: list[dict]) -> str:
    (config_map,) = of(objects, "ConfigMap", "nats")
    return config_map["data"]["nats.conf"]


def pod_labels(workload: dict) -> dict:
    return workload["spec"]["template"]["metadata"]["labels"]


def test_an_existing_nats_replaces_the_chart_s_own():
    url = "nats://nats-0.nats:4222,nats://nats-1.nats:4222,nats://nats-2.nats:4222"
    escaped = url.replace(",", "\\,")
    objects = render("--set", f"jobs.nats.url={escaped}", "--set", "jobs.streamReplicas=3")
    assert not of(objects, "StatefulSet") and not of(objects, "Service", "nats")
    assert (
        env_of(objects, "gateway")["INFERENCEHUB_NATS_URL"]
        == url
        == env_of(objects, "inference")["INFERENCEHUB_NATS_URL"]
    )
    assert env_of(objects, "gateway")["INFERENCEHUB_JOBS_REPLICAS"] == "3"


def test_jobs_off_renders_no_queue_and_no_env():
    objects = render("--set", "jobs.enabled=false")
    assert not of(objects, "StatefulSet")
    assert not any(k.startswith(("INFERENCEHUB_NATS", "INFERENCEHUB_JOBS")) for k in env_of(objects, "gateway"))
    assert not any(k.startswith(("INFERENCEHUB_NATS", "INFERENCEHUB_JOBS")) for k in env_of(objects, "inference"))


def test_keda_scales_on_each_model_s_consumer_lag_and_never_with_the_hpa():
    refused = helm("template", RELEASE, str(CHART), "--set", "jobs.keda.enabled=true", check=False)
    assert refused.returncode != 0
    assert "the HPA and KEDA must not both own the inference Deployment" in refused.stderr

    objects = render(*KEDA, "--set-json", 'jobs.keda.models=["mock-heavy", "odd.name"]')
    assert not of(objects, "HorizontalPodAutoscaler")
    (scaled,) = of(objects, "ScaledObject")
    (deployment,) = of(objects, "Deployment", "inference")
    assert "replicas" not in deployment["spec"]  # KEDA owns the replica count
    assert scaled["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    triggers = scaled["spec"]["triggers"]
    assert [t["type"] for t in triggers] == ["nats-jetstream", "nats-jetstream"]
    # The consumer names are the ones the replicas create (inferencehub.jobqueue).
    assert [t["metadata"]["consumer"] for t in triggers] == [
        jobqueue.consumer_name("mock-heavy"),
        jobqueue.consumer_name("odd.name"),
    ]
    assert {t["metadata"]["stream"] for t in triggers} == {jobqueue.STREAM}
    monitor = f"{NATS_SERVICE}.{NAMESPACE}.svc.cluster.local:8222"
    assert {t["metadata"]["natsServerMonitoringEndpoint"] for t in triggers} == {monitor}
    helm("lint", "--strict", str(CHART), *KEDA)


def test_bad_jobs_values_are_rejected_by_the_schema():
    for args, words in [
        (["--set", "jobs.streamReplicas=2"], "streamReplicas"),
        (["--set", "jobs.nats.url=http://nats:4222"], "url"),
        (["--set", "jobs.keda.colour=blue"], "colour"),
        (["--set", "jobs.maxQueue=0"], "maxQueue"),
    ]:
        done = helm("template", RELEASE, str(CHART), *args, check=False)
        assert done.returncode != 0 and words in done.stderr, (args, done.stderr)


def test_rendered_containers_run_an_async_job_end_to_end(tmp_path):
    objects = render()
    (statefulset,) = of(objects, "StatefulSet", "nats")
    nats_args = statefulset["spec"]["template"]["spec"]["containers"][0]["args"]
    client, monitor = free_port(), free_port()
    # The rendered config, with this machine's store folder and free ports.
    config = (
        nats_config(objects)
        .replace('"/data"', json.dumps(str(tmp_path / "data")))
        .replace("port: 4222", f"port: {client}")
        .replace("http_port: 8222", f"http_port: {monitor}")
    )
    (tmp_path / "nats.conf").write_text(config)
    args = [a.replace("/etc/nats/nats.conf", str(tmp_path / "nats.conf")) for a in nats_args]
    nats = Child("nats", [nats_server_binary(), "-a", "127.0.0.1", *args])  # the rendered args, as the pod runs
    servers = [nats]
    try:
        nats.wait_log("Server is ready", 60)  # the ports come from the rendered config, not an announcement
        url = f"nats://127.0.0.1:{client}"
        inference_env = env_of(objects, "inference")
        inference_env.update(
            INFERENCEHUB_HOST="127.0.0.1",
            INFERENCEHUB_PORT="0",
            INFERENCEHUB_METRICS_PORT="0",
            INFERENCEHUB_NATS_URL=url,
            INFERENCEHUB_REPLICA_NAME="inference-pod-0",
            INFERENCEHUB_MODELS=str(model_repository(tmp_path / "models", SHIPPED / "iris")),  # quicker to load
        )
        replica = Server([sys.executable, "-m", "inferencehub", "inference"], inference_env)
        servers.append(replica)
        gateway_env = env_of(objects, "gateway")
        gateway_env.update(
            INFERENCEHUB_HOST="127.0.0.1",
            INFERENCEHUB_PORT="0",
            INFERENCEHUB_UPSTREAM=replica.addresses["grpc"],
            INFERENCEHUB_NATS_URL=url,
        )
        gateway = Server([sys.executable, "-m", "inferencehub", "gateway"], gateway_env)
        servers.append(gateway)
        port = int(gateway.addresses["http"].rsplit(":", 1)[1])

        def request(method: str, path: str, body: bytes | None = None, headers: dict | None = None):
            import http.client

            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                conn.request(method, path, body=body, headers=headers or {})
                response = conn.getresponse()
                return response.status, response.read()
            finally:
                conn.close()

        unknown = f"/v2/jobs/{'0' * 32}"
        wait_for(lambda: request("GET", unknown)[0] == 404, 30, what="the gateway's job queue")
        wait_for(lambda: "jobs: pulling" in "\n".join(replica.lines), 30, what="the replica to pull jobs")
        body = json.dumps(
            {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [6.3, 3.3, 6.0, 2.5]}]}
        ).encode()
        status, answer = request("POST", "/v2/models/iris/infer", body, {"Prefer": "respond-async, wait=10"})
        assert status == 200 and json.loads(answer)["outputs"][1]["data"] == [2], answer
        # The monitoring port KEDA reads answers, with the replica's consumer on the job stream.
        import http.client

        started = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", monitor, timeout=5)
        conn.request("GET", "/jsz?consumers=true")
        jsz = json.loads(conn.getresponse().read())
        conn.close()
        streams = [s for a in jsz["account_details"] for s in a["stream_detail"]]
        consumers = {c["name"] for s in streams if s["name"] == jobqueue.STREAM for c in s["consumer_detail"]}
        assert jobqueue.consumer_name("iris") in consumers, consumers
        assert time.monotonic() - started < 5
        for server in reversed(servers):
            assert server.terminate() == 0
    finally:
        for server in servers:
            server.kill()


def test_notes_show_an_async_call():
    helm4 = ROOT / ".cache" / "tools" / "helm-4" / "helm"
    done = subprocess.run(
        [str(helm4), "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    notes = done.stdout.split("NOTES:", 1)[1]
    assert f"nats://{NATS_SERVICE}.{NAMESPACE}.svc.cluster.local:4222" in notes
    assert "-H 'Prefer: respond-async'" in notes and "/v2/jobs/JOB_ID" in notes
