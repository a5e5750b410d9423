"""The Helm chart, proven without a cluster: lint, render, strict schemas, policies, and the real processes
started the way the rendered manifests start them."""

from __future__ import annotations

import json
import re
import subprocess

import kubernetes_validate
import pytest
import yaml
from dnslib.server import DNSLogger, DNSServer

from conftest import (
    CHART,
    HELMS,
    KUBERNETES,
    NAMESPACE,
    RELEASE,
    ROOT,
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

PARTS = ("gateway", "inference")

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
    # OpenShift's restricted SCC: the platform assigns uid and gid (with the NetworkPolicies on, so the helm test
    # and scrape rules render with it too).
    "platform-ids": [
        "--set",
        "securityContext.platformAssignsIds=true,networkPolicy.enabled=true",
        "--set-json",
        'networkPolicy.gateway.from=[{"namespaceSelector": {"matchLabels": {"ingress": "true"}}}]',
    ],
    "dashboard": ["--set", "dashboard.enabled=true"],
    "custom-metric": ["--set", "inference.autoscaling.inFlightRequests.enabled=true"],
    "configmap-models": [
        "--set-json",
        json.dumps(MODELS_VALUES["inference"]["models"]).join(["inference.models=", ""]),
    ],
    # Models from a volume claim, loaded explicitly; models from an image, polled.
    "pvc-models": [
        "--set",
        "inference.models.persistentVolumeClaim.claimName=models,inference.models.persistentVolumeClaim.subPath=v1",
        "--set",
        "inference.modelControl.mode=explicit,inference.modelControl.load={iris,digits}",
    ],
    "image-models": [
        "--set",
        "inference.models.image.repository=registry.example.com/models,inference.models.image.tag=2024.1",
        "--set",
        "inference.modelControl.mode=poll,inference.modelControl.pollSeconds=10",
    ],
    # Every optional object and pod setting at once.
    "everything": [
        "--set",
        "networkPolicy.enabled=true,gateway.autoscaling.enabled=true,gateway.ingress.enabled=true",
        "--set",
        "gateway.httpRoute.enabled=true,gateway.httpRoute.timeouts.request=40s,gateway.ingress.className=nginx",
        "--set",
        "gateway.priorityClassName=high,inference.priorityClassName=high,serviceMonitor.enabled=true",
        "--set-json",
        'imagePullSecrets=[{"name": "regcred"}]',
        "--set-json",
        'gateway.podAnnotations={"example.com/team": "ml"}',
        "--set-json",
        'inference.podLabels={"example.com/tier": "compute"}',
        "--set-json",
        'networkPolicy.gateway.from=[{"namespaceSelector": {"matchLabels": {"ingress": "true"}}}]',
        "--set-json",
        'gateway.ingress.tls=[{"hosts": ["inferencehub.example.com"], "secretName": "tls"}]',
    ],
}
# Custom resources kubernetes-validate has no schema for, checked structurally instead.
CUSTOM_RESOURCES = ("monitoring.coreos.com/", "gateway.networking.k8s.io/")


