"""The chart's job queue, proven without a cluster: the NATS StatefulSet, the env both components get, an existing
NATS instead, the optional KEDA ScaledObject (never with the HPA), the schema, NATS's users, TLS and NetworkPolicy,
and the rendered containers run as real processes: a nats-server started with the StatefulSet's args and config
(its users and permissions), the gateway and a replica with their env and the Secret's passwords."""

from __future__ import annotations

import asyncio
import base64
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


def resolved_env(objects: list[dict], container: dict) -> dict[str, str]:
    """A container's env as the kubelet gives it: values from the rendered Secrets resolved."""
    secrets = {
        o["metadata"]["name"]: {k: base64.b64decode(v).decode() for k, v in o.get("data", {}).items()}
        for o in of(objects, "Secret")
    }
    env = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        elif "secretKeyRef" in item["valueFrom"]:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = secrets[ref["name"]][ref["key"]]
        # (fieldRef values, such as the pod's name, are set by the caller)
    return env


def container_of(objects: list[dict], kind: str, component: str) -> dict:
    return of(objects, kind, component)[0]["spec"]["template"]["spec"]["containers"][0]


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


def secret_ref(container: dict, name: str) -> dict | None:
    found = next((e for e in container.get("env", []) if e["name"] == name), None)
    return found and found.get("valueFrom", {}).get("secretKeyRef")


def test_nats_auth_is_on_by_default_with_a_generated_secret_each_user_reads_by_env():
    objects = render()
    (secret,) = [s for s in of(objects, "Secret", "nats")]
    name = f"{NATS_SERVICE}-auth"
    assert secret["metadata"]["name"] == name
    passwords = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert set(passwords) == {"gateway-password", "inference-password"}
    assert all(len(p) == 32 and p.isalnum() and p[0].isalpha() for p in passwords.values())
    assert passwords["gateway-password"] != passwords["inference-password"]
    config = nats_config(objects)
    assert "authorization {" in config and "$GATEWAY_PASSWORD" in config and "$INFERENCE_PASSWORD" in config
    assert not any(p in config for p in passwords.values())  # the ConfigMap holds no secret
    # The server reads the passwords from env, set from the Secret.
    nats = container_of(objects, "StatefulSet", "nats")
    assert secret_ref(nats, "GATEWAY_PASSWORD") == {"name": name, "key": "gateway-password"}
    assert secret_ref(nats, "INFERENCE_PASSWORD") == {"name": name, "key": "inference-password"}
    # Each component its own user and password.
    for component in ("gateway", "inference"):
        container = container_of(objects, "Deployment", component)
        assert env_of(objects, component)["INFERENCEHUB_NATS_USER"] == f"inferencehub-{component}"
        assert f'user: "inferencehub-{component}"' in config
        assert secret_ref(container, "INFERENCEHUB_NATS_PASSWORD") == {"name": name, "key": f"{component}-password"}
    kubernetes_validate.validate(secret, "1.37.0", strict=True)


def test_an_existing_secret_replaces_the_generated_one_and_auth_can_be_off():
    objects = render("--set", "jobs.nats.auth.existingSecret=my-nats-passwords")
    assert not of(objects, "Secret", "nats")
    assert secret_ref(container_of(objects, "StatefulSet", "nats"), "GATEWAY_PASSWORD")["name"] == "my-nats-passwords"
    assert secret_ref(container_of(objects, "Deployment", "inference"), "INFERENCEHUB_NATS_PASSWORD") == {
        "name": "my-nats-passwords",
        "key": "inference-password",
    }
    # An existing NATS: the services use the existing Secret for it, and connect without credentials otherwise.
    url = "nats://nats.other:4222"
    objects = render("--set", f"jobs.nats.url={url}", "--set", "jobs.nats.auth.existingSecret=theirs")
    assert not of(objects, "Secret", "nats")
    assert secret_ref(container_of(objects, "Deployment", "gateway"), "INFERENCEHUB_NATS_PASSWORD")["name"] == "theirs"
    objects = render("--set", f"jobs.nats.url={url}")
    assert "INFERENCEHUB_NATS_USER" not in env_of(objects, "gateway")
    objects = render("--set", "jobs.nats.auth.enabled=false")
    assert not of(objects, "Secret", "nats") and "authorization" not in nats_config(objects)
    assert "INFERENCEHUB_NATS_PASSWORD" not in env_of(objects, "inference")
    assert "env" not in container_of(objects, "StatefulSet", "nats")


