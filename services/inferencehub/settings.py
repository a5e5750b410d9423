"""Settings: one typed object per process, from flags or ``INFERENCEHUB_*`` env vars.

Each field becomes a flag ``--field-name`` whose default is the env var
``INFERENCEHUB_FIELD_NAME`` when set, else the field's default. The object is built
once in the process's entry point and passed explicitly.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

ENV_PREFIX = "INFERENCEHUB_"
T = TypeVar("T", bound="DataclassInstance")
_TYPES: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "str": str, "Path": Path}
MODEL_CONTROL_MODES = ("none", "explicit", "poll")
OTLP_HELP = (
    "OTLP/HTTP endpoint for traces, e.g. http://otel-collector:4318 (empty: tracing off unless "
    "OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT is set)"
)


def setting(
    default: Any, help: str, flag: str = "", choices: tuple[str, ...] | None = None, repeat: bool = False
) -> Any:
    """A field; its flag is ``--field-name`` unless ``flag`` names another (the env var keeps the field's name);
    ``choices`` limits its values; ``repeat``: a comma-separated list that the flag may also build up, one value
    each time it is given (the flags replace the env var's list)."""
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices, "repeat": repeat})


class _Append(argparse.Action):
    """``--load a --load b,c`` -> ``"a,b,c"``; the first use replaces the default (the env var's list)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        seen = f"_given_{self.dest}"
        current = getattr(namespace, self.dest) if getattr(namespace, seen, False) else ""
        setattr(namespace, seen, True)
        setattr(namespace, self.dest, ",".join(v for v in (current, values) if v))


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def optional_path(value: str) -> Path | None:
    """An optional path setting: empty means unset (``Path("")`` would be the current folder)."""
    return Path(value) if value else None


optional_path.__name__ = "path"  # as argparse and the env var errors name the expected type


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    for f in fields(cls):
        convert = _TYPES[str(f.type).split(" |")[0]]
        if convert is Path and f.default is None:
            convert = optional_path
        env = env_name(f.name)
        default = f.default if f.default is not MISSING else None
        if env in os.environ:
            try:
                default = convert(os.environ[env])
            except ValueError:
                parser.error(f"{env}={os.environ[env]!r}: expected {convert.__name__}")
        choices = f.metadata.get("choices")
        if choices and default not in choices:
            parser.error(f"{env}={default!r}: expected one of {', '.join(choices)}")
        shown = "" if f.default in (None, "") else f", default {f.default}"
        extra: dict[str, Any] = {"action": _Append} if f.metadata.get("repeat") else {}
        parser.add_argument(
            f.metadata.get("flag") or "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=convert,
            default=default,
            choices=choices,
            help=f"{f.metadata['help']} [env {env}{shown}]",
            **extra,
        )


def from_args(cls: type[T], args: argparse.Namespace) -> T:
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class InferenceSettings:
    host: str = setting("0.0.0.0", "address to listen on")
    port: int = setting(8081, "gRPC port (0: any free port)")
    metrics_port: int = setting(8082, "Prometheus metrics port (0: any free port)")
    models: Path | None = setting(None, "model repository folder (default: the shipped models)")
    model_control_mode: str = setting(
        "none",
        "none: load every model at start, refuse load/unload; explicit: load the --load models at start, allow "
        "load/unload; poll: load every model, reload those whose files change",
        choices=MODEL_CONTROL_MODES,
    )
    load: str = setting(
        "", "explicit mode: a model to load at start (repeat, or comma-separate; '*': all)", repeat=True
    )
    repository_poll_seconds: float = setting(5.0, "poll mode: how often the model repository is checked for changes")
    replica_name: str = setting("", "this replica's name in responses and logs (default: host name:port)")
    threads: int = setting(4, "threads for thread-executed models")
    processes: int = setting(0, "worker processes for process-executed models (0: one per CPU)")
    max_message_bytes: int = setting(64 * 1024 * 1024, "largest gRPC message accepted or sent")
    max_concurrent_rpcs: int = setting(1000, "calls handled at once; beyond, RESOURCE_EXHAUSTED (0: no limit)")
    drain_seconds: float = setting(1.0, "on SIGTERM, time between reporting NOT_SERVING and refusing new calls")
    grace_seconds: float = setting(10.0, "time in-flight calls get to finish after the drain")
    max_connection_age_seconds: float = setting(5.0, "connections are closed after this age so clients re-resolve")
    max_deadline_seconds: float = setting(
        300.0, "longest deadline a call may have (the gateway's --max-deadline-seconds): ageing never cuts such a call"
    )
    max_connection_age_grace_seconds: float = setting(
        0.0, "time calls on an aged connection get to finish (0: --max-deadline-seconds; less is refused at start)"
    )
    otlp_endpoint: str = setting("", OTLP_HELP)
    event_loop: str = setting("uvloop", "event loop: uvloop, or asyncio (the standard library's)")
    nats_url: str = setting("", "NATS server(s) with JetStream to pull asynchronous jobs from (empty: none)", "--nats")
    nats_user: str = setting("", "user name on the NATS server (empty: connect without credentials)")
    nats_password: str = setting("", "password of --nats-user (better given by env: flags show in process lists)")
    nats_tls_ca: Path | None = setting(None, "PEM CA bundle that signed the NATS server's certificate (TLS to NATS)")
    jobs_lease_seconds: float = setting(30.0, "a job held this long without a heartbeat is redelivered elsewhere")
    jobs_max_attempts: int = setting(3, "deliveries that may start a job; a job that outlives them fails")
    jobs_per_model: int = setting(0, "jobs held at once per model (0: twice the model's execution slots)")
    log_level: str = setting("info", "debug, info, warning or error")
    listen_file: Path | None = setting(None, "once listening, write the addresses there as JSON (for supervisors)")
    # Mutual TLS (all three together): then the gRPC port refuses plaintext and clients without a certificate
    # from --tls-client-ca, and serves only the identities in --tls-client-names when it is set. The files are
    # re-read when they change (new connections use the new ones).
    tls_cert: Path | None = setting(None, "PEM certificate chain of this replica (turns mutual TLS on)")
    tls_key: Path | None = setting(None, "PEM private key of --tls-cert")
    tls_client_ca: Path | None = setting(None, "PEM CA bundle; only clients with a certificate it signed may call")
    tls_client_names: str = setting(
        "",
        "comma-separated identities a client certificate must carry to call (a subject alternative name: DNS name, "
        "URI or IP; the subject CN when it has none); others get PERMISSION_DENIED (empty: any the CA signed)",
    )
    health_port: int = setting(-1, "plaintext gRPC port serving only grpc.health.v1, for probes (-1: none, 0: any)")


@dataclass(frozen=True)
class GatewaySettings:
    host: str = setting("0.0.0.0", "address to listen on")
    port: int = setting(8080, "HTTP port (0: any free port)")
    gateway_workers: int = setting(
        0,
        "gateway processes serving the port together (SO_REUSEPORT, sharing nothing), started and supervised by "
        "this one (0: one per CPU of the cgroup's CPU quota, else of the CPU affinity; 1: this process serves; "
        "always 1 with --rate-limit, whose token buckets are per process)",
        "--workers",
    )
    upstream: str = setting(
        "127.0.0.1:8081",
        "gRPC target of the inference replicas, e.g. dns:///inferencehub-inference-headless:8081 "
        "or ipv4:127.0.0.2:8081,127.0.0.3:8081",
    )
    deadline_seconds: float = setting(30.0, "deadline of an upstream call whose client asks for none")
    max_deadline_seconds: float = setting(
        300.0,
        "longest deadline a client may ask for with X-InferenceHub-Deadline-Ms (longer: 400); "
        "the replicas' --max-deadline-seconds must be at least this",
    )
    max_body_bytes: int = setting(64 * 1024 * 1024, "largest request body accepted (else 413)")
    max_decoding_bytes: int = setting(
        256 * 1024 * 1024, "request body bytes read and decoded at once across all requests; beyond, 503 (0: no limit)"
    )
    max_message_bytes: int = setting(64 * 1024 * 1024, "largest gRPC message sent or received")
    header_timeout_seconds: float = setting(10.0, "a request's headers must arrive within this time (else 408)")
    body_timeout_seconds: float = setting(60.0, "a request's body must arrive within this time of its headers (408)")
    max_connections: int = setting(1000, "open client connections at most; beyond, new ones get 503")
    keepalive_seconds: float = setting(2.0, "interval of HTTP/2 keepalive pings to each replica")
    keepalive_timeout_seconds: float = setting(1.0, "a replica that does not answer a ping in this time is dropped")
    dns_refresh_seconds: float = setting(1.0, "shortest time between DNS re-resolutions of the upstream name")
    balancing: str = setting(
        "weighted_round_robin",
        "how calls are spread over replicas: round_robin, or weighted_round_robin by the load each replica reports",
        choices=("round_robin", "weighted_round_robin"),
    )
    replica_metrics_seconds: float = setting(
        300.0, "per-replica metric series of a replica that served nothing for this long are dropped"
    )
    replica_metrics_limit: int = setting(64, "most replicas with their own metric series; the rest count as 'other'")
    drain_seconds: float = setting(1.0, "on SIGTERM, time /readyz fails before the listener closes")
    grace_seconds: float = setting(10.0, "time in-flight requests get to finish after the drain")
    otlp_endpoint: str = setting("", OTLP_HELP)
    coalesce: str = setting(
        "on", "send concurrent compatible requests for a batching model as one upstream call: on or off"
    )
    coalesce_max_delay_ms: float = setting(2.0, "longest a request waits for others to travel with (coalescing)")
    coalesce_off_models: str = setting("", "comma-separated models whose requests are never coalesced")
    event_loop: str = setting("uvloop", "event loop: uvloop, or asyncio (the standard library's)")
    nats_url: str = setting("", "NATS server(s) with JetStream for asynchronous jobs (empty: none)", "--nats")
    nats_user: str = setting("", "user name on the NATS server (empty: connect without credentials)")
    nats_password: str = setting("", "password of --nats-user (better given by env: flags show in process lists)")
    nats_tls_ca: Path | None = setting(None, "PEM CA bundle that signed the NATS server's certificate (TLS to NATS)")
    jobs_max_queue: int = setting(10000, "unfinished jobs allowed per model; beyond, 429")
    jobs_ttl_seconds: float = setting(86400.0, "how long job records and results are kept")
    jobs_replicas: int = setting(1, "replicas of the job stream and bucket (3 on a 3-node JetStream cluster)")
    log_level: str = setting("info", "debug, info, warning or error")
    listen_file: Path | None = setting(None, "once listening, write the address there as JSON (for supervisors)")
    # Who may call: API keys and rate limits (see gateway/auth.py), mutual TLS to the replicas (see tls.py).
    api_keys_file: Path | None = setting(
        None, "file of API keys, one a line: KEY or sha256:HEX, then an optional name (turns keys on)"
    )
    rate_limit: float = setting(0.0, "requests a second per API key name (per client address with keys off); 0: off")
    rate_limit_burst: int = setting(0, "requests a client may send at once above the rate (0: one second's worth)")
    upstream_tls_ca: Path | None = setting(None, "PEM CA bundle that signed the replicas' certificates (turns TLS on)")
    upstream_tls_cert: Path | None = setting(None, "PEM client certificate chain the gateway shows the replicas")
    upstream_tls_key: Path | None = setting(None, "PEM private key of --upstream-tls-cert")
    upstream_tls_server_name: str = setting(
        "", "name the replicas' certificates must carry, if not the upstream target's host name"
    )


@dataclass(frozen=True)
class UpSettings:
    replicas: int = setting(2, "inference replicas to start, on 127.0.0.2, 127.0.0.3, ...")
    port: int = setting(8080, "the gateway's HTTP port on 127.0.0.1 (0: any free port)")
    inference_port: int = setting(8081, "each replica's gRPC port (0: any free port)")
    inference_metrics_port: int = setting(8082, "each replica's metrics port (0: any free port)")
    models: Path | None = setting(None, "model repository folder (default: the shipped models)")
    model_control_mode: str = setting(
        "none", "each replica's model control mode (see inferencehub inference --help)", choices=MODEL_CONTROL_MODES
    )
    load: str = setting("", "explicit mode: a model each replica loads at start (repeat; '*': all)", repeat=True)
    repository_poll_seconds: float = setting(5.0, "poll mode: how often each replica checks the model repository")
    nats_url: str = setting(
        "embedded",
        "job queue for async inference: 'embedded' starts a single-node NATS with JetStream in a temporary "
        "folder, a URL uses that server, 'none' runs without one",
        "--nats",
    )
    nats_port: int = setting(0, "the embedded NATS server's client port on 127.0.0.1 (0: any free port)")
    log_level: str = setting("info", "debug, info, warning or error")
    listen_file: Path | None = setting(
        None, "once everything is ready (and again after each restart), write the addresses and pids there as JSON"
    )
    restart_limit: int = setting(
        5,
        "a replica (or the embedded NATS) that exits more often than this within --restart-window-seconds is "
        "crash-looping: up stops everything and says why (each exit before that is restarted, with backoff)",
    )
    restart_window_seconds: float = setting(60.0, "the window over which --restart-limit counts exits")
