"""The Helm chart, proven without a cluster: lint, render, strict schemas, policies, and the real processes
started the way the rendered manifests start them."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys

import kubernetes_validate
import pytest
import yaml
from dnslib import QTYPE, RR, A
from dnslib.server import BaseResolver, DNSLogger, DNSServer

from conftest import ROOT, Server, health_status, wait_for

CHART = ROOT / "charts" / "inferencehub"
TOOLS = ROOT / ".cache" / "tools"
HELMS = {"helm3": TOOLS / "helm-3" / "helm", "helm4": TOOLS / "helm-4" / "helm"}
NAMESPACE = "demo"
RELEASE = "inferencehub"
KUBERNETES = ["1.29.0", "1.37.0"]  # the oldest supported and the newest bundled schemas

MODELS_VALUES = {
    "inference": {
        "models": {
            "configMap": {
                "enabled": True,
                "files": {
                    "echo/config.json": json.dumps(
                        {
                            "name": "echo",
                            "runtime": "mock",
                            "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1]}],
                            "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1]}],
                        }
                    ),
                },
            }
        }
    }
}
VALUE_SETS = {
    "defaults": [],
    "hpa-off": ["--set", "inference.autoscaling.enabled=false"],
    "networkpolicy": ["--set", "networkPolicy.enabled=true"],
    "servicemonitor": ["--set", "serviceMonitor.enabled=true"],
    "custom-metric": ["--set", "inference.autoscaling.inFlightRequests.enabled=true"],
    "configmap-models": [
        "--set-json",
        json.dumps(MODELS_VALUES["inference"]["models"]).join(["inference.models=", ""]),
    ],
}


@pytest.fixture(scope="module", autouse=True)
def helm_installed():
    missing = [str(path) for path in HELMS.values() if not path.exists()]
    assert not missing, f"run `make tools` (or `python scripts/install_tools.py`): missing {missing}"


def helm(version: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([str(HELMS[version]), *args], capture_output=True, text=True, timeout=60)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def render(version: str = "helm3", values: list[str] | None = None) -> list[dict]:
    out = helm(version, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *(values or [])).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict], kind: str, component: str) -> dict:
    found = [o for o in by_kind(objects, kind) if o["metadata"]["labels"]["app.kubernetes.io/component"] == component]
    assert len(found) == 1, f"{kind} {component}: {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render("helm3", values) for name, values in VALUE_SETS.items()}


@pytest.mark.parametrize("version", HELMS)
@pytest.mark.parametrize("values", VALUE_SETS)
def test_lint_strict(version, values):
    helm(version, "lint", "--strict", str(CHART), *VALUE_SETS[values])


@pytest.mark.parametrize("values", VALUE_SETS)
def test_helm_3_and_4_render_the_same_objects(rendered, values):
    assert render("helm4", VALUE_SETS[values]) == rendered[values]


@pytest.mark.parametrize("kubernetes", KUBERNETES)
@pytest.mark.parametrize("values", VALUE_SETS)
def test_every_object_passes_strict_schema_validation(rendered, values, kubernetes):
    for obj in rendered[values]:
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            assert obj["kind"] == "ServiceMonitor" and obj["spec"]["endpoints"][0]["path"] == "/metrics"
            continue
        kubernetes_validate.validate(obj, kubernetes, strict=True)


def test_the_value_sets_render_what_they_turn_on(rendered):
    kinds = {name: sorted({o["kind"] for o in objs}) for name, objs in rendered.items()}
    assert "HorizontalPodAutoscaler" in kinds["defaults"] and "HorizontalPodAutoscaler" not in kinds["hpa-off"]
    assert "NetworkPolicy" in kinds["networkpolicy"] and "NetworkPolicy" not in kinds["defaults"]
    assert kinds["servicemonitor"].count("ServiceMonitor") == 1
    assert len(by_kind(rendered["servicemonitor"], "ServiceMonitor")) == 2
    assert "ConfigMap" in kinds["configmap-models"]
    hpa = by_kind(rendered["custom-metric"], "HorizontalPodAutoscaler")[0]
    pods = [m for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert pods[0]["pods"]["metric"]["name"] == "inferencehub_inference_in_flight_requests"
    deployment = one(rendered["hpa-off"], "Deployment", "inference")
    assert deployment["spec"]["replicas"] == 2
    assert "replicas" not in one(rendered["defaults"], "Deployment", "inference")["spec"]


@pytest.mark.parametrize("values", VALUE_SETS)
def test_policies(rendered, values):
    objects = rendered[values]
    for deployment in by_kind(objects, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod["containers"]:
            assert container["livenessProbe"] and container["readinessProbe"], container["name"]
            assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
            assert security["capabilities"]["drop"] == ["ALL"]
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            volumes = {v["name"]: v for v in pod["volumes"]}
            assert "emptyDir" in volumes[mounts["/tmp"]]  # the one writable path
            env = {e["name"]: e.get("value") for e in container["env"]}
            # Termination fits: preStop, then the service's drain and grace, inside the grace period.
            pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
            drain, grace = float(env["INFERENCEHUB_DRAIN_SECONDS"]), float(env["INFERENCEHUB_GRACE_SECONDS"])
            assert pre_stop + drain + grace < pod["terminationGracePeriodSeconds"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()

    pods = {
        d["metadata"]["labels"]["app.kubernetes.io/component"]: d["spec"]["template"]
        for d in by_kind(objects, "Deployment") + by_kind(objects, "StatefulSet")  # StatefulSet: the job queue
    }
    for service in by_kind(objects, "Service"):
        component = service["metadata"]["labels"]["app.kubernetes.io/component"]
        template = pods[component]
        assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
        named = {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in named, service["metadata"]["name"]
    for pdb in by_kind(objects, "PodDisruptionBudget"):
        component = pdb["metadata"]["labels"]["app.kubernetes.io/component"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= pods[component]["metadata"]["labels"].items()

    inference = pods["inference"]["spec"]["containers"][0]
    grpc_port = next(p["containerPort"] for p in inference["ports"] if p["name"] == "grpc")
    env = {e["name"]: e for e in inference["env"]}
    assert int(env["INFERENCEHUB_PORT"]["value"]) == grpc_port
    assert env["INFERENCEHUB_REPLICA_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert inference[probe]["grpc"]["port"] == grpc_port
    assert inference["readinessProbe"]["grpc"]["service"] == "inference.GRPCInferenceService"
    assert inference["livenessProbe"]["grpc"]["service"] == "inferencehub.liveness"

    headless = next(s for s in by_kind(objects, "Service") if s["spec"].get("clusterIP") == "None")
    gateway = pods["gateway"]["spec"]["containers"][0]
    upstream = next(e["value"] for e in gateway["env"] if e["name"] == "INFERENCEHUB_UPSTREAM")
    name, port = headless["metadata"]["name"], headless["spec"]["ports"][0]["port"]
    assert upstream == f"dns:///{name}.{NAMESPACE}.svc.cluster.local:{port}"
    assert port == grpc_port
    http_port = next(p["containerPort"] for p in gateway["ports"] if p["name"] == "http")
    assert int(next(e["value"] for e in gateway["env"] if e["name"] == "INFERENCEHUB_PORT")) == http_port

    for hpa in by_kind(objects, "HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        inference_deployment = one(objects, "Deployment", "inference")
        assert (target["kind"], target["name"]) == ("Deployment", inference_deployment["metadata"]["name"])
        assert hpa["spec"]["behavior"]["scaleUp"] and hpa["spec"]["behavior"]["scaleDown"]
    for policy in by_kind(objects, "NetworkPolicy"):
        allowed = policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
        assert allowed.items() <= pods["gateway"]["metadata"]["labels"].items()
        assert policy["spec"]["podSelector"]["matchLabels"].items() <= pods["inference"]["metadata"]["labels"].items()


def test_bad_values_are_rejected_by_the_schema():
    for args, words in [
        (["--set", "inference.port=0"], "/inference/port"),
        (["--set", "gateway.replicas=many"], "/gateway/replicas"),
        (["--set", "inference.autoscaling.targetCPUUtilizationPercentage=150"], "targetCPUUtilizationPercentage"),
        (["--set", "inference.colour=blue"], "colour"),
    ]:
        done = helm("helm3", "template", RELEASE, str(CHART), *args, check=False)
        assert done.returncode != 0 and words in done.stderr, (args, done.stderr)


def test_notes_print_port_forward_curl_and_grpcurl():
    # helm 4's client-side dry run renders NOTES.txt without a cluster.
    out = helm("helm4", "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client").stdout
    notes = out.split("NOTES:", 1)[1]
    assert f"kubectl -n {NAMESPACE} port-forward service/{RELEASE}-gateway 8080:8080" in notes
    assert f"port-forward service/{RELEASE}-inference 8081:8081" in notes
    assert "curl -s http://127.0.0.1:8080/v2/models/iris/infer" in notes
    assert "grpcurl -plaintext 127.0.0.1:8081 list" in notes
    assert f"helm test {RELEASE}" in notes


def test_helm_test_pods_check_the_gateway_and_grpc_health(rendered):
    pods = [
        o for o in by_kind(rendered["networkpolicy"], "Pod") if o["metadata"]["annotations"]["helm.sh/hook"] == "test"
    ]
    assert len(pods) == 2
    commands = [" ".join(p["spec"]["containers"][0]["command"] + p["spec"]["containers"][0]["args"]) for p in pods]
    assert any("infer iris" in c and f"http://{RELEASE}-gateway:8080" in c for c in commands)
    assert any("grpc.health.v1" in c or "grpc_health" in c for c in commands)
    from inferencehub.cli import build_parser

    gateway_test = next(p for p in pods if "infer" in p["spec"]["containers"][0]["args"])
    build_parser().parse_args(gateway_test["spec"]["containers"][0]["args"])


# --- the wiring test: the chart and the code must agree -------------------------------------


class Records(BaseResolver):
    def __init__(self, name: str, address: str) -> None:
        self.name, self.address = name.rstrip(".") + ".", address

    def resolve(self, request, handler):
        reply = request.reply()
        if str(request.q.qname) == self.name and request.q.qtype == QTYPE.A:
            reply.add_answer(RR(self.name, QTYPE.A, rdata=A(self.address), ttl=1))
        return reply


class Manifested(Server):
    """A process started with the command, args and env of a rendered container."""

    def __init__(self, container: dict, env_overrides: dict[str, str], pattern: str) -> None:
        self.pattern = re.compile(pattern)
        env = {}
        for item in container["env"]:
            if "value" in item:
                env[item["name"]] = item["value"]
            else:  # the Downward API's pod name
                assert item["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
                env[item["name"]] = f"{container['name']}-pod-0"
        env.update(env_overrides)
        assert container["command"] == ["inferencehub"]
        super().__init__([sys.executable, "-m", "inferencehub", *container["args"]], env)


def test_wiring_rendered_deployments_start_pass_their_probes_and_serve(rendered):
    objects = rendered["defaults"]
    inference = one(objects, "Deployment", "inference")["spec"]["template"]["spec"]["containers"][0]
    gateway = one(objects, "Deployment", "gateway")["spec"]["template"]["spec"]["containers"][0]
    inference_host, gateway_host = "127.0.0.31", "127.0.0.32"  # a pod's IP each, on loopback

    # Inference, as the manifest runs it (ports from the manifest; the host bound to its loopback "pod IP").
    replica = Manifested(inference, {"INFERENCEHUB_HOST": inference_host}, r"listening: gRPC on [\d.]+:(\d+)")
    servers = [replica]
    records = None
    try:
        port = int(replica.match.group(1))
        assert port == next(p["containerPort"] for p in inference["ports"] if p["name"] == "grpc")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            spec = inference[probe]["grpc"]
            wait_for(
                lambda s=spec: _grpc_probe(f"{inference_host}:{s['port']}", s["service"]),
                timeout=60,
                what=f"the inference {probe}",
            )

        # The gateway's dns:/// target, answered by a DNS server standing in for the cluster's.
        upstream = next(e["value"] for e in gateway["env"] if e["name"] == "INFERENCEHUB_UPSTREAM")
        name, target_port = re.fullmatch(r"dns:///([^:]+):(\d+)", upstream).groups()
        records = DNSServer(
            Records(name, inference_host), address="127.0.0.1", port=0, logger=DNSLogger(logf=lambda *_: None)
        )
        records.start_thread()
        dns_port = records.server.server_address[1]
        front = Manifested(
            gateway,
            {
                "INFERENCEHUB_HOST": gateway_host,
                "INFERENCEHUB_UPSTREAM": f"dns://127.0.0.1:{dns_port}/{name}:{target_port}",
            },
            r"listening: http://[\d.]+:(\d+)",
        )
        servers.append(front)
        for probe in ("livenessProbe", "readinessProbe"):
            spec = gateway[probe]["httpGet"]
            probe_port = next(p["containerPort"] for p in gateway["ports"] if p["name"] == spec["port"])
            wait_for(
                lambda p=probe_port, s=spec: _http_status(gateway_host, p, s["path"]) == 200,
                timeout=30,
                what=f"the gateway {probe}",
            )

        http_port = next(p["containerPort"] for p in gateway["ports"] if p["name"] == "http")
        body = json.dumps(
            {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [6.3, 3.3, 6.0, 2.5]}]}
        )
        done = subprocess.run(
            ["curl", "-s", "-i", f"http://{gateway_host}:{http_port}/v2/models/iris/infer", "-d", body],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert " 200 " in done.stdout.splitlines()[0], done.stdout
        assert "x-inferencehub-replica: inference-pod-0" in done.stdout.lower()
        assert '"label","datatype":"INT64","shape":[1],"data":[2]' in done.stdout
        for server in reversed(servers):
            assert server.terminate() == 0
    finally:
        for server in servers:
            server.kill()
        if records is not None:
            records.stop()


def _grpc_probe(target: str, service: str) -> bool:
    try:
        return health_status(target, service) == "SERVING"
    except Exception:
        return False


def _http_status(host: str, port: int, path: str) -> int:
    import http.client

    try:
        conn = http.client.HTTPConnection(host, port, timeout=2)
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return 0


# --- images, skaffold, the kind path ---------------------------------------------------------


@pytest.mark.parametrize("component", ["gateway", "inference"])
def test_dockerfiles(component):
    text = (ROOT / f"Dockerfile.{component}").read_text()
    stages = re.findall(r"^FROM (\S+)", text, re.M)
    assert stages == ["python:3.12-slim", "python:3.12-slim"]  # multi-stage, slim runtime
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    deps = next(i for i, line in enumerate(lines) if "pip install -c constraints.txt" in line)
    source = next(i for i, line in enumerate(lines) if line.startswith("COPY services"))
    assert deps < source, "the dependency layer comes before the source"
    assert f'optional-dependencies"]["{component}"]' in lines[deps]  # only this service's extra
    assert re.search(r"^USER \d+:\d+$", text, re.M), "a numeric non-root user"
    entrypoint = re.search(r"^ENTRYPOINT (.+)$", text, re.M).group(1)
    assert json.loads(entrypoint) == ["inferencehub"]  # exec form
    assert json.loads(re.search(r"^CMD (.+)$", text, re.M).group(1)) == [component]
    ignored = (ROOT / ".dockerignore").read_text()
    assert ignored.splitlines()[1] == "*" or "*\n" in ignored


def test_skaffold_matches_the_dockerfiles_and_the_chart():
    config = yaml.safe_load((ROOT / "skaffold.yaml").read_text())
    assert re.fullmatch(r"skaffold/v4beta\d+", config["apiVersion"])
    artifacts = {a["image"]: a for a in config["build"]["artifacts"]}
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for component in ("gateway", "inference"):
        artifact = artifacts[f"inferencehub-{component}"]
        assert (ROOT / artifact["context"] / artifact["docker"]["dockerfile"]).name == f"Dockerfile.{component}"
        assert values[component]["image"]["repository"] == f"inferencehub-{component}"
    release = config["deploy"]["helm"]["releases"][0]
    assert (ROOT / release["chartPath"]) == CHART
    for key in release["setValueTemplates"]:
        node = values
        for part in key.split("."):
            assert part in node, key
            node = node[part]
    for profile in config["profiles"]:
        for patch in profile.get("patches", []):
            for key in patch["value"]:
                node = values
                for part in key.split("."):
                    assert part in node, f"{profile['name']}: {key}"
                    node = node[part]
        for manifest in profile.get("manifests", {}).get("rawYaml", []):
            assert (ROOT / manifest).exists()
    forward = config["portForward"][0]
    gateway_service = one(render(), "Service", "gateway")
    assert forward["resourceName"] == gateway_service["metadata"]["name"]
    assert forward["port"] == gateway_service["spec"]["ports"][0]["port"]


def test_kind_path_files():
    kind = yaml.safe_load((ROOT / "k8s" / "kind-cluster.yaml").read_text())
    assert [n["role"] for n in kind["nodes"]] == ["control-plane", "worker", "worker"]
    job = yaml.safe_load((ROOT / "k8s" / "hpa-load-job.yaml").read_text())
    kubernetes_validate.validate(job, KUBERNETES[0], strict=True)
    container = job["spec"]["template"]["spec"]["containers"][0]
    from inferencehub.cli import build_parser

    args = build_parser().parse_args(container["args"])
    assert args.model == "mock-heavy" and args.url == f"http://{RELEASE}-gateway:8080"
    assert container["image"].startswith("inferencehub-gateway:")
    patch = yaml.safe_load((ROOT / "k8s" / "metrics-server-patch.yaml").read_text())
    assert patch[0]["value"] == "--kubelet-insecure-tls"
    script = ROOT / "scripts" / "k8s.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert usage.returncode == 2 and "kind up" in usage.stdout
    makefile = (ROOT / "Makefile").read_text()
    for target in ("kind-up", "kind-demo", "kind-down", "minikube-up"):
        assert target in makefile
    assert shlex.split("scripts/k8s.sh kind up")  # the README's command form