def test_the_nats_pod_takes_the_chart_s_pod_settings_and_stable_labels():
    objects = render(
        "--set", "image.registry=registry.example.com/mirror/",
        "--set-json", 'imagePullSecrets=[{"name": "pull"}]',
        "--set", "serviceAccount.name=inferencehub-sa",
        "--set-json", 'jobs.nats.nodeSelector={"disk": "ssd"}',
        "--set-json", 'jobs.nats.tolerations=[{"key": "queue", "operator": "Exists", "effect": "NoSchedule"}]',
        "--set-json", 'jobs.nats.affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": '
        '{"nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}}',
        "--set", "jobs.nats.storage.size=20Gi",
        "--set", "jobs.nats.priorityClassName=queue",
    )  # fmt: skip
    (statefulset,) = of(objects, "StatefulSet", "nats")
    pod = statefulset["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "registry.example.com/mirror/nats:2.15.1-alpine"
    assert pod["imagePullSecrets"] == [{"name": "pull"}]
    assert pod["serviceAccountName"] == "inferencehub-sa"
    assert pod["nodeSelector"] == {"disk": "ssd"} and pod["tolerations"][0]["key"] == "queue"
    assert pod["affinity"]["nodeAffinity"] and pod["priorityClassName"] == "queue"
    assert pod["securityContext"]["runAsUser"] == 10001
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "20Gi"
    # An image registry of its own for NATS (a mirror of the official image).
    own = render("--set", "image.registry=mine/", "--set", "jobs.nats.image.registry=mirror.example.com/library/")
    assert container_of(own, "StatefulSet", "nats")["image"] == "mirror.example.com/library/nats:2.15.1-alpine"
    # The pod template's labels and the selector are the same for every chart version: a chart-only upgrade
    # leaves the pod alone.
    for labels in (pod_labels(statefulset), statefulset["spec"]["selector"]["matchLabels"]):
        assert "helm.sh/chart" not in labels and "app.kubernetes.io/version" not in labels, labels
    assert pod_labels(statefulset) == {
        "app.kubernetes.io/name": "inferencehub",
        "app.kubernetes.io/instance": RELEASE,
        "app.kubernetes.io/component": "nats",
    }
    for version in ("1.29.0", "1.37.0"):
        kubernetes_validate.validate(statefulset, version, strict=True)


def test_a_network_policy_admits_only_the_gateway_and_the_replicas_to_nats():
    assert not [p for p in of(render(), "NetworkPolicy") if p["metadata"]["name"] == f"{NATS_SERVICE}"]
    objects = render(
        "--set", "networkPolicy.enabled=true",
        "--set-json", 'networkPolicy.nats.monitorFrom=[{"namespaceSelector": {"matchLabels": {"name": "keda"}}}]',
    )  # fmt: skip
    (policy,) = [p for p in of(objects, "NetworkPolicy") if p["metadata"]["name"] == NATS_SERVICE]
    (statefulset,) = of(objects, "StatefulSet", "nats")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels(statefulset).items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    clients, monitoring = policy["spec"]["ingress"]
    assert clients["ports"] == [{"port": "client", "protocol": "TCP"}]
    allowed = [peer["podSelector"]["matchLabels"] for peer in clients["from"]]
    assert len(allowed) == 2 and all(set(peer) == {"podSelector"} for peer in clients["from"])
    # Exactly the gateway's and the replicas' pods, by labels their pod templates carry.
    for component, selector in zip(("gateway", "inference"), allowed, strict=True):
        (deployment,) = of(objects, "Deployment", component)
        assert selector.items() <= pod_labels(deployment).items()
        assert selector["app.kubernetes.io/component"] == component
    assert monitoring["ports"] == [{"port": "monitor", "protocol": "TCP"}]
    assert monitoring["from"] == [{"namespaceSelector": {"matchLabels": {"name": "keda"}}}]
    named = {p["name"] for p in container_of(objects, "StatefulSet", "nats")["ports"]}
    assert named == {"client", "monitor"}  # no other port to leave open
    for version in ("1.29.0", "1.37.0"):
        kubernetes_validate.validate(policy, version, strict=True)
    # An existing NATS is not the chart's to guard.
    external = render("--set", "networkPolicy.enabled=true", "--set", "jobs.nats.url=nats://nats.other:4222")
    assert not [p for p in of(external, "NetworkPolicy") if p["metadata"]["name"] == NATS_SERVICE]


def test_tls_to_nats_mounts_the_certificate_in_the_server_and_the_ca_in_the_services():
    refused = helm("template", RELEASE, str(CHART), "--set", "jobs.nats.tls.enabled=true", check=False)
    assert refused.returncode != 0 and "jobs.nats.tls.secretName" in refused.stderr
    objects = render("--set", "jobs.nats.tls.enabled=true", "--set", "jobs.nats.tls.secretName=nats-cert")
    config = nats_config(objects)
    assert 'cert_file: "/etc/nats-tls/tls.crt"' in config and 'key_file: "/etc/nats-tls/tls.key"' in config
    (statefulset,) = of(objects, "StatefulSet", "nats")
    pod = statefulset["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "nats-cert"
    assert {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]} >= {"/etc/nats-tls"}
    for component in ("gateway", "inference"):
        (deployment,) = of(objects, "Deployment", component)
        spec = deployment["spec"]["template"]["spec"]
        ca = env_of(objects, component)["INFERENCEHUB_NATS_TLS_CA"]
        mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
        assert ca == mounts["nats-tls"] + "/ca.crt"
        (volume,) = [v for v in spec["volumes"] if v["name"] == "nats-tls"]
        assert volume["secret"] == {"secretName": "nats-cert", "items": [{"key": "ca.crt", "path": "ca.crt"}]}
        kubernetes_validate.validate(deployment, "1.37.0", strict=True)
    kubernetes_validate.validate(statefulset, "1.37.0", strict=True)


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


def start_rendered_nats(objects: list[dict], folder) -> tuple[Child, int, int]:
    """nats-server with the rendered config and args, the env the pod gets (its users' passwords from the rendered
    Secret), this machine's store folder and free ports; returns it and its client and monitoring ports."""
    (statefulset,) = of(objects, "StatefulSet", "nats")
    container = statefulset["spec"]["template"]["spec"]["containers"][0]
    client, monitor = free_port(), free_port()
    config = (
        nats_config(objects)
        .replace('"/data"', json.dumps(str(folder / "data")))
        .replace("port: 4222", f"port: {client}")
        .replace("http_port: 8222", f"http_port: {monitor}")
        .replace('"/etc/nats-tls/', json.dumps(str(folder / "tls"))[:-1] + "/")
    )
    (folder / "nats.conf").write_text(config)
    args = [a.replace("/etc/nats/nats.conf", str(folder / "nats.conf")) for a in container["args"]]
    # The rendered args and env, as the pod runs them.
    nats = Child("nats", [nats_server_binary(), "-a", "127.0.0.1", *args], env=resolved_env(objects, container))
    try:
        nats.wait_log("Server is ready", 60)  # the ports come from the rendered config, not an announcement
    except Exception:
        nats.kill()
        raise
    return nats, client, monitor


def start_rendered_services(objects: list[dict], url: str, models, **extra: str) -> tuple[Server, Server]:
    """A replica and a gateway with their rendered env (passwords from the rendered Secret), on loopback."""
    inference_env = resolved_env(objects, container_of(objects, "Deployment", "inference"))
    inference_env.update(extra)
    inference_env.update(
        INFERENCEHUB_HOST="127.0.0.1",
        INFERENCEHUB_PORT="0",
        INFERENCEHUB_METRICS_PORT="0",
        INFERENCEHUB_NATS_URL=url,
        INFERENCEHUB_REPLICA_NAME="inference-pod-0",
        INFERENCEHUB_MODELS=str(models),
    )
    replica = Server([sys.executable, "-m", "inferencehub", "inference"], inference_env)
    gateway_env = resolved_env(objects, container_of(objects, "Deployment", "gateway"))
    gateway_env.update(extra)
    gateway_env.update(
        INFERENCEHUB_HOST="127.0.0.1",
        INFERENCEHUB_PORT="0",
        INFERENCEHUB_UPSTREAM=replica.addresses["grpc"],
        INFERENCEHUB_NATS_URL=url,
    )
    try:
        gateway = Server([sys.executable, "-m", "inferencehub", "gateway"], gateway_env)
    except BaseException:
        replica.kill()
        raise
    return replica, gateway


def http_request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


IRIS_BODY = json.dumps(
    {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [6.3, 3.3, 6.0, 2.5]}]}
).encode()