@pytest.fixture(scope="module", autouse=True)
def helm_installed():
    missing = [str(path) for path in HELMS.values() if not path.exists()]
    assert not missing, f"run `make tools` (or `python scripts/install_tools.py`): missing {missing}"


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render("helm3", values) for name, values in VALUE_SETS.items()}


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
    validate_strictly(rendered[values], kubernetes)


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
    everything = rendered["everything"]
    assert {o["kind"] for o in everything} >= {"Ingress", "HTTPRoute", "NetworkPolicy", "ServiceAccount"}
    assert {one(everything, "HorizontalPodAutoscaler", c)["spec"]["scaleTargetRef"]["name"] for c in PARTS} == {
        one(everything, "Deployment", c)["metadata"]["name"] for c in PARTS
    }
    assert {one(everything, "NetworkPolicy", c)["metadata"]["name"] for c in PARTS}
    gateway_service = one(everything, "Service", "gateway")
    ingress = by_kind(everything, "Ingress")[0]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": gateway_service["metadata"]["name"], "port": {"name": "http"}}
    assert ingress["spec"]["ingressClassName"] == "nginx" and ingress["spec"]["tls"][0]["secretName"] == "tls"
    route = by_kind(everything, "HTTPRoute")[0]
    assert route["spec"]["rules"][0]["backendRefs"] == [
        {"name": gateway_service["metadata"]["name"], "port": gateway_service["spec"]["ports"][0]["port"]}
    ]
    gateway_policy = one(everything, "NetworkPolicy", "gateway")
    assert gateway_policy["spec"]["ingress"][0]["from"] == [{"namespaceSelector": {"matchLabels": {"ingress": "true"}}}]
    account = by_kind(everything, "ServiceAccount")[0]
    for component in PARTS:
        pod = one(everything, "Deployment", component)["spec"]["template"]
        assert pod["spec"]["serviceAccountName"] == account["metadata"]["name"]
        assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
        assert pod["spec"]["priorityClassName"] == "high"
    assert one(everything, "Deployment", "gateway")["spec"]["template"]["metadata"]["annotations"] == {
        "example.com/team": "ml"
    }
    assert one(everything, "Deployment", "inference")["spec"]["template"]["metadata"]["labels"]["example.com/tier"] == (
        "compute"
    )
    for pod in by_kind(everything, "Pod"):  # helm test pods pull from the same registry
        assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
        assert pod["spec"]["serviceAccountName"] == account["metadata"]["name"]


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
        component = hpa["metadata"]["labels"]["app.kubernetes.io/component"]
        deployment = one(objects, "Deployment", component)
        assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
        assert "replicas" not in deployment["spec"]  # the HPA owns the count
        assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        if component == "inference":
            assert hpa["spec"]["behavior"]["scaleUp"] and hpa["spec"]["behavior"]["scaleDown"]
    for policy in by_kind(objects, "NetworkPolicy"):
        if policy["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway":
            assert policy["spec"]["podSelector"]["matchLabels"].items() <= pods["gateway"]["metadata"]["labels"].items()
            for rule in policy["spec"]["ingress"]:  # every rule opens the HTTP port and nothing else
                assert [p["port"] for p in rule["ports"]] == ["http"]
            continue
        if policy["metadata"]["labels"]["app.kubernetes.io/component"] != "inference":
            continue
        if policy["metadata"]["labels"]["app.kubernetes.io/component"] == "nats":
            continue  # tests/system/test_chart_jobs.py checks the job queue's
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


def test_wiring_rendered_deployments_start_pass_their_probes_and_serve(rendered):
    objects = rendered["defaults"]
    inference = one(objects, "Deployment", "inference")["spec"]["template"]["spec"]["containers"][0]
    gateway = one(objects, "Deployment", "gateway")["spec"]["template"]["spec"]["containers"][0]
    inference_host, gateway_host = "127.0.0.31", "127.0.0.32"  # a pod's IP each, on loopback

    # Inference, as the manifest runs it (ports from the manifest; the host bound to its loopback "pod IP").
    replica = Manifested(inference, {"INFERENCEHUB_HOST": inference_host})
    servers = [replica]
    records = None
    try:
        port = int(replica.addresses["grpc"].rsplit(":", 1)[1])
        assert port == next(p["containerPort"] for p in inference["ports"] if p["name"] == "grpc")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            spec = inference[probe]["grpc"]
            wait_for(
                lambda s=spec: grpc_probe(f"{inference_host}:{s['port']}", s["service"]),
                timeout=60,
                what=f"the inference {probe}",
            )

        # The gateway's dns:/// target, answered by a DNS server standing in for the cluster's.
        upstream = next(e["value"] for e in gateway["env"] if e["name"] == "INFERENCEHUB_UPSTREAM")
        name, target_port = re.fullmatch(r"dns:///([^:]+):(\d+)", upstream).groups()
        records = DNSServer(
            DnsRecords(name, [inference_host], ttl=1),
            address="127.0.0.1",
            port=0,
            logger=DNSLogger(logf=lambda *_: None),
        )
        records.start_thread()
        dns_port = records.server.server_address[1]
        front = Manifested(
            gateway,
            {
                "INFERENCEHUB_HOST": gateway_host,
                "INFERENCEHUB_UPSTREAM": f"dns://127.0.0.1:{dns_port}/{name}:{target_port}",
            },
        )
        servers.append(front)
        for probe in ("livenessProbe", "readinessProbe"):
            spec = gateway[probe]["httpGet"]
            probe_port = next(p["containerPort"] for p in gateway["ports"] if p["name"] == spec["port"])
            wait_for(
                lambda p=probe_port, s=spec: http_status(gateway_host, p, s["path"]) == 200,
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
    # Every node runs one pinned node image (tag and digest) of a Kubernetes the chart supports and is validated
    # for: without it each kind release brings its own default (kind 0.20: 1.27, which the chart refuses).
    (image,) = {n.get("image") for n in kind["nodes"]}
    match = re.fullmatch(r"kindest/node:v(\d+)\.(\d+)\.(\d+)@sha256:[0-9a-f]{64}", image or "")
    assert match, image
    version = tuple(int(v) for v in match.groups())
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    oldest = tuple(int(v) for v in re.fullmatch(r">=(\d+)\.(\d+)\.(\d+)-0", chart["kubeVersion"]).groups())
    newest = tuple(int(v) for v in KUBERNETES[-1].split("."))
    assert oldest <= version and version[:2] <= newest[:2], (version, chart["kubeVersion"], KUBERNETES)
    job = yaml.safe_load((ROOT / "k8s" / "hpa-load-job.yaml").read_text())
    kubernetes_validate.validate(job, KUBERNETES[0], strict=True)
    container = job["spec"]["template"]["spec"]["containers"][0]
    from inferencehub.cli import build_parser

    args = build_parser().parse_args(container["args"])
    assert args.model == "mock-heavy" and args.url == f"http://{RELEASE}-gateway:8080"
    # The bare name skaffold's hpa-demo profile replaces with the image it built (k8s.sh sets the deployed one).
    assert container["image"] == "inferencehub-gateway"
    skaffold = yaml.safe_load((ROOT / "skaffold.yaml").read_text())
    assert container["image"] in {a["image"] for a in skaffold["build"]["artifacts"]}
    demo = next(p for p in skaffold["profiles"] if p["name"] == "hpa-demo")
    assert demo["manifests"]["rawYaml"] == ["k8s/hpa-load-job.yaml"]
    assert {"op": "add", "path": "/deploy/kubectl", "value": {}} in demo["patches"]
    adapter = yaml.safe_load((ROOT / "k8s" / "prometheus-adapter-values.yaml").read_text())
    assert adapter["prometheus"]["url"].startswith("http") and adapter["prometheus"]["port"] == 9090
    assert adapter["rules"]["custom"][0]["name"]["as"] == "inferencehub_inference_in_flight_requests"
    patch = yaml.safe_load((ROOT / "k8s" / "metrics-server-patch.yaml").read_text())
    assert patch[0]["value"] == "--kubelet-insecure-tls"
    script = ROOT / "scripts" / "k8s.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert usage.returncode == 2 and "kind up" in usage.stdout
    makefile = (ROOT / "Makefile").read_text()
    for target in ("kind-up", "kind-demo", "kind-down", "minikube-up"):
        assert target in makefile
    # `make kind-up` (the command docs/kubernetes.md gives) runs the script's `kind up` step.
    dry = subprocess.run(["make", "-n", "kind-up"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert dry.returncode == 0 and "scripts/k8s.sh kind up" in dry.stdout, dry.stdout + dry.stderr


# --- names, invariants and production defaults -----------------------------------------------

DNS_1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS_1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
LONG_RELEASES = [
    "a" * 53,  # the longest name Helm accepts
    "x" * 30 + "-inferencehub-" + "y" * 9,  # contains the chart's name: the base, then cut like any other
    "team-a-inferencehub",  # contains the chart's name and is short: used as it is
    "a" * 40 + "b" * 13,  # shares its first 40 characters with the first: must not collide
]


def check_names(objects: list[dict]) -> None:
    for obj in objects:
        name = obj["metadata"]["name"]
        assert len(name) <= 63 and DNS_1123_LABEL.fullmatch(name), (obj["kind"], name)
        if obj["kind"] == "Service":
            assert DNS_1035_LABEL.fullmatch(name), name
        label_sets = [obj["metadata"].get("labels", {})]
        template = obj.get("spec", {}).get("template", {}).get("metadata")
        if template:
            label_sets.append(template["labels"])
        selector = obj.get("spec", {}).get("selector", {})
        label_sets.append(selector.get("matchLabels", selector if obj["kind"] == "Service" else {}))
        for labels in label_sets:
            for key, value in labels.items():
                prefix, _, key_name = key.rpartition("/")
                assert len(key_name) <= 63 and LABEL_NAME.fullmatch(key_name), key
                assert len(prefix) <= 253, key
                assert len(str(value)) <= 63 and LABEL_VALUE.fullmatch(str(value)), (key, value)


@pytest.mark.parametrize("release", LONG_RELEASES)
def test_every_name_fits_for_the_longest_release_names(release):
    assert len(release) <= 53
    objects = [
        doc
        for doc in yaml.safe_load_all(
            helm("helm3", "template", release, str(CHART), "--namespace", NAMESPACE, *VALUE_SETS["everything"]).stdout
        )
        if doc
    ]
    check_names(objects)
    for obj in objects:
        if not obj["apiVersion"].startswith(CUSTOM_RESOURCES):
            kubernetes_validate.validate(obj, KUBERNETES[0], strict=True)
    if release == "team-a-inferencehub":
        assert one(objects, "Service", "gateway")["metadata"]["name"] == f"{release}-gateway"


def test_long_release_names_that_share_a_prefix_get_different_names():
    names = set()
    for release in (LONG_RELEASES[0], LONG_RELEASES[2]):
        out = helm("helm3", "template", release, str(CHART), "--namespace", NAMESPACE).stdout
        names.add(one([d for d in yaml.safe_load_all(out) if d], "Service", "gateway")["metadata"]["name"])
    assert len(names) == 2


@pytest.mark.parametrize(
    "args",
    [
        ["--set", "fullnameOverride=" + "f" * 63],
        ["--set", "nameOverride=" + "n" * 63],
        ["--set", "fullnameOverride=hub"],
    ],
)
def test_name_overrides_are_kept_short_enough(args):
    objects = [d for d in yaml.safe_load_all(helm("helm3", "template", "r", str(CHART), *args).stdout) if d]
    check_names(objects)
    if args[1] == "fullnameOverride=hub":
        assert one(objects, "Service", "gateway")["metadata"]["name"] == "hub-gateway"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--set", "inference.graceSeconds=40"],
            "inference: preStopSeconds + drainSeconds + graceSeconds (45 s) must be less than "
            "terminationGracePeriodSeconds (40 s)",
        ),
        (
            ["--set", "gateway.terminationGracePeriodSeconds=37"],
            "gateway: preStopSeconds + drainSeconds + graceSeconds (37 s) must be less than",
        ),
        (
            ["--set", "gateway.maxDeadlineSeconds=31"],
            "gateway.graceSeconds (30 s) is shorter than gateway.maxDeadlineSeconds (31 s)",
        ),
        (
            ["--set", "inference.graceSeconds=20"],
            "inference.graceSeconds (20 s) is shorter than gateway.maxDeadlineSeconds (30 s)",
        ),
        (
            ["--set", "gateway.deadlineSeconds=31"],
            "gateway.deadlineSeconds (31 s) is longer than gateway.maxDeadlineSeconds (30 s)",
        ),
        (
            ["--set", "inference.maxConnectionAgeGraceSeconds=10"],
            "inference.maxConnectionAgeGraceSeconds (10 s) is shorter than gateway.maxDeadlineSeconds (30 s): "
            "calls inside their deadline would be cut when their connection ages out",
        ),
        (
            ["--set", "inference.autoscaling.minReplicas=7"],
            "inference.autoscaling: minReplicas (7) is greater than maxReplicas (6)",
        ),
        (
            ["--set", "gateway.autoscaling.enabled=true,gateway.autoscaling.maxReplicas=1"],
            "gateway.autoscaling: minReplicas (2) is greater than maxReplicas (1)",
        ),
        (["--set", "gateway.pdb.maxUnavailable=0"], "gateway.pdb.maxUnavailable is 0: every node drain would block"),
        (
            ["--set", "inference.pdb.minAvailable=2"],
            "inference.pdb.minAvailable (2) leaves no pod to evict with 2 replicas",
        ),
        (
            ["--set", "inference.autoscaling.enabled=false,inference.replicas=3,inference.pdb.minAvailable=100%"],
            "inference.pdb.minAvailable (100%) leaves no pod to evict",
        ),
    ],
)
def test_broken_invariants_fail_at_render_time(args, message):
    for version in HELMS:
        done = helm(version, "template", RELEASE, str(CHART), *args, check=False)
        assert done.returncode != 0 and message in done.stderr, (version, args, done.stderr)


def test_the_defaults_sit_inside_the_invariants():
    # The boundaries themselves render: grace equal to the deadline, a budget leaving one pod to evict.
    helm("helm3", "template", RELEASE, str(CHART), "--set", "inference.pdb.minAvailable=1")
    helm("helm3", "template", RELEASE, str(CHART), "--set", "gateway.deadlineSeconds=30")
    helm("helm3", "template", RELEASE, str(CHART), "--set", "inference.maxConnectionAgeGraceSeconds=30")


def test_one_value_sets_the_longest_deadline_and_the_connection_age_grace():
    """gateway.maxDeadlineSeconds reaches the gateway and the replicas; the replicas' grace follows it."""
    longer = (
        "gateway.maxDeadlineSeconds=120,gateway.graceSeconds=120,gateway.terminationGracePeriodSeconds=130,"
        "inference.graceSeconds=120,inference.terminationGracePeriodSeconds=130"
    )
    cases = [([], 30, 30), (["--set", longer], 120, 120)]
    cases.append((["--set", longer + ",inference.maxConnectionAgeGraceSeconds=150"], 120, 150))
    for args, deadline, age_grace in cases:
        objects = render(values=args)
        gateway, inference = (container_env(one(objects, "Deployment", part)) for part in PARTS)
        assert float(gateway["INFERENCEHUB_MAX_DEADLINE_SECONDS"]) == deadline
        assert float(inference["INFERENCEHUB_MAX_DEADLINE_SECONDS"]) == deadline
        assert float(inference["INFERENCEHUB_MAX_CONNECTION_AGE_GRACE_SECONDS"]) == age_grace


def container_env(deployment: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_chart_declares_the_kubernetes_versions_it_is_validated_for():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["kubeVersion"] == f">={KUBERNETES[0]}-0"
    done = helm("helm3", "template", RELEASE, str(CHART), "--kube-version", "1.28.0", check=False)
    assert done.returncode != 0 and "kubeVersion" in done.stderr


def test_production_defaults(rendered):
    objects = rendered["defaults"]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    gateway = one(objects, "Deployment", "gateway")
    assert gateway["spec"]["replicas"] == 2
    assert one(objects, "PodDisruptionBudget", "gateway")["spec"]["maxUnavailable"] == 1
    for component in PARTS:
        deployment = one(objects, "Deployment", component)
        template = deployment["spec"]["template"]
        # Pod template labels do not change with the chart or app version: a chart bump restarts nothing.
        assert set(template["metadata"]["labels"]) <= {
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
            "app.kubernetes.io/component",
            f"{RELEASE}-inference-client",
        }
        spread = template["spec"]["topologySpreadConstraints"]
        assert {c["topologyKey"] for c in spread} == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
        for constraint in spread:
            assert constraint["whenUnsatisfiable"] == "ScheduleAnyway"
            assert constraint["labelSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
        container = template["spec"]["containers"][0]
        live, ready = container["livenessProbe"], container["readinessProbe"]
        # Liveness survives saturation: a longer timeout than readiness, and half a minute before a restart.
        assert live["timeoutSeconds"] >= 5 > ready["timeoutSeconds"]
        assert live["periodSeconds"] * live["failureThreshold"] >= 30
    # The gateway's memory holds a maximal body several times over (decoded JSON and the gRPC copy).
    env = {e["name"]: e.get("value") for e in gateway["spec"]["template"]["spec"]["containers"][0]["env"]}
    body = int(env["INFERENCEHUB_MAX_BODY_BYTES"])
    assert body == values["gateway"]["maxBodyBytes"]
    limit = gateway["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
    units = {"Mi": 2**20, "Gi": 2**30}
    assert int(limit[:-2]) * units[limit[-2:]] >= 8 * body
    # Decoding is bounded well inside the memory limit, and still takes a maximal body.
    decoding = int(env["INFERENCEHUB_MAX_DECODING_BYTES"])
    assert body <= decoding and 8 * decoding <= int(limit[:-2]) * units[limit[-2:]]
    # The longest deadline fits inside both components' grace, and inside the replicas' connection-age grace:
    # neither a rollout nor connection ageing cuts a call inside its deadline.
    deadline = float(env["INFERENCEHUB_DEADLINE_SECONDS"])
    longest = float(env["INFERENCEHUB_MAX_DEADLINE_SECONDS"])
    assert deadline <= longest
    for component in PARTS:
        assert longest <= float(container_env(one(objects, "Deployment", component))["INFERENCEHUB_GRACE_SECONDS"])
    replica_env = container_env(one(objects, "Deployment", "inference"))
    assert float(replica_env["INFERENCEHUB_MAX_DEADLINE_SECONDS"]) == longest
    assert float(replica_env["INFERENCEHUB_MAX_CONNECTION_AGE_GRACE_SECONDS"]) >= longest


# --- pod identities, and who the gateway's NetworkPolicy lets in --------------------------------------------


def pod_specs(objects: list[dict]) -> dict[str, dict]:
    """Every pod the chart makes, by name: the Deployments' and StatefulSets' templates, and the helm test Pods."""
    specs = {o["metadata"]["name"]: o["spec"]["template"]["spec"] for o in by_kind(objects, "Deployment")}
    specs |= {o["metadata"]["name"]: o["spec"]["template"]["spec"] for o in by_kind(objects, "StatefulSet")}
    specs |= {o["metadata"]["name"]: o["spec"] for o in by_kind(objects, "Pod")}
    return specs


IDS = ("runAsUser", "runAsGroup", "fsGroup")


def test_pods_run_as_the_images_user_by_default(rendered):
    specs = pod_specs(rendered["defaults"])
    # The gateway, the replicas, the job queue's NATS and the helm test pods.
    assert {f"{RELEASE}-gateway", f"{RELEASE}-inference", f"{RELEASE}-nats", f"{RELEASE}-test-gateway"} <= set(specs)
    for name, spec in specs.items():
        assert {k: spec["securityContext"][k] for k in IDS} == dict.fromkeys(IDS, 10001), name
        assert spec["securityContext"]["runAsNonRoot"] is True


def test_pods_can_leave_their_ids_to_the_platform(rendered):
    """OpenShift's restricted SCC rejects pods naming a uid outside the namespace's range: name none."""
    specs = pod_specs(rendered["platform-ids"])
    assert len(specs) >= 4
    for name, spec in specs.items():
        context = spec["securityContext"]
        assert context["runAsNonRoot"] is True and context["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert not set(IDS) & set(context), (name, context)
        for container in spec["containers"]:
            security = container["securityContext"]
            assert security["runAsNonRoot"] is True and not set(IDS) & set(security), (name, security)
            assert security["allowPrivilegeEscalation"] is False and security["capabilities"]["drop"] == ["ALL"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--set", "securityContext.runAsUser=null"], {"runAsGroup": 10001, "fsGroup": 10001}),
        (["--set", "securityContext.runAsGroup=null"], {"runAsUser": 10001}),
        (["--set", "securityContext.runAsUser=1000650000,securityContext.runAsGroup=0"], None),  # gid 0: refused
        (["--set", "securityContext.runAsUser=1000650000"], {"runAsUser": 1000650000, "runAsGroup": 10001}),
    ],
)
def test_each_id_can_be_set_or_left_out(args, expected):
    done = helm("helm3", "template", RELEASE, str(CHART), *args, check=False)
    if expected is None:
        assert done.returncode != 0 and "runAsGroup" in done.stderr, done.stderr
        return
    assert done.returncode == 0, done.stderr
    objects = [o for o in yaml.safe_load_all(done.stdout) if o]
    for name, spec in pod_specs(objects).items():
        ids = {k: spec["securityContext"][k] for k in IDS if k in spec["securityContext"]}
        assert ids == {**expected, **({"fsGroup": expected["runAsGroup"]} if "runAsGroup" in expected else {})}, name


def _matches(selector: dict | None, labels: dict) -> bool:
    return selector is not None and selector.get("matchLabels", {}).items() <= labels.items()


def admits(policy: dict, pod: dict, namespace: dict, port: str = "http") -> bool:
    """NetworkPolicy ingress semantics (matchLabels peers): may a pod with these labels, in a namespace with these
    labels, reach ``port`` of the pods the policy selects (in the release's namespace)?"""
    home = namespace.get("kubernetes.io/metadata.name") == NAMESPACE
    for rule in policy["spec"]["ingress"]:
        if port not in [p["port"] for p in rule.get("ports", [{"port": port}])]:
            continue
        if "from" not in rule:
            return True
        for peer in rule["from"]:
            pods, namespaces = peer.get("podSelector"), peer.get("namespaceSelector")
            if namespaces is None and _matches(pods, pod) and home:
                return True
            if namespaces is not None and _matches(namespaces, namespace) and (pods is None or _matches(pods, pod)):
                return True
    return False


MONITORING = {"kubernetes.io/metadata.name": "monitoring"}
INGRESS = {"kubernetes.io/metadata.name": "ingress-nginx", "ingress": "true"}
HOME = {"kubernetes.io/metadata.name": NAMESPACE}
PROMETHEUS = {"app.kubernetes.io/name": "prometheus", "prometheus": "kube-prometheus"}
RESTRICTED = [
    "--set",
    "networkPolicy.enabled=true",
    "--set-json",
    'networkPolicy.gateway.from=[{"namespaceSelector": {"matchLabels": {"ingress": "true"}}}]',
]


def gateway_policy(objects: list[dict]) -> dict:
    return one(objects, "NetworkPolicy", "gateway")


def test_a_restricted_gateway_still_admits_prometheus_and_the_charts_helm_test(rendered):
    objects = render("helm3", RESTRICTED)
    policy = gateway_policy(objects)
    test_pod = next(p for p in by_kind(objects, "Pod") if p["metadata"]["name"] == f"{RELEASE}-test-gateway")
    assert admits(policy, {"app": "ingress-nginx"}, INGRESS)  # the peers the user named
    assert admits(policy, test_pod["metadata"]["labels"], HOME)  # helm test's request to the gateway
    assert admits(policy, PROMETHEUS, MONITORING)  # the scrape of /metrics (on the HTTP port)
    # Nobody else: another pod of the namespace, a pod in another namespace, a "test" pod of another release.
    assert not admits(policy, {"app": "something"}, HOME)
    assert not admits(policy, {"app": "something"}, MONITORING)
    other_release = {**test_pod["metadata"]["labels"], "app.kubernetes.io/instance": "other"}
    assert not admits(policy, other_release, HOME)
    assert not admits(policy, test_pod["metadata"]["labels"], MONITORING)  # the label counts in this namespace only
    # The job queue and the replicas never call the gateway; the rules stay on its one port.
    assert not admits(policy, PROMETHEUS, MONITORING, port="grpc")
    # The same rules in the platform-ids set (what users of the restricted SCC render).
    assert gateway_policy(rendered["platform-ids"])["spec"] == policy["spec"]


def test_the_scrape_peers_are_configurable():
    narrowed = [
        *RESTRICTED,
        "--set-json",
        'networkPolicy.gateway.metricsFrom=[{"namespaceSelector": {"matchLabels": '
        '{"kubernetes.io/metadata.name": "monitoring"}}, "podSelector": {"matchLabels": {"prometheus": "main"}}}]',
    ]
    policy = gateway_policy(render("helm3", narrowed))
    assert admits(policy, {"prometheus": "main"}, MONITORING)
    assert not admits(policy, {"prometheus": "main"}, {"kubernetes.io/metadata.name": "elsewhere"})
    assert not admits(policy, PROMETHEUS, {"kubernetes.io/metadata.name": "elsewhere"})
    # [] : no scrape rule (the helm test rule stays).
    policy = gateway_policy(render("helm3", [*RESTRICTED, "--set-json", "networkPolicy.gateway.metricsFrom=[]"]))
    assert not admits(policy, PROMETHEUS, MONITORING)
    assert len(policy["spec"]["ingress"]) == 2


def test_an_unrestricted_gateway_has_one_open_rule(rendered):
    policy = gateway_policy(rendered["networkpolicy"])
    assert policy["spec"]["ingress"] == [{"ports": [{"port": "http", "protocol": "TCP"}]}]
    assert admits(policy, {"anything": "x"}, {"kubernetes.io/metadata.name": "anywhere"})


# --- where models come from, and model control -----------------------------------------------------------


def inference_pod(objects: list[dict]) -> dict:
    return one(objects, "Deployment", "inference")["spec"]["template"]["spec"]


def test_models_come_from_the_image_by_default_with_every_model_loaded(rendered):
    deployment = one(rendered["defaults"], "Deployment", "inference")
    env = container_env(deployment)
    assert "INFERENCEHUB_MODELS" not in env and "INFERENCEHUB_LOAD" not in env
    assert env["INFERENCEHUB_MODEL_CONTROL_MODE"] == "none"
    pod = inference_pod(rendered["defaults"])
    assert "initContainers" not in pod and all(v["name"] != "models" for v in pod["volumes"])


def test_models_from_a_volume_claim_are_mounted_read_only_and_loaded_explicitly(rendered):
    objects = rendered["pvc-models"]
    pod = inference_pod(objects)
    (volume,) = [v for v in pod["volumes"] if v["name"] == "models"]
    assert volume["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "models"]
    assert mount == {"name": "models", "mountPath": "/models", "readOnly": True, "subPath": "v1"}
    env = container_env(one(objects, "Deployment", "inference"))
    assert env["INFERENCEHUB_MODELS"] == "/models"
    assert env["INFERENCEHUB_MODEL_CONTROL_MODE"] == "explicit" and env["INFERENCEHUB_LOAD"] == "iris,digits"


def test_models_from_an_image_are_copied_by_an_init_container(rendered):
    objects = rendered["image-models"]
    pod = inference_pod(objects)
    (init,) = pod["initContainers"]
    assert init["image"] == "registry.example.com/models:2024.1"
    # The image's repository is copied into the emptyDir, mounted elsewhere than the image's own /models.
    assert init["command"] == ["cp", "-R", "/models/.", "/repository/"]
    assert init["volumeMounts"] == [{"name": "models", "mountPath": "/repository"}]
    assert init["securityContext"]["runAsNonRoot"] and init["securityContext"]["readOnlyRootFilesystem"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "models"]
    assert volume == {"name": "models", "emptyDir": {}}
    env = container_env(one(objects, "Deployment", "inference"))
    assert env["INFERENCEHUB_MODELS"] == "/models" and env["INFERENCEHUB_MODEL_CONTROL_MODE"] == "poll"
    assert env["INFERENCEHUB_REPOSITORY_POLL_SECONDS"] == "10"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            ["--set", "inference.models.image.repository=x,inference.models.persistentVolumeClaim.claimName=y"],
            "choose one source of models",
        ),
        (["--set", "inference.modelControl.load={iris}"], "modelControl.load names models to load at start"),
        (["--set", "inference.modelControl.mode=sometimes"], "mode"),
    ],
)
def test_contradictory_model_values_are_refused(values, message):
    done = helm("helm3", "template", RELEASE, str(CHART), *values, check=False)
    assert done.returncode != 0 and message in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("values", "workers"),
    [
        ([], "1"),  # the default CPU limit, "1"
        (["--set", "gateway.resources.limits.cpu=1500m"], "2"),
        (["--set", "gateway.resources.limits.cpu=2.5"], "3"),
        (["--set", "gateway.resources.limits.cpu=4", "--set", "gateway.workers=2"], "2"),  # the value wins
        (["--set", "gateway.resources.limits=null"], "1"),
    ],
)
def test_gateway_workers_follow_the_cpu_limit_unless_given(values: list[str], workers: str) -> None:
    deployment = one(render("helm3", values), "Deployment", "gateway")
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["INFERENCEHUB_GATEWAY_WORKERS"] == workers
