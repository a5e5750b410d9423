"""`inferencehub up`, `infer` and `bench` as a user runs them: real subprocesses on loopback."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import (
    CLI,
    SHIPPED,
    Gateway,
    Replica,
    Up,
    alive,
    build_example_models,
    children_of,
    model_repository,
    wait_for,
)


def nats_answer(url: str) -> bytes:
    """What a NATS server answers a client that connects without credentials and pings."""
    host, port = url.removeprefix("nats://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        reader = conn.makefile("rb")
        assert json.loads(reader.readline().split(b" ", 1)[1])["auth_required"] is True
        conn.sendall(b'CONNECT {"verbose": false}\r\nPING\r\n')
        return reader.read()  # the server closes the connection


def test_up_runs_the_system_and_stops_cleanly():
    up = Up("--replicas", "3", "--port", "0", "--inference-port", "0", "--inference-metrics-port", "0")
    try:
        address = up.wait_up()
        children = children_of(up.proc.pid)
        assert len(children) == 5  # a gateway, three replicas and the job queue (NATS)
        banner = up.log
        for expected in ("inference-1", "inference-3", "127.0.0.2", "127.0.0.4", "curl", "grpcurl", "/metrics"):
            assert expected in banner

        gateway = Gateway.__new__(Gateway)  # talk to up's gateway with the shared helper
        gateway.port, gateway.proc = int(address.split(":")[1]), up.proc
        body = {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]}
        served = {
            gateway.request("POST", "/v2/models/iris/infer", body).headers["x-inferencehub-replica"] for _ in range(30)
        }
        assert served == {"inference-1", "inference-2", "inference-3"}
        assert any(line.startswith("inference-2 ") and "ready" in line for line in up.lines)  # prefixed logs
        assert any(line.startswith("nats ") and "Server is ready" in line for line in up.lines)
        assert "job queue" in banner and "--async" in banner

        # Async inference through up's embedded NATS, with the CLI.
        url = f"http://{address}"
        done = cli("infer", "iris", "--async", "--data", "[[6.3, 3.3, 6.0, 2.5]]", "--url", url)
        assert done.returncode == 0, done.stderr
        assert "label int64 [1]" in done.stdout and "[2]" in done.stdout
        job_id = re.search(r"job ([0-9a-f]{32}) submitted", done.stderr).group(1)
        assert "succeeded" in done.stderr  # progress while polling
        shown = cli("jobs", "get", job_id, "--url", url)
        assert shown.returncode == 0 and json.loads(shown.stdout)["status"] == "succeeded"
        assert json.loads(shown.stdout)["result"]["outputs"][1]["data"] == [2]
        finished = cli("jobs", "cancel", job_id, "--url", url)
        assert finished.returncode == 1 and "409" in finished.stderr and "already succeeded" in finished.stderr
        unknown = cli("jobs", "get", "0" * 32, "--url", url)
        assert unknown.returncode == 1 and "404" in unknown.stderr and "Traceback" not in unknown.stderr
        # The embedded NATS takes only the user made at start (its password reached the children by env).
        assert nats_answer(up.addresses["nats"]).startswith(b"-ERR 'Authorization Violation'")

        assert up.terminate(60) == 0  # SIGTERM; the log is read to its end
        assert not [pid for pid in children if alive(pid)]
        log = up.log
        # NATS stops last: after every replica has stopped.
        assert log.rindex("replica inference-3 stopped") < log.rindex("nats ") < log.index("all stopped")
    finally:
        up.stop()


def test_up_reports_a_taken_port_and_leaves_nothing_running():
    with socket.socket() as taken:
        taken.bind(("127.0.0.3", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # inference-2 gets 127.0.0.3:port, which is taken; inference-1 gets 127.0.0.2:port, which is free.
        done = subprocess.run(
            [
                *CLI,
                "up",
                "--replicas",
                "2",
                "--port",
                "0",
                "--inference-port",
                str(port),
                "--inference-metrics-port",
                "0",
            ],
            capture_output=True,
            text=True,
            timeout=90,
        )
    assert done.returncode == 2
    assert "inference-2 exited at start" in done.stderr
    assert f"cannot listen for gRPC on 127.0.0.3:{port}" in done.stderr
    assert "all stopped" in done.stderr
    with socket.socket() as probe:  # inference-1 is gone: its address is free again
        probe.bind(("127.0.0.2", port))


def test_up_reports_a_taken_gateway_port():
    """The gateway dies at start: up says so at once (not after a start timeout) and stops the rest."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [
                *CLI,
                "up",
                "--replicas",
                "1",
                "--port",
                str(port),
                "--inference-port",
                "0",
                "--inference-metrics-port",
                "0",
            ],
            capture_output=True,
            text=True,
            timeout=90,
        )
    assert done.returncode == 2
    error = done.stderr.rsplit("inferencehub up: error: ", 1)[1]
    assert error.startswith("gateway exited at start (code 2); the end of its log:"), error
    assert f"cannot listen for HTTP on 127.0.0.1:{port}" in error  # the gateway's own words, in up's error
    assert "all stopped" in done.stderr and "Traceback" not in done.stderr


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    repo = model_repository(tmp_path_factory.mktemp("models"), *sorted(SHIPPED.iterdir()))
    replica = Replica("--models", str(repo), "--replica-name", "solo").wait_serving()
    gateway = Gateway(f"ipv4:{replica.target}")
    yield replica, gateway
    gateway.stop()
    replica.stop()


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def test_infer_through_the_gateway_and_direct(system, tmp_path):
    replica, gateway = system
    via_http = cli(
        "infer", "iris", "--data", "[[5.1, 3.5, 1.4, 0.2], [6.3, 3.3, 6.0, 2.5]]", "--url", f"http://{gateway.url}"
    )
    assert via_http.returncode == 0, via_http.stderr
    assert "served by solo" in via_http.stdout and "label int64 [2]" in via_http.stdout
    assert "[0 2]" in via_http.stdout

    features = tmp_path / "features.npy"
    np.save(features, np.array([[6.3, 3.3, 6.0, 2.5]], np.float32))
    via_grpc = cli("infer", "iris", "--input", f"features={features}", "--grpc", replica.target)
    assert via_grpc.returncode == 0, via_grpc.stderr
    assert "[2]" in via_grpc.stdout and "probabilities float32 [1, 3]" in via_grpc.stdout


