"""Settings: one typed object per process, from flags or ``INFERENCEHUB_*`` env vars.

Each field becomes a flag ``--field-name`` whose default is the env var
``INFERENCEHUB_FIELD_NAME`` when set, else the field's default. The object is built
once in the process's entry point and passed explicitly.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

ENV_PREFIX = "INFERENCEHUB_"
T = TypeVar("T")
_TYPES = {"int": int, "float": float, "str": str, "Path": Path}


def setting(default: Any, help: str, flag: str = "") -> Any:
    """A field; its flag is ``--field-name`` unless ``flag`` names another (the env var keeps the field's name)."""
    return field(default=default, metadata={"help": help, "flag": flag})


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    for f in fields(cls):
        convert = _TYPES[str(f.type).split(" |")[0]]
        env = env_name(f.name)
        default = f.default if f.default is not MISSING else None
        if env in os.environ:
            try:
                default = convert(os.environ[env])
            except ValueError:
                parser.error(f"{env}={os.environ[env]!r}: expected {convert.__name__}")
        shown = "" if f.default in (None, "") else f", default {f.default}"
        parser.add_argument(
            f.metadata.get("flag") or "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=convert,
            default=default,
            help=f"{f.metadata['help']} [env {env}{shown}]",
        )


def from_args(cls: type[T], args: argparse.Namespace) -> T:
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})  # type: ignore[arg-type]


@dataclass(frozen=True)
class InferenceSettings:
    host: str = setting("0.0.0.0", "address to listen on")
    port: int = setting(8081, "gRPC port (0: any free port)")
    metrics_port: int = setting(8082, "Prometheus metrics port (0: any free port)")
    models: Path | None = setting(None, "model repository folder (default: the shipped models)")
    replica_name: str = setting("", "this replica's name in responses and logs (default: host name:port)")
    threads: int = setting(4, "threads for thread-executed models")
    processes: int = setting(0, "worker processes for process-executed models (0: one per CPU)")
    max_message_bytes: int = setting(64 * 1024 * 1024, "largest gRPC message accepted or sent")
    max_concurrent_rpcs: int = setting(1000, "calls handled at once; beyond, RESOURCE_EXHAUSTED (0: no limit)")
    drain_seconds: float = setting(1.0, "on SIGTERM, time between reporting NOT_SERVING and refusing new calls")
    grace_seconds: float = setting(10.0, "time in-flight calls get to finish after the drain")
    max_connection_age_seconds: float = setting(30.0, "connections are closed after this age so clients re-resolve")
    max_connection_age_grace_seconds: float = setting(10.0, "time calls on an aged connection get to finish")
    nats_url: str = setting("", "NATS server(s) with JetStream to pull asynchronous jobs from (empty: none)", "--nats")
    jobs_lease_seconds: float = setting(30.0, "a job held this long without a heartbeat is redelivered elsewhere")
    jobs_max_attempts: int = setting(3, "deliveries that may start a job; a job that outlives them fails")
    jobs_per_model: int = setting(0, "jobs held at once per model (0: twice the model's execution slots)")
    log_level: str = setting("info", "debug, info, warning or error")


@dataclass(frozen=True)
class GatewaySettings:
    host: str = setting("0.0.0.0", "address to listen on")
    port: int = setting(8080, "HTTP port (0: any free port)")
    upstream: str = setting(
        "127.0.0.1:8081",
        "gRPC target of the inference replicas, e.g. dns:///inferencehub-inference-headless:8081 "
        "or ipv4:127.0.0.2:8081,127.0.0.3:8081",
    )
    deadline_seconds: float = setting(30.0, "deadline of each upstream call (a client may ask for less)")
    max_body_bytes: int = setting(64 * 1024 * 1024, "largest request body accepted (else 413)")
    max_message_bytes: int = setting(64 * 1024 * 1024, "largest gRPC message sent or received")
    retry_attempts: int = setting(3, "attempts per upstream call when a replica is UNAVAILABLE")
    keepalive_seconds: float = setting(2.0, "interval of HTTP/2 keepalive pings to each replica")
    keepalive_timeout_seconds: float = setting(1.0, "a replica that does not answer a ping in this time is dropped")
    dns_refresh_seconds: float = setting(1.0, "shortest time between DNS re-resolutions of the upstream name")
    drain_seconds: float = setting(1.0, "on SIGTERM, time /readyz fails before the listener closes")
    grace_seconds: float = setting(10.0, "time in-flight requests get to finish after the drain")
    nats_url: str = setting("", "NATS server(s) with JetStream for asynchronous jobs (empty: none)", "--nats")
    jobs_max_queue: int = setting(10000, "unfinished jobs allowed per model; beyond, 429")
    jobs_ttl_seconds: float = setting(86400.0, "how long job records and results are kept")
    jobs_replicas: int = setting(1, "replicas of the job stream and bucket (3 on a 3-node JetStream cluster)")
    log_level: str = setting("info", "debug, info, warning or error")


@dataclass(frozen=True)
class UpSettings:
    replicas: int = setting(2, "inference replicas to start, on 127.0.0.2, 127.0.0.3, ...")
    port: int = setting(8080, "the gateway's HTTP port on 127.0.0.1 (0: any free port)")
    inference_port: int = setting(8081, "each replica's gRPC port (0: any free port)")
    inference_metrics_port: int = setting(8082, "each replica's metrics port (0: any free port)")
    models: Path | None = setting(None, "model repository folder (default: the shipped models)")
    nats_url: str = setting(
        "embedded",
        "job queue for async inference: 'embedded' starts a single-node NATS with JetStream in a temporary "
        "folder, a URL uses that server, 'none' runs without one",
        "--nats",
    )
    nats_port: int = setting(0, "the embedded NATS server's client port on 127.0.0.1 (0: any free port)")
    log_level: str = setting("info", "debug, info, warning or error")
