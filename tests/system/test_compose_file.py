"""compose.yaml, checked offline (`make test-containers` runs it): the chart's security settings and wiring, and
the podman arguments the container test's runner derives from it."""

from __future__ import annotations

import itertools
import sys

import pytest
import yaml

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tests" / "containers"))
from compose_podman import Project, seconds

COMPOSE = ROOT / "compose.yaml"
VALUES = yaml.safe_load((ROOT / "charts" / "inferencehub" / "values.yaml").read_text())


def test_every_service_runs_with_the_charts_security_settings():
    spec = yaml.safe_load(COMPOSE.read_text())
    security = VALUES["securityContext"]
    for name, service in spec["services"].items():
        assert service["user"] == f"{security['runAsUser']}:{security['runAsGroup']}", name
        assert service["read_only"] is True and service["tmpfs"] == ["/tmp"], name
        assert service["cap_drop"] == ["ALL"] and "no-new-privileges:true" in service["security_opt"], name
        assert service["healthcheck"]["test"][0] == "CMD", name
        image = "inference" if name == "nats" else name  # the job queue runs from the inference image
        assert service["build"]["dockerfile"] == f"Dockerfile.{image}" and (ROOT / f"Dockerfile.{image}").exists()


def test_the_gateway_reaches_every_replica_by_one_name():
    spec = yaml.safe_load(COMPOSE.read_text())
    inference, gateway = spec["services"]["inference"], spec["services"]["gateway"]
    assert inference["deploy"]["replicas"] >= 2
    port = inference["environment"]["INFERENCEHUB_PORT"]
    assert gateway["environment"]["INFERENCEHUB_UPSTREAM"] == f"dns:///inference:{port}"
    assert port == str(VALUES["inference"]["port"])
    healthy = {"condition": "service_healthy"}
    assert gateway["depends_on"] == {"inference": healthy, "nats": healthy}
    assert inference["depends_on"] == {"nats": healthy}
    nats = spec["services"]["nats"]  # the job queue, as `inferencehub up` runs it
    assert nats["entrypoint"] == ["nats-server"] and "-js" in nats["command"]
    assert nats["command"][nats["command"].index("-p") + 1] == "4222"
    assert inference["environment"]["INFERENCEHUB_NATS_URL"] == gateway["environment"]["INFERENCEHUB_NATS_URL"]
    assert gateway["environment"]["INFERENCEHUB_NATS_URL"] == "nats://nats:4222"
    assert set(gateway["networks"]) == set(inference["networks"]) == set(spec["networks"])
    # Termination fits in the stop grace period, and calls the gateway allows finish during a replica's grace.
    for service in (inference, gateway):
        env = service["environment"]
        assert float(env["INFERENCEHUB_DRAIN_SECONDS"]) + float(env["INFERENCEHUB_GRACE_SECONDS"]) < seconds(
            service["stop_grace_period"]
        )
    assert float(inference["environment"]["INFERENCEHUB_GRACE_SECONDS"]) >= float(
        gateway["environment"]["INFERENCEHUB_DEADLINE_SECONDS"]
    )


def test_the_runner_turns_the_file_into_the_podman_arguments_it_declares():
    project = Project(COMPOSE, name="p", publish_any_port=True)
    args = project.run_args("inference", 2)
    assert args[-1] == "inferencehub-inference:dev"
    pairs = set(itertools.pairwise(args))
    for pair in [
        ("--name", "p_inference_2"),
        ("--network", "p_inferencehub"),
        ("--network-alias", "inference"),
        ("--user", "10001:10001"),
        ("--tmpfs", "/tmp"),
        ("--cap-drop", "ALL"),
        ("--security-opt", "no-new-privileges"),
        ("--stop-timeout", "40"),
    ]:
        assert pair in pairs, pair
    assert "--read-only" in args and "--read-only-tmpfs=false" in args
    gateway = project.run_args("gateway", 1)
    assert gateway[gateway.index("--publish") + 1] == "127.0.0.1::8080"  # any free host port, in tests
    assert Project(COMPOSE).run_args("gateway", 1).count("127.0.0.1:8080:8080") == 1  # as written, for users
    assert project.replicas("inference") == 3


def test_the_runner_refuses_keys_it_does_not_know(tmp_path):
    spec = yaml.safe_load(COMPOSE.read_text())
    spec["services"]["gateway"]["privileged"] = True
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(AssertionError, match="privileged"):
        Project(path)
