"""The live page at /ui, in a real headless Chromium (Debian's, driven by playwright): it loads, its numbers are
the status endpoint's and the metrics', and a replica killed during the test shows as down."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from conftest import SHIPPED, Gateway, NatsServer, Replica, model_repository, wait_for

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
IRIS_ROW = {"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}


@pytest.fixture
def system(tmp_path) -> Iterator[tuple[list[Replica], Gateway]]:
    # iris only: no model runs in worker processes, so killing a replica leaves no orphan behind.
    models = str(model_repository(tmp_path / "models", SHIPPED / "iris"))
    replicas: list[Replica] = []
    gateway = None
    nats = NatsServer(tmp_path / "nats")  # the job queue, so the page's recent jobs show
    try:
        for name in ("page-a", "page-b"):
            replicas.append(
                Replica("--models", models, "--replica-name", name, "--drain-seconds", "0", "--nats", nats.url)
            )
        for r in replicas:
            r.wait_serving()
        gateway = Gateway(
            f"ipv4:{replicas[0].target},{replicas[1].target}",
            "--deadline-seconds",
            "5",
            "--drain-seconds",
            "0",
            "--nats",
            nats.url,
        )
        yield replicas, gateway
    finally:
        if gateway is not None:
            gateway.stop()
        for r in replicas:
            r.stop()
        nats.stop()


@pytest.fixture
def page(tmp_path) -> Iterator:
    assert Path(CHROMIUM).exists(), "run `make tools` (it installs Debian's chromium)"
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=FLAGS
        )
        try:
            yield context.new_page()
        finally:
            context.close()


def upstream_counts(gateway: Gateway) -> dict[str, int]:
    """ModelInfer calls per replica, from the gateway's Prometheus metrics."""
    text = gateway.request("GET", "/metrics").body.decode()
    pattern = r'inferencehub_gateway_upstream_requests_total\{code="OK",method="ModelInfer",replica="([^"]+)"\} (\S+)'
    return {name: int(float(value)) for name, value in re.findall(pattern, text)}


def both_replicas_answer(gateway: Gateway) -> bool:
    """True once the gateway's channel has sent calls to both replicas (so round robin spreads what follows)."""
    gateway.request("GET", "/v2/health/live")  # not an inference request: not in the live page's numbers
    text = gateway.request("GET", "/metrics").body.decode()
    return all(f'method="ServerLive",replica="{name}"' in text for name in ("page-a", "page-b"))


def row(page, replica: str, field: str) -> str:
    return page.locator(f'#replicas tr[data-replica="{replica}"] [data-field="{field}"]').inner_text()


def test_the_live_page_shows_the_status_and_a_replica_going_down(system, page, tmp_path):
    replicas, gateway = system
    # Before any traffic: both replicas, healthy, and nothing counted.
    status = gateway.request("GET", "/status.json").json()
    assert status["requests"] == {
        "count": 0,
        "errors": 0,
        "per_second": 0.0,
        "latency_ms": {"p50": None, "p90": None, "p99": None},
    }
    assert sorted(r["name"] for r in status["replicas"]) == ["page-a", "page-b"]
    assert {r["health"] for r in status["replicas"]} == {"SERVING"}
    assert status["jobs"] == [] and status["gateway"]["ready"] is True

    wait_for(lambda: both_replicas_answer(gateway), timeout=10, what="both replicas in the gateway's rotation")
    for _ in range(20):
        assert gateway.request("POST", "/v2/models/iris/infer", {"inputs": [IRIS_ROW]}).status == 200
    assert gateway.request("POST", "/v2/models/iris/infer", {"inputs": [{**IRIS_ROW, "shape": [1, 3]}]}).status == 400

    page.goto(f"http://{gateway.url}/ui")
    page.wait_for_function("document.querySelectorAll('#replicas tr[data-health=SERVING]').length === 2")
    status = gateway.request("GET", "/status.json").json()
    metrics = upstream_counts(gateway)
    assert metrics.keys() == {"page-a", "page-b"} and sum(metrics.values()) == 20

    # The page's numbers are the status endpoint's; the status endpoint's are the metrics'.
    assert page.locator("#requests").inner_text() == str(status["requests"]["count"]) == "21"
    assert page.locator("#errors").inner_text() == str(status["requests"]["errors"]) == "1"
    for q in ("p50", "p90", "p99"):
        assert status["requests"]["latency_ms"][q] > 0
        assert page.locator(f"#{q}").inner_text() == f"{status['requests']['latency_ms'][q]:.2f}"
    for entry in status["replicas"]:
        name = entry["name"]
        assert entry["requests"] == metrics[name]
        assert row(page, name, "requests") == str(metrics[name])
        assert row(page, name, "share") == f"{100 * metrics[name] / 20:.1f}%"
        assert row(page, name, "health") == "SERVING"
        assert row(page, name, "queue") == "0"
        for q in ("p50", "p99"):
            assert entry["latency_ms"][q] > 0
            assert row(page, name, q) == f"{entry['latency_ms'][q]:.2f}"
        assert row(page, name, "address") == entry["address"]
    assert page.locator("#jobs").inner_text() == "No async jobs."
    page.screenshot(path=str(tmp_path / "ui.png"), full_page=True)

    # Kill one replica: within a few polls the page shows it down; the other still serving.
    replicas[1].kill()
    page.wait_for_function(
        "document.querySelector('#replicas tr[data-replica=\"page-b\"]')?.dataset.health === 'UNREACHABLE'",
        timeout=15_000,
    )
    assert row(page, "page-b", "health") == "UNREACHABLE"
    assert row(page, "page-a", "health") == "SERVING"
    for _ in range(4):
        assert gateway.request("POST", "/v2/models/iris/infer", {"inputs": [IRIS_ROW]}).status == 200
    wait_for(lambda: row(page, "page-a", "requests") == str(metrics["page-a"] + 4), timeout=10, what="new requests")

    # An async job: the page lists it, with its state, among the recent jobs.
    submitted = gateway.request("POST", "/v2/models/iris/infer", {"inputs": [IRIS_ROW]}, {"Prefer": "respond-async"})
    assert submitted.status == 202, submitted
    job_id = submitted.json()["id"]

    def listed():
        jobs = gateway.request("GET", "/status.json").json()["jobs"]
        return jobs and jobs[0]["id"] == job_id and jobs[0]["status"] == "succeeded"

    wait_for(listed, timeout=15, what=f"job {job_id} to succeed on the status endpoint")
    page.wait_for_function(
        f"document.querySelector('#jobs').innerText.includes('{job_id[:12]}  iris  succeeded')", timeout=15_000
    )
