"""The chart's `auth:` and `tls:` blocks, proven without a cluster: lint, render with helm 3 and 4, strict schemas,
the wiring between Secrets, Certificates, mounts, env and probes, and the rendered deployments started with TLS and
API keys on, with certificates made here for exactly the names the chart's Certificate asks for."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from pathlib import Path

import grpc
import pytest
from dnslib.server import DNSLogger, DNSServer
from pki import CA

from conftest import (
    CHART,
    HELMS,
    KUBERNETES,
    NAMESPACE,
    RELEASE,
    DnsRecords,
    Manifested,
    by_kind,
    grpc_probe,
    helm,
    http_status,
    one,
    render,
    validate_strictly,
    wait_for,
    without_random_passwords,
)

KEY = "ih_chart_wiring_key_5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d"
HASHED_LINE = f"sha256:{hashlib.sha256(KEY.encode()).hexdigest()} wiring"
TLS_CM = [
    "--set",
    "tls.enabled=true",
    "--set",
    "tls.certManager.enabled=true",
    "--set",
    "tls.certManager.issuerRef.name=inferencehub-ca",
    "--set",
    "tls.certManager.issuerRef.kind=ClusterIssuer",
]
KEYS = [
    "--set",
    "auth.apiKeys.enabled=true",
    "--set-json",
    f"auth.apiKeys.keys={json.dumps([HASHED_LINE, 'sha256:' + '0' * 64 + ' other'])}",
    "--set",
    "auth.apiKeys.testKeySecret.name=helm-test-key",
    "--set",
    "auth.apiKeys.testKeySecret.key=key",
    "--set",
    "auth.rateLimit.requestsPerSecond=200",
    "--set",
    "auth.rateLimit.burst=50",
]
VALUE_SETS = {
    "tls-cert-manager": [*TLS_CM, "--set", "networkPolicy.enabled=true"],
    "tls-own-secrets": [
        "--set",
        "tls.enabled=true",
        "--set",
        "tls.inferenceSecret=my-replica-tls",
        "--set",
        "tls.gatewaySecret=my-gateway-tls",
        "--set",
        "tls.healthPort=9000",
        "--set",
        "tls.gatewayName=gateway.example.com",  # what the user's own gateway certificate carries
    ],
    "keys": KEYS,
    "keys-existing-secret": [
        "--set",
        "auth.apiKeys.enabled=true",
        "--set",
        "auth.apiKeys.existingSecret=my-keys",
        "--set",
        "auth.apiKeys.secretKey=keys.txt",
    ],
    "all-on": [
        *TLS_CM,
        *KEYS,
        "--set",
        "networkPolicy.enabled=true,inference.autoscaling.enabled=false",
        "--set-json",
        'tls.extraClientNames=["spiffe://cluster.local/ns/ops/sa/debug"]',
    ],
}


@pytest.fixture(scope="module", autouse=True)
def helm_installed():
    missing = [str(path) for path in HELMS.values() if not path.exists()]
    assert not missing, f"run `make tools` (or `python scripts/install_tools.py`): missing {missing}"


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render("helm3", values) for name, values in VALUE_SETS.items()}


def container(objects: list[dict], component: str) -> dict:
    return one(objects, "Deployment", component)["spec"]["template"]["spec"]["containers"][0]


def pod_spec(objects: list[dict], component: str) -> dict:
    return one(objects, "Deployment", component)["spec"]["template"]["spec"]


def env_of(c: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in c["env"]}


def secret_behind(spec: dict, c: dict, path: str) -> tuple[str, str]:
    """The Secret name and key a file path in the container comes from (the mount is a Secret volume)."""
    mount = next(m for m in c["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
    assert "subPath" not in mount, "a subPath mount never sees Secret updates"
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    file = path[len(mount["mountPath"]) + 1 :]
    item = next(i for i in volume["secret"]["items"] if i["path"] == file)
    return volume["secret"]["secretName"], item["key"]


@pytest.mark.parametrize("version", HELMS)
@pytest.mark.parametrize("values", VALUE_SETS)
def test_lint_strict(version, values):
    helm(version, "lint", "--strict", str(CHART), *VALUE_SETS[values])


@pytest.mark.parametrize("values", VALUE_SETS)
def test_helm_3_and_4_render_the_same_objects(rendered, values):
    assert without_random_passwords(render("helm4", VALUE_SETS[values])) == without_random_passwords(rendered[values])


@pytest.mark.parametrize("kubernetes", KUBERNETES)
@pytest.mark.parametrize("values", VALUE_SETS)
def test_every_object_passes_strict_schema_validation(rendered, values, kubernetes):
    validate_strictly(rendered[values], kubernetes)  # cert-manager's objects: checked field by field below


def test_the_defaults_render_nothing_of_this(rendered):
    objects = render("helm3")
    assert not by_kind(objects, "Certificate")
    # The only Secret by default is the job queue's NATS passwords (tests/system/test_chart_jobs.py).
    assert [s["metadata"]["name"] for s in by_kind(objects, "Secret")] == [f"{RELEASE}-nats-auth"]
    for component in ("gateway", "inference"):
        env = env_of(container(objects, component))
        assert not [name for name in env if "TLS" in name or "API_KEYS" in name or "RATE" in name or "HEALTH" in name]


@pytest.mark.parametrize("values", ["tls-cert-manager", "tls-own-secrets", "all-on"])
def test_tls_wiring_secrets_mounts_env_probes(rendered, values):
    objects = rendered[values]
    inference, gateway = container(objects, "inference"), container(objects, "gateway")
    ienv, genv = env_of(inference), env_of(gateway)
    ports = {p["name"]: p["containerPort"] for p in inference["ports"]}
    health = int(ienv["INFERENCEHUB_HEALTH_PORT"])
    assert ports["health"] == health != ports["grpc"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert inference[probe]["grpc"]["port"] == health, probe  # the kubelet's probe speaks no TLS

    replica_secret = {
        secret_behind(pod_spec(objects, "inference"), inference, ienv[f"INFERENCEHUB_TLS_{name}"])
        for name in ("CERT", "KEY", "CLIENT_CA")
    }
    gateway_secret = {
        secret_behind(pod_spec(objects, "gateway"), gateway, genv[f"INFERENCEHUB_UPSTREAM_TLS_{name}"])
        for name in ("CERT", "KEY", "CA")
    }
    (replica_name,) = {name for name, _ in replica_secret}
    (gateway_name,) = {name for name, _ in gateway_secret}
    assert {key for _, key in replica_secret} == {key for _, key in gateway_secret} == {"tls.crt", "tls.key", "ca.crt"}
    # The replicas serve the gateway's identity only (plus tls.extraClientNames).
    gateway_identity = f"{RELEASE}-gateway.{NAMESPACE}.svc.cluster.local"
    expected = {
        "all-on": f"{gateway_identity},spiffe://cluster.local/ns/ops/sa/debug",
        "tls-own-secrets": "gateway.example.com",
    }.get(values, gateway_identity)
    assert ienv["INFERENCEHUB_TLS_CLIENT_NAMES"] == expected
    if values == "tls-own-secrets":
        assert (replica_name, gateway_name) == ("my-replica-tls", "my-gateway-tls")
        assert not by_kind(objects, "Certificate")
        return

    certificates = {c["metadata"]["name"]: c for c in by_kind(objects, "Certificate")}
    assert set(certificates) == {f"{RELEASE}-inference", f"{RELEASE}-gateway"}
    server, client = certificates[f"{RELEASE}-inference"]["spec"], certificates[f"{RELEASE}-gateway"]["spec"]
    assert (server["secretName"], client["secretName"]) == (replica_name, gateway_name)
    assert "server auth" in server["usages"] and "client auth" in client["usages"]
    for spec in (server, client):
        assert spec["issuerRef"] == {"name": "inferencehub-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
        assert spec["privateKey"]["rotationPolicy"] == "Always"
        assert re.fullmatch(r"\d+h", spec["duration"]) and re.fullmatch(r"\d+h", spec["renewBefore"])
    # The gateway checks the name it dials: the headless Service's, which the replicas' certificate must carry.
    upstream_host = re.fullmatch(r"dns:///([^:]+):\d+", genv["INFERENCEHUB_UPSTREAM"]).group(1)
    assert upstream_host in server["dnsNames"]
    assert f"{RELEASE}-inference" in server["dnsNames"]  # the Service helm test and port-forward use
    assert client["dnsNames"] == [gateway_identity]  # the gateway's certificate carries the identity served

    tests = {p["metadata"]["name"]: p for p in by_kind(objects, "Pod")}
    assert f"{RELEASE}-test-grpc-health" not in tests  # plaintext: would fail with TLS on
    mtls = tests[f"{RELEASE}-test-grpc-mtls"]
    assert mtls["spec"]["volumes"][0]["secret"]["secretName"] == gateway_name
    assert "secure_channel" in mtls["spec"]["containers"][0]["args"][0]
    (policy,) = [p for p in by_kind(objects, "NetworkPolicy") if p["metadata"]["name"].endswith("-inference")]
    open_ports = [p["port"] for rule in policy["spec"]["ingress"] if "from" not in rule for p in rule["ports"]]
    assert "health" in open_ports and "grpc" not in open_ports


def api_key_secrets(objects: list[dict]) -> list[dict]:
    """The rendered Secrets but the job queue's NATS passwords."""
    return [s for s in by_kind(objects, "Secret") if not s["metadata"]["name"].endswith("-nats-auth")]