def test_infer_errors_are_clear(system):
    _, gateway = system
    url = f"http://{gateway.url}"
    wrong = cli("infer", "iris", "--data", "[[1, 2, 3]]", "--url", url)
    # Checked before sending, against the model's metadata, in the replica's words: a usage error (exit 2).
    assert wrong.returncode == 2 and "input 'features': shape [1, 3], expected [-1, 4]" in wrong.stderr, wrong.stderr
    missing = cli("infer", "nope", "--data", "[1]", "--url", url)
    assert missing.returncode == 2 and "404" in missing.stderr
    not_json = cli("infer", "iris", "--data", "[[1, 2", "--url", url)
    assert not_json.returncode == 2 and "not JSON" in not_json.stderr
    unknown = cli("infer", "iris", "--input", "petals=[1]", "--url", url)
    assert unknown.returncode == 2 and "petals" in unknown.stderr
    closed = cli("infer", "iris", "--data", "[[1, 2, 3, 4]]", "--url", "http://127.0.0.1:1")
    assert closed.returncode == 2 and "cannot reach the gateway at http://127.0.0.1:1" in closed.stderr
    closed_bench = cli("bench", "--url", "http://127.0.0.1:1", "--duration", "1")
    assert closed_bench.returncode == 2 and "cannot reach the gateway" in closed_bench.stderr
    for stream in (wrong.stderr, missing.stderr, not_json.stderr, unknown.stderr, closed.stderr, closed_bench.stderr):
        assert "Traceback" not in stream