def run_one_job(gateway: Server, replica: Server) -> None:
    port = int(gateway.addresses["http"].rsplit(":", 1)[1])
    unknown = f"/v2/jobs/{'0' * 32}"
    wait_for(lambda: http_request(port, "GET", unknown)[0] == 404, 30, what="the gateway's job queue")
    wait_for(lambda: "jobs: pulling" in "\n".join(replica.lines), 30, what="the replica to pull jobs")
    status, answer = http_request(port, "POST", "/v2/models/iris/infer", IRIS_BODY, {"Prefer": "respond-async"})
    assert status == 202, answer
    job = f"/v2/jobs/{json.loads(answer)['id']}"
    doc = wait_for(
        lambda: (d := json.loads(http_request(port, "GET", job)[1]))["status"] in ("succeeded", "failed") and d,
        30,
        what="the job",
    )
    assert doc["status"] == "succeeded" and doc["result"]["outputs"][1]["data"] == [2], doc


def test_rendered_containers_run_an_async_job_end_to_end(tmp_path):
    objects = render()
    nats, client, monitor = start_rendered_nats(objects, tmp_path)
    servers = [nats]
    try:
        url = f"nats://127.0.0.1:{client}"
        models = model_repository(tmp_path / "models", SHIPPED / "iris")  # quicker to load
        servers.extend(start_rendered_services(objects, url, models))
        replica, gateway = servers[1], servers[2]
        port = int(gateway.addresses["http"].rsplit(":", 1)[1])
        unknown = f"/v2/jobs/{'0' * 32}"
        wait_for(lambda: http_request(port, "GET", unknown)[0] == 404, 30, what="the gateway's job queue")
        wait_for(lambda: "jobs: pulling" in "\n".join(replica.lines), 30, what="the replica to pull jobs")
        status, answer = http_request(
            port, "POST", "/v2/models/iris/infer", IRIS_BODY, {"Prefer": "respond-async, wait=10"}
        )
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
        # The users and their permissions, on the server the services just used.
        passwords = {
            user: resolved_env(objects, container_of(objects, "Deployment", component))["INFERENCEHUB_NATS_PASSWORD"]
            for user, component in (("inferencehub-gateway", "gateway"), ("inferencehub-inference", "inference"))
        }
        asyncio.run(check_nats_permissions(url, passwords))
        run_one_job(gateway, replica)  # still working after all those refusals
        for server in reversed(servers):
            assert server.terminate() == 0
    finally:
        for server in servers:
            server.kill()