@pytest.mark.parametrize("values", ["keys", "keys-existing-secret", "all-on"])
def test_api_key_wiring(rendered, values):
    objects = rendered[values]
    gateway = container(objects, "gateway")
    env = env_of(gateway)
    name, key = secret_behind(pod_spec(objects, "gateway"), gateway, env["INFERENCEHUB_API_KEYS_FILE"])
    secrets = api_key_secrets(objects)
    if values == "keys-existing-secret":
        assert (name, key) == ("my-keys", "keys.txt") and not secrets
        assert "INFERENCEHUB_RATE_LIMIT" not in env
        return
    (secret,) = secrets
    assert secret["metadata"]["name"] == name
    lines = secret["stringData"][key].splitlines()
    assert lines == [HASHED_LINE, "sha256:" + "0" * 64 + " other"]
    assert (env["INFERENCEHUB_RATE_LIMIT"], env["INFERENCEHUB_RATE_LIMIT_BURST"]) == ("200", "50")
    test_pod = next(p for p in by_kind(objects, "Pod") if p["metadata"]["name"] == f"{RELEASE}-test-gateway")
    (api_key,) = test_pod["spec"]["containers"][0]["env"]
    assert api_key["name"] == "INFERENCEHUB_API_KEY"
    assert api_key["valueFrom"]["secretKeyRef"] == {"name": "helm-test-key", "key": "key"}