def test_bench_summary_adds_up(system):
    _, gateway = system
    done = cli(
        "bench", "--url", f"http://{gateway.url}", "--model", "mock", "--concurrency", "4", "--duration", "2", "--json"
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["requests"] == summary["ok"] + sum(summary["errors"].values())
    assert summary["ok"] > 20 and not summary["errors"]
    assert summary["replicas"] == {"solo": {"requests": summary["ok"], "share": 1.0}}
    lat = summary["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert abs(summary["throughput_rps"] - summary["ok"] / summary["duration_s"]) < 0.01 * summary["throughput_rps"] + 1
    assert "requests," in done.stderr  # the live progress line

    rate = cli(
        "bench", "--url", f"http://{gateway.url}", "--model", "iris", "--rate", "50", "--duration", "2", "--batch", "4"
    )
    assert rate.returncode == 0, rate.stderr
    assert "rate 50.0/s" in rate.stdout and re.search(r"requests\s+(9\d|10\d)\s", rate.stdout), rate.stdout


def test_bench_counts_errors_by_status_when_a_replica_stops(tmp_path):
    repo = model_repository(tmp_path, SHIPPED / "mock")
    replica = Replica("--models", str(repo), "--drain-seconds", "0").wait_serving()
    try:
        bench = subprocess.Popen(
            [
                *CLI,
                "bench",
                "--grpc",
                replica.target,
                "--model",
                "mock",
                "--concurrency",
                "4",
                "--duration",
                "3",
                "--json",
                "--timeout",
                "2",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # Kill the replica once it has answered some of the bench's calls (not after a fixed time: a loaded
        # machine may take seconds to start the bench).
        metrics = f"http://127.0.0.1:{replica.metrics_port}/metrics"
        wait_for(lambda: _answered(metrics) >= 4, timeout=60, what="the bench's first answered calls")
        replica.proc.send_signal(signal.SIGKILL)
        out, err = bench.communicate(timeout=60)
        assert bench.returncode == 0, err
        summary = json.loads(out)
        assert summary["ok"] > 0
        assert summary["errors"].get("UNAVAILABLE", 0) > 0, summary
        assert summary["requests"] == summary["ok"] + sum(summary["errors"].values())
    finally:
        replica.kill()


def _answered(metrics_url: str) -> float:
    """Calls the replica answered OK so far, from its Prometheus metrics."""
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("inferencehub_inference_requests_total{") and 'code="OK"' in line
    )


def test_readme_quick_start_is_two_commands_that_exist():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    first_block = re.search(r"```sh\n(.*?)```", readme, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]
    assert commands == ["make run", "make test"]
    makefile = (Path(__file__).resolve().parents[2] / "Makefile").read_text()
    assert re.search(r"^run:", makefile, re.M) and re.search(r"^test:", makefile, re.M)


@pytest.mark.timeout(300)  # builds the example models, starts `up` with every model, runs a dozen commands
def test_readme_commands_work_as_written(tmp_path):
    """Every shell command in the README after the quick start and in the docs pages that tell a newcomer what to
    run locally, run against a live `up` (addresses substituted); the cluster pages' make targets exist."""
    from inferencehub.cli import build_parser

    root = Path(__file__).resolve().parents[2]
    built = build_example_models(tmp_path / "built")  # what `make run` serves: the shipped and the built models
    repo = model_repository(
        tmp_path / "repo",
        *sorted(SHIPPED.iterdir()),
        built / "iris-onnx",
        built / "iris-sklearn",
        root / "examples" / "models" / "word-count",
    )
    up = Up(
        "--replicas",
        "2",
        "--port",
        "0",
        "--inference-port",
        "0",
        "--inference-metrics-port",
        "0",
        "--models",
        str(repo),
    )
    try:
        gateway = up.wait_up()
        banner = up.log
        first = re.search(r"inference-1\s+([\d.:]+)\s+\(gRPC; metrics http://([\d.:]+)/metrics\)", banner)
        substitutions = {
            "127.0.0.1:8080": gateway,
            "127.0.0.2:8081": first.group(1),
            "127.0.0.2:8082": first.group(2),
            ".venv/bin/": str(Path(sys.executable).parent) + "/",
            "--duration 10": "--duration 1",
        }
        docs = root / "docs"
        local = (root / "README.md").read_text().split("## Quick start", 1)[1] + "".join(
            (docs / page).read_text() for page in ("getting-started.md", "models.md", "jobs.md")
        )
        cluster = (docs / "kubernetes.md").read_text() + (docs / "containers.md").read_text()
        makefile = (root / "Makefile").read_text()
        for target in re.findall(r"^make ([\w-]+)", cluster, re.M):  # cluster commands: the targets exist
            assert re.search(rf"^([\w-]+ )*{target}( [\w-]+)*:", makefile, re.M), target
        blocks = re.findall(r"```sh\n(.*?)```", local, re.S)
        # Each command once (the README's quick start repeats getting-started's).
        commands = list(dict.fromkeys(line.strip() for block in blocks for line in block.splitlines() if line.strip()))
        for target in [c.split()[1] for c in commands if c.startswith("make ")]:  # `make run`: the target exists
            assert re.search(rf"^([\w-]+ )*{target}( [\w-]+)*:", makefile, re.M), target
        commands = [c for c in commands if not c.startswith("make ")]
        assert len(commands) >= 10
        env = {**os.environ, "INFERENCEHUB_URL": f"http://{gateway}"}
        ran = 0
        for command in commands:
            if re.match(r"(\.venv/bin/)?inferencehub up\b", command):  # long-running: check it parses
                import shlex

                build_parser().parse_args(shlex.split(command)[1:])
                continue
            for old, new in substitutions.items():
                command = command.replace(old, new)
            done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60, env=env)
            assert done.returncode == 0 and done.stdout, f"{command}\n{done.stdout}\n{done.stderr}"
            assert '"error"' not in done.stdout, command
            ran += 1
        assert ran >= 10
    finally:
        up.proc.send_signal(signal.SIGTERM)
        up.proc.wait(60)
        up.stop()