def test_rendered_tls_to_nats_carries_a_job_and_refuses_plaintext(tmp_path):
    from pki import CA

    objects = render("--set", "jobs.nats.tls.enabled=true", "--set", "jobs.nats.tls.secretName=nats-cert")
    ca = CA()
    (tmp_path / "tls").mkdir()
    cert, key = ca.issue("nats", ips=("127.0.0.1",))
    (tmp_path / "tls" / "tls.crt").write_bytes(cert)
    (tmp_path / "tls" / "tls.key").write_bytes(key)
    ca_file = ca.write(tmp_path / "ca.crt")
    nats, client, _ = start_rendered_nats(objects, tmp_path)
    servers = [nats]
    try:
        url = f"nats://127.0.0.1:{client}"
        models = model_repository(tmp_path / "models", SHIPPED / "iris")
        servers.extend(start_rendered_services(objects, url, models, INFERENCEHUB_NATS_TLS_CA=str(ca_file)))
        run_one_job(servers[2], servers[1])
        password = resolved_env(objects, container_of(objects, "Deployment", "gateway"))["INFERENCEHUB_NATS_PASSWORD"]
        asyncio.run(check_tls_refusals(url, password, tmp_path))
        for server in reversed(servers):
            assert server.terminate() == 0
    finally:
        for server in servers:
            server.kill()


