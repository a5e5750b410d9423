"""The Grafana dashboard shipped with the chart: rendered only when asked for, labelled for Grafana's sidecar,
every PromQL expression parsed by a real PromQL parser, and every metric it names present in a real scrape of
the running gateway and replica (or listed below as kube-state-metrics')."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request

import promql_parser
import pytest
import yaml

from conftest import ROOT

CHART = ROOT / "charts" / "inferencehub"
HELM = ROOT / ".cache" / "tools" / "helm-3" / "helm"
DASHBOARD = CHART / "files" / "grafana-dashboard.json"
# The only names not exported by InferenceHub itself: kube-state-metrics', used "where present".
KUBE_STATE_METRICS = {
    "kube_deployment_status_replicas_available",
    "kube_horizontalpodautoscaler_status_desired_replicas",
}
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$namespace": "demo"}
DIGITS_ROW = {"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}


def render(*args: str) -> list[dict]:
    assert HELM.exists(), "run `make tools`"
    out = subprocess.run(
        [str(HELM), "template", "inferencehub", str(CHART), "--namespace", "demo", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def expressions(dashboard: dict) -> list[str]:
    found = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.+), *\w+\)", variable["query"]["query"])
            assert match, variable
            found.append(match.group(1))
    return found


def metric_names(expression: str) -> set[str]:
    for variable, value in GRAFANA_VARIABLES.items():
        expression = expression.replace(variable, value)
    names: set[str] = set()

    def visit(node) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            names.add(node.name)
        return True

    promql_parser.walk(promql_parser.parse(expression), pre_visit=visit)
    return names


def scraped(url: str) -> set[str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {re.split(r"[{ ]", line, maxsplit=1)[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_the_dashboard_configmap_is_off_by_default_and_labelled_for_the_sidecar():
    assert not [o for o in render() if o["metadata"]["name"].endswith("-dashboard")]
    rendered = render("--set", "dashboard.enabled=true")
    (configmap,) = [o for o in rendered if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-dashboard")]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["namespace"] == "demo"
    assert json.loads(configmap["data"]["inferencehub.json"]) == json.loads(DASHBOARD.read_text())
    moved = render(
        "--set", "dashboard.enabled=true", "--set", "dashboard.namespace=monitoring", "--set", "dashboard.folder=ML"
    )
    (moved,) = [o for o in moved if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-dashboard")]
    assert moved["metadata"]["namespace"] == "monitoring"
    assert moved["metadata"]["annotations"] == {"grafana_folder": "ML"}


def test_the_dashboard_has_the_panels_the_issue_asks_for():
    dashboard = json.loads(DASHBOARD.read_text())
    titles = [p["title"] for p in dashboard["panels"]]
    assert titles == [
        "Request rate",
        "Error rate",
        "Latency p50 / p99 by hop",
        "Share of traffic per replica",
        "Queue depth",
        "Batch size",
        "Replicas over time",
        "Streams: time to first token and per output token",
        "Streams: open and tokens per second",
    ]
    assert len({p["id"] for p in dashboard["panels"]}) == len(titles)
    for panel in dashboard["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in panel["targets"]]
        assert len(set(refs)) == len(refs) and refs, panel["title"]


def test_a_broken_expression_is_caught_by_the_parser():
    with pytest.raises(ValueError):
        metric_names("sum(rate(inferencehub_gateway_requests_total[$__rate_interval])")


def test_every_expression_parses_and_names_only_metrics_the_services_export(gateway, replica):
    # Traffic first: labelled series appear in a scrape once they have been used.
    for model, row in (
        ("digits", DIGITS_ROW),
        ("iris", {"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}),
    ):
        assert gateway.request("POST", f"/v2/models/{model}/infer", {"inputs": [row]}).status == 200
    assert gateway.request("POST", "/v2/models/mock-llm/generate", {"text_input": "a b", "max_tokens": 2}).status == 200
    exported = scraped(f"http://{gateway.url}/metrics") | scraped(f"http://127.0.0.1:{replica.metrics_port}/metrics")
    dashboard = json.loads(DASHBOARD.read_text())
    used: set[str] = set()
    for expression in expressions(dashboard):
        names = metric_names(expression)
        assert names, expression
        used |= names
    unknown = used - exported - KUBE_STATE_METRICS
    assert not unknown, f"the dashboard uses metrics no service exports: {sorted(unknown)}"
    assert used >= KUBE_STATE_METRICS  # the list above stays honest
    assert {n for n in used if n.startswith("inferencehub_gateway")} and {
        n for n in used if n.startswith("inferencehub_inference")
    }
