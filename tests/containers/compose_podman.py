"""Run compose.yaml with podman: the same containers and network `docker compose up` makes, read from the file.

podman-compose 1.0.3 (Debian's) cannot run this file as written: it orders `depends_on` but ignores its
`condition: service_healthy`, turns an exec-form healthcheck (`[CMD, python, -c, ...]`) into a `/bin/sh -c` string
with broken quoting, ignores the top-level `name:`, and parses `--scale` without acting on it, so it cannot add a
replica to a running service. This small runner reads the file and issues the podman commands itself. It
understands exactly the keys the file uses and refuses any other, so a change to compose.yaml either runs here as
written or fails loudly: the file is what the test runs.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SERVICE_KEYS = {
    "build",
    "image",
    "user",
    "read_only",
    "tmpfs",
    "cap_drop",
    "security_opt",
    "restart",
    "environment",
    "stop_grace_period",
    "deploy",
    "healthcheck",
    "ports",
    "depends_on",
    "networks",
    "entrypoint",
    "command",
}


def seconds(value: str | int | float) -> float:
    """A compose duration ("40s", "1m30s", "500ms") in seconds."""
    if isinstance(value, int | float):
        return float(value)
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"not a compose duration: {value!r}"
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * scale[u] for n, u in parts)


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    done = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


@dataclass
class Project:
    file: Path
    name: str = ""
    publish_any_port: bool = False  # host ports chosen by the kernel (tests run beside other things)
    spec: dict[str, Any] = field(init=False)
    containers: dict[str, list[str]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.spec = yaml.safe_load(self.file.read_text())
        self.name = self.name or self.spec["name"]
        for service, config in self.spec["services"].items():
            unknown = set(config) - SERVICE_KEYS
            assert not unknown, f"{self.file.name}: service {service} uses {sorted(unknown)}, which this runner lacks"
        self.containers = {service: [] for service in self.spec["services"]}

    @property
    def root(self) -> Path:
        return self.file.parent

    def network(self, name: str) -> str:
        return f"{self.name}_{name}"

    # --- images ----------------------------------------------------------------------------------

    def build(self, service: str, extra: tuple[str, ...] = ()) -> float:
        config = self.spec["services"][service]
        build = config["build"]
        assert set(build) <= {"context", "dockerfile"}, build
        context = self.root / build["context"]
        started = time.monotonic()
        podman(
            "build",
            *extra,
            "-f",
            str(context / build["dockerfile"]),
            "-t",
            config["image"],
            str(context),
            timeout=1800,
        )
        return time.monotonic() - started

    # --- containers ------------------------------------------------------------------------------

    def run_args(self, service: str, index: int) -> list[str]:
        """`podman run` arguments for one replica of a service, from its compose definition."""
        config = self.spec["services"][service]
        args = [
            "--detach",
            "--name",
            f"{self.name}_{service}_{index}",
            "--label",
            f"com.docker.compose.project={self.name}",
            "--label",
            f"com.docker.compose.service={service}",
        ]
        for network in config.get("networks", ["default"]):
            args += ["--network", self.network(network), "--network-alias", service]
        if "user" in config:
            args += ["--user", str(config["user"])]
        if config.get("read_only"):
            # Only what the file declares is writable (podman would add its own /tmp, /var/tmp and /run).
            args += ["--read-only", "--read-only-tmpfs=false"]
        for path in config.get("tmpfs", []):
            args += ["--tmpfs", path]
        for capability in config.get("cap_drop", []):
            args += ["--cap-drop", capability]
        for option in config.get("security_opt", []):
            args += ["--security-opt", option.replace(":true", "")]
        if "restart" in config:
            args += ["--restart", config["restart"]]
        for key, value in (config.get("environment") or {}).items():
            args += ["--env", f"{key}={value}"]
        if "stop_grace_period" in config:
            args += ["--stop-timeout", str(int(seconds(config["stop_grace_period"])))]
        for port in config.get("ports", []):
            host_ip, host_port, container_port = str(port).rsplit(":", 2)
            args += ["--publish", f"{host_ip}:{'' if self.publish_any_port else host_port}:{container_port}"]
        check = config.get("healthcheck")
        if check:
            assert check["test"][0] == "CMD", "exec-form healthchecks only"
            args += [
                "--health-cmd",
                json.dumps(check["test"][1:]),
                "--health-interval",
                f"{seconds(check['interval']):g}s",
                "--health-timeout",
                f"{seconds(check['timeout']):g}s",
                "--health-retries",
                str(check["retries"]),
                "--health-start-period",
                f"{seconds(check['start_period']):g}s",
            ]
        if "entrypoint" in config:
            args += ["--entrypoint", json.dumps(config["entrypoint"])]
        return [*args, config["image"], *config.get("command", [])]

    def replicas(self, service: str) -> int:
        return int(self.spec["services"][service].get("deploy", {}).get("replicas", 1))

    def start(self, service: str) -> str:
        """One more replica of a service; returns its container name."""
        index = len(self.containers[service]) + 1
        while podman("container", "exists", f"{self.name}_{service}_{index}", check=False).returncode == 0:
            index += 1
        podman("run", *self.run_args(service, index))
        name = f"{self.name}_{service}_{index}"
        self.containers[service].append(name)
        return name

    def healthy(self, container: str) -> bool:
        """Runs the container's healthcheck now (podman schedules them with systemd, absent in CI containers)."""
        return podman("healthcheck", "run", container, check=False, timeout=30).returncode == 0

    def wait_healthy(self, containers: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        waiting = list(containers)
        while waiting:
            waiting = [c for c in waiting if not self.healthy(c)]
            for container in waiting:
                if not self.running(container):
                    raise AssertionError(f"{container} exited:\n{self.logs(container)}")
            if waiting and time.monotonic() > deadline:
                raise AssertionError(f"not healthy after {timeout}s: {waiting}")
            if waiting:
                time.sleep(1)

    def up(self, health_timeout: float = 120) -> None:
        """The network, then each service's replicas in depends_on order, waiting for the conditions."""
        for network in self.spec.get("networks", {}):
            podman("network", "create", "--label", f"com.docker.compose.project={self.name}", self.network(network))
        started: set[str] = set()
        pending = list(self.spec["services"])
        while pending:
            service = next(
                s for s in pending if set(self.spec["services"][s].get("depends_on", {})) <= started
            )  # StopIteration: a dependency cycle
            for dependency, condition in self.spec["services"][service].get("depends_on", {}).items():
                assert condition["condition"] in ("service_started", "service_healthy"), condition
                if condition["condition"] == "service_healthy":
                    self.wait_healthy(self.containers[dependency], health_timeout)
            for _ in range(self.replicas(service)):
                self.start(service)
            started.add(service)
            pending.remove(service)

    def running(self, container: str) -> bool:
        done = podman("inspect", "--format", "{{.State.Running}}", container, check=False)
        return done.stdout.strip() == "true"

    def logs(self, container: str) -> str:
        done = podman("logs", container, check=False)
        return (done.stdout + done.stderr)[-4000:]

    def inspect(self, container: str) -> dict:
        return json.loads(podman("inspect", container).stdout)[0]

    def host_port(self, container: str, port: int) -> int:
        return int(podman("port", container, f"{port}/tcp").stdout.strip().rsplit(":", 1)[1])

    def stop(self, container: str) -> int:
        """A graceful stop (SIGTERM, then the service's stop_grace_period); returns the exit code."""
        podman("stop", container, timeout=120)
        return int(podman("inspect", "--format", "{{.State.ExitCode}}", container).stdout.strip())

    def kill(self, container: str) -> None:
        """SIGKILL: no drain, connections broken mid-call (a crash, an OOM kill)."""
        podman("kill", container)

    def down(self) -> None:
        """Every container and network of the project, by its label, whatever state the run left."""
        label = f"label=com.docker.compose.project={self.name}"
        names = podman("ps", "--all", "--filter", label, "--format", "{{.Names}}", check=False).stdout.split()
        if names:
            podman("rm", "--force", "--time", "5", *names, check=False, timeout=120)
        for network in self.spec.get("networks", {}):
            podman("network", "rm", "--force", self.network(network), check=False)