async def check_tls_refusals(url: str, password: str, folder) -> None:
    """A plaintext client is refused even with the right credentials; a client trusting another CA never connects."""
    import socket
    import ssl

    import nats as nats_client
    from pki import CA

    host, port = url.removeprefix("nats://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as plain:
        reader = plain.makefile("rb")
        info = json.loads(reader.readline().split(b" ", 1)[1])
        assert info["tls_required"] is True
        connect = {"user": "inferencehub-gateway", "pass": password, "verbose": False, "pedantic": False}
        plain.sendall(b"CONNECT " + json.dumps(connect).encode() + b"\r\nPING\r\n")
        answer = reader.read()  # the server closes the connection (after an -ERR, or at once)
        assert b"PONG" not in answer and b"+OK" not in answer, answer
    other = ssl.create_default_context(cafile=str(CA("another CA").write(folder / "other-ca.crt")))
    with pytest.raises(ssl.SSLCertVerificationError):
        await nats_client.connect(
            url,
            allow_reconnect=False,
            max_reconnect_attempts=0,
            connect_timeout=5,
            user="inferencehub-gateway",
            password=password,
            tls=other,
        )


async def check_nats_permissions(url: str, passwords: dict[str, str]) -> None:
    """Strangers are refused; each user may do its work and nothing that would lose or forge jobs."""
    import nats as nats_client
    from nats.errors import TimeoutError as NatsTimeout
    from nats.js.errors import KeyWrongLastSequenceError

    async def connect(user: str | None = None, password: str | None = None):
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        options = {"user": user, "password": password} if user else {}
        nc = await nats_client.connect(
            url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=5, error_cb=on_error, **options
        )
        return nc, errors

    for user, password in ((None, None), ("inferencehub-gateway", "wrong"), ("nobody", "nothing")):
        with pytest.raises(Exception) as refused:
            nc, errors = await connect(user, password)
            await nc.close()
        assert "authorization violation" in str(refused.value).lower(), refused.value

    gateway, gateway_errors = await connect("inferencehub-gateway", passwords["inferencehub-gateway"])
    replica, replica_errors = await connect("inferencehub-inference", passwords["inferencehub-inference"])
    try:
        gjs, rjs = gateway.jetstream(timeout=10), replica.jetstream(timeout=10)
        quick = {"gateway": gateway.jetstream(timeout=0.5), "replica": replica.jetstream(timeout=0.5)}  # to refuse
        # A job for a model nobody serves stays queued: what a purge would lose.
        ack = await gjs.publish(jobqueue.subject("nobody-serves-this"), b"job", headers={"Nats-Msg-Id": "x" * 32})
        assert ack.stream == jobqueue.STREAM

        async def refused(js, call, errors: list[str], what: str) -> None:
            before = len(errors)
            with pytest.raises((NatsTimeout, TimeoutError)):  # the server drops the request: nothing answers
                await call(js)
            deadline = time.monotonic() + 10
            while not any("permissions violation" in e.lower() for e in errors[before:]):
                assert time.monotonic() < deadline, (what, errors)
                await asyncio.sleep(0.02)

        for js, errors in ((quick["replica"], replica_errors), (quick["gateway"], gateway_errors)):
            await refused(js, lambda js: js.purge_stream(jobqueue.STREAM), errors, "purge the stream")
            await refused(js, lambda js: js.delete_stream(jobqueue.STREAM), errors, "delete the stream")
            await refused(js, lambda js: js.delete_stream(f"KV_{jobqueue.BUCKET}"), errors, "delete the bucket")
        # The replica may not queue jobs, nor write an idempotency key.
        forge = quick["replica"]
        await refused(forge, lambda js: js.publish(jobqueue.subject("iris"), b"forged"), replica_errors, "queue a job")
        forging_kv = await forge.key_value(jobqueue.BUCKET)
        await refused(forge, lambda js: forging_kv.put("idem.forged", b"x"), replica_errors, "write an idempotency key")
        replica_kv = await rjs.key_value(jobqueue.BUCKET)
        # What it may do: read and write job records.
        await replica_kv.put(jobqueue.job_key("f" * 32), b"record")
        assert (await replica_kv.get(jobqueue.job_key("f" * 32))).value == b"record"
        # Nothing was lost: the waiting job is still there, and the stream and bucket exist.
        info = await gjs.stream_info(jobqueue.STREAM, subjects_filter=">")
        assert (info.state.subjects or {}).get(jobqueue.subject("nobody-serves-this")) == 1, info.state
        gateway_kv = await gjs.key_value(jobqueue.BUCKET)
        with pytest.raises(KeyWrongLastSequenceError):
            await gateway_kv.create(jobqueue.job_key("f" * 32), b"again")  # it exists: the replica wrote it
    finally:
        await gateway.close()
        await replica.close()


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


def test_lint_strict_with_the_queue_s_security_values():
    for args in (
        ["--set", "jobs.nats.tls.enabled=true", "--set", "jobs.nats.tls.secretName=nats-cert"],
        ["--set", "networkPolicy.enabled=true", "--set", "jobs.nats.auth.existingSecret=mine"],
        ["--set", "jobs.nats.auth.enabled=false"],
    ):
        helm("lint", "--strict", str(CHART), *args)