def test_bad_values_are_rejected_with_a_clear_message():
    for args, words in [
        (["--set", "tls.healthPort=0"], "/tls/healthPort"),
        (["--set", "auth.rateLimit.requestsPerSecond=-1"], "requestsPerSecond"),
        (["--set", "auth.apiKeys.kyes=x"], "kyes"),
        (["--set", "tls.colour=blue"], "colour"),
        (["--set", "tls.enabled=true", "--set", "tls.certManager.enabled=true"], "issuerRef/name"),
        (["--set", "tls.certManager.duration=90 days"], "duration"),
        (["--set", "tls.gatewayName=two names"], "gatewayName"),
        (["--set-json", 'tls.extraClientNames=["a,b"]'], "extraClientNames"),
        (["--set", "auth.apiKeys.enabled=true"], "auth.apiKeys.keys"),
    ]:
        done = helm("helm3", "template", RELEASE, str(CHART), *args, check=False)
        assert done.returncode != 0 and words in done.stderr, (args, done.stderr)


# --- the wiring test, TLS and API keys on --------------------------------------------------------


def materialize(spec: dict, c: dict, files: dict[str, dict[str, bytes]], root: Path) -> dict[str, str]:
    """Write each Secret volume's files into ``root`` and return env overrides pointing at them."""
    places = {}
    for mount in c["volumeMounts"]:
        volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
        if "secret" not in volume:
            continue
        folder = root / c["name"] / mount["name"]
        folder.mkdir(parents=True)
        content = files[volume["secret"]["secretName"]]
        for item in volume["secret"]["items"]:
            (folder / item["path"]).write_bytes(content[item["key"]])
        places[mount["mountPath"]] = folder
    overrides = {}
    for item in c["env"]:
        for mount_path, folder in places.items():
            if item.get("value", "").startswith(mount_path + "/"):
                overrides[item["name"]] = str(folder) + item["value"][len(mount_path) :]
    return overrides


def test_wiring_with_tls_and_api_keys_on(rendered, tmp_path):
    objects = rendered["all-on"]
    inference, gateway = container(objects, "inference"), container(objects, "gateway")
    certificates = {c["metadata"]["name"]: c["spec"] for c in by_kind(objects, "Certificate")}
    server, client = certificates[f"{RELEASE}-inference"], certificates[f"{RELEASE}-gateway"]

    # What cert-manager would write: a CA issuer's certificates for exactly the names the chart asks for.
    ca = CA("the cluster's CA issuer")
    server_cert, server_key = ca.issue("inference", dns=tuple(server["dnsNames"]))
    client_cert, client_key = ca.issue(client["commonName"], dns=tuple(client["dnsNames"]))
    (secret,) = api_key_secrets(objects)
    files = {
        server["secretName"]: {"tls.crt": server_cert, "tls.key": server_key, "ca.crt": ca.pem},
        client["secretName"]: {"tls.crt": client_cert, "tls.key": client_key, "ca.crt": ca.pem},
        secret["metadata"]["name"]: {k: v.encode() for k, v in secret["stringData"].items()},
    }
    inference_host, gateway_host = "127.0.0.41", "127.0.0.42"
    env = materialize(pod_spec(objects, "inference"), inference, files, tmp_path)
    replica = Manifested(inference, {**env, "INFERENCEHUB_HOST": inference_host})
    servers = [replica]
    records = None
    try:
        grpc_port = next(p["containerPort"] for p in inference["ports"] if p["name"] == "grpc")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            spec = inference[probe]["grpc"]
            wait_for(
                lambda s=spec: grpc_probe(f"{inference_host}:{s['port']}", s["service"]),
                timeout=60,
                what=f"the inference {probe} on the health-only port",
            )
        assert not grpc_probe(f"{inference_host}:{grpc_port}", "")  # the gRPC port refuses plaintext

        def health_over_tls(cert: bytes, key: bytes) -> grpc.StatusCode:
            credentials = grpc.ssl_channel_credentials(ca.pem, key, cert)
            options = [("grpc.ssl_target_name_override", server["dnsNames"][0])]
            with grpc.secure_channel(f"{inference_host}:{grpc_port}", credentials, options) as channel:
                try:
                    channel.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=5)
                except grpc.RpcError as exc:
                    return exc.code()
            return grpc.StatusCode.OK

        # The same issuer signs another workload's certificate: the replica refuses it, and serves the gateway's.
        other_cert, other_key = ca.issue("batch-job", dns=(f"batch-job.{NAMESPACE}.svc.cluster.local",))
        assert health_over_tls(other_cert, other_key) == grpc.StatusCode.PERMISSION_DENIED
        assert health_over_tls(client_cert, client_key) == grpc.StatusCode.OK

        genv = env_of(gateway)
        name, target_port = re.fullmatch(r"dns:///([^:]+):(\d+)", genv["INFERENCEHUB_UPSTREAM"]).groups()
        records = DNSServer(
            DnsRecords(name, [inference_host], ttl=1),
            address="127.0.0.1",
            port=0,
            logger=DNSLogger(logf=lambda *_: None),
        )
        records.start_thread()
        overrides = materialize(pod_spec(objects, "gateway"), gateway, files, tmp_path)
        front = Manifested(
            gateway,
            {
                **overrides,
                "INFERENCEHUB_HOST": gateway_host,
                "INFERENCEHUB_UPSTREAM": f"dns://127.0.0.1:{records.server.server_address[1]}/{name}:{target_port}",
            },
        )
        servers.append(front)
        http_port = next(p["containerPort"] for p in gateway["ports"] if p["name"] == "http")
        for probe in ("livenessProbe", "readinessProbe"):  # open: the kubelet carries no key
            path = gateway[probe]["httpGet"]["path"]
            wait_for(lambda p=path: http_status(gateway_host, http_port, p) == 200, timeout=30, what=probe)

        body = json.dumps(
            {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [6.3, 3.3, 6.0, 2.5]}]}
        )
        url = f"http://{gateway_host}:{http_port}/v2/models/iris/infer"

        def curl(*headers: str) -> str:
            done = subprocess.run(["curl", "-s", "-i", url, "-d", body, *headers], capture_output=True, text=True)
            return done.stdout

        answer = curl("-H", f"Authorization: Bearer {KEY}")
        assert " 200 " in answer.splitlines()[0], answer  # over mutual TLS, names checked, key accepted
        assert "x-inferencehub-replica: inference-pod-0" in answer.lower()
        assert '"label","datatype":"INT64","shape":[1],"data":[2]' in answer
        refused = curl()
        assert " 401 " in refused.splitlines()[0] and "www-authenticate: bearer" in refused.lower()
        for server in reversed(servers):
            assert server.terminate() == 0
    finally:
        for server in servers:
            server.kill()
        if records is not None:
            records.stop()


def test_notes_show_grpcurl_with_the_client_certificate_and_the_key_header():
    args = ["--namespace", NAMESPACE, "--dry-run=client", *VALUE_SETS["all-on"]]
    notes = helm("helm4", "install", RELEASE, str(CHART), *args).stdout.split("NOTES:", 1)[1]
    assert "grpcurl -plaintext" not in notes
    assert "grpcurl -cacert ca.crt -cert tls.crt -key tls.key localhost:8081 list" in notes
    assert f"get secret {RELEASE}-gateway-tls" in notes
    assert "Authorization: Bearer $KEY" in notes
