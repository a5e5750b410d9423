"""Asynchronous jobs on NATS JetStream: the layout and the job record, shared by the gateway and the replicas.

- Stream ``INFERENCEHUB_JOBS``, work-queue retention, subjects ``inferencehub.jobs.<model>``: one message per
  job, its body the serialized ``ModelInferRequest``. A message is removed when a replica acknowledges (or
  terminates) it; ``max_msgs_per_subject`` with discard-new-per-subject is the per-model queue limit, so a full
  queue refuses the publish atomically, whatever the number of gateways.
- One durable pull consumer per model (``inferencehub-<model>``), shared by every replica serving the model.
- Key-value bucket ``INFERENCEHUB_JOB_STATE`` with a TTL: ``job.<id>`` holds the job record (status, times,
  the output plan, the serialized ``ModelInferResponse`` or the error); ``idem.<sha256>`` maps an
  Idempotency-Key to its job id. Every write of a record is a compare-and-set on its revision
  (``transition``), so a record moves queued -> running -> succeeded | failed | cancelled once, and a job
  delivered twice never gets two different results.

The gateway creates (or updates) the stream and the bucket; replicas wait for them and create the consumers. Both
do it again after reconnecting, and when a call finds them missing: a NATS server that comes back with an empty
store (a lost volume, a fresh pod) is set up again without restarting anyone.

Who may do what: a server with authorization gives the gateway and the replicas users of their own (the chart's
``jobs-nats.yaml`` lists the subjects each may use, and why); the services connect with ``nats_user`` and
``nats_password`` and, for TLS, verify the server's certificate against ``nats_tls_ca``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import secrets
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from inferencehub.oip.plan import OutputPlan

if TYPE_CHECKING:  # nats is imported when a queue is configured, not with this module
    from nats.aio.client import Client as NATS

STREAM = "INFERENCEHUB_JOBS"
SUBJECT_PREFIX = "inferencehub.jobs"
BUCKET = "INFERENCEHUB_JOB_STATE"
CONSUMER_PREFIX = "inferencehub-"
JOB_HEADER = "Inferencehub-Job"
CREATED_HEADER = "Inferencehub-Created"

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
FINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})

JOB_ID = re.compile(r"^[0-9a-f]{32}$")
_SAFE_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,100}$")
_MAGIC = b"IHJ1"

log = logging.getLogger(__name__)


class JobStoreError(Exception):
    """The job record could not be written (too much contention on one key)."""


def new_job_id() -> str:
    """128 random bits, hex."""
    return secrets.token_hex(16)


def model_token(model: str) -> str:
    """The model's name as one subject token (names outside [A-Za-z0-9_-] become '=' and their hex)."""
    return model if _SAFE_TOKEN.match(model) else "=" + model.encode().hex()


def model_of_subject(name: str) -> str:
    token = name.rsplit(".", 1)[-1]
    if token.startswith("="):
        try:
            return bytes.fromhex(token[1:]).decode()
        except ValueError:
            return token
    return token


def subject(model: str) -> str:
    return f"{SUBJECT_PREFIX}.{model_token(model)}"


def consumer_name(model: str) -> str:
    return CONSUMER_PREFIX + model_token(model)


def job_key(job_id: str) -> str:
    return f"job.{job_id}"


def idempotency_key(key: str) -> str:
    return "idem." + hashlib.sha256(key.encode()).hexdigest()


@dataclass
class JobRecord:
    """A job's state in the bucket. Times are Unix seconds."""

    id: str
    model: str
    version: str
    status: str
    created: float
    started: float | None = None
    finished: float | None = None
    attempts: int = 0  # deliveries that started running the job
    seq: int = 0  # the job's message in the stream (deleted when a queued job is cancelled)
    replica: str = ""
    error: str = ""
    error_code: str = ""  # the gRPC status name the synchronous call would have failed with
    binary_default: bool = False  # the output plan: which outputs go back as binary data
    binary: dict[str, bool] = field(default_factory=dict)
    result: bytes = b""  # the serialized ModelInferResponse, when succeeded

    def encode(self) -> bytes:
        doc = asdict(self)
        del doc["result"]
        header = json.dumps(doc, separators=(",", ":")).encode()
        return b"".join([_MAGIC, struct.pack(">I", len(header)), header, self.result])

    @classmethod
    def decode(cls, data: bytes) -> JobRecord:
        if data[:4] != _MAGIC:
            raise ValueError("not a job record")
        (length,) = struct.unpack(">I", data[4:8])
        doc = json.loads(data[8 : 8 + length])
        return cls(**doc, result=bytes(data[8 + length :]))

    @property
    def plan(self) -> OutputPlan:
        """Which outputs of the result go back as binary data."""
        return OutputPlan(self.binary_default, self.binary)

    def evolve(self, **changes) -> JobRecord:
        return replace(self, **changes)


async def transition(kv, job_id: str, change: Callable[[JobRecord | None], JobRecord | None]) -> JobRecord | None:
    """Compare-and-set the job's record: ``change`` gets the current record (None if there is none) and returns
    the new one, or None to leave it. Returns the record as it is afterwards (None if there is none)."""
    from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

    key = job_key(job_id)
    for _ in range(50):
        try:
            entry = await kv.get(key)
            current, revision = JobRecord.decode(entry.value), entry.revision
        except KeyNotFoundError:
            current, revision = None, None
        new = change(current)
        if new is None:
            return current
        try:
            if revision is None:
                await kv.create(key, new.encode())
            else:
                await kv.update(key, new.encode(), last=revision)
            return new
        except KeyWrongLastSequenceError:
            await asyncio.sleep(0.005)
    raise JobStoreError(f"job {job_id}: its record kept changing; gave up")


async def read(kv, job_id: str) -> JobRecord | None:
    from nats.js.errors import KeyNotFoundError

    try:
        entry = await kv.get(job_key(job_id))
    except KeyNotFoundError:
        return None
    return JobRecord.decode(entry.value)


async def connect(
    url: str,
    name: str,
    logger: logging.Logger,
    *,
    user: str = "",
    password: str = "",
    tls_ca: str | os.PathLike[str] | None = None,
    reconnected: Callable[[], object] | None = None,
) -> NATS:
    """A NATS connection that reconnects forever; connection problems are logged once per change.

    ``user``/``password``: the credentials the server's authorization expects (none when empty). ``tls_ca``: a PEM
    CA bundle to verify the server's certificate with (TLS to NATS on). ``reconnected`` is called after each
    reconnection, so the caller can set up what a restarted server may have lost."""
    import nats

    async def on_error(exc: Exception) -> None:
        logger.debug("NATS: %s", exc)

    connection: list[NATS] = []

    async def on_disconnect() -> None:
        if connection and (connection[0].is_closed or connection[0].is_draining):
            return  # closing on purpose
        logger.warning("NATS at %s: disconnected; reconnecting", url)

    async def on_reconnect() -> None:
        logger.info("NATS at %s: reconnected", url)
        if reconnected is not None:
            reconnected()

    options: dict[str, Any] = {}
    if user:
        options.update(user=user, password=password)
    if tls_ca:
        options["tls"] = ssl.create_default_context(cafile=str(tls_ca))
    nc = await nats.connect(
        [server.strip() for server in url.split(",") if server.strip()],
        name=name,
        allow_reconnect=True,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=2,
        ping_interval=5,
        max_outstanding_pings=2,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        **options,
    )
    connection.append(nc)
    return nc


async def ensure_layout(js, *, replicas: int, ttl_seconds: float, max_queue: int) -> None:
    """Create the stream and the bucket, or bring an existing stream's limits to these values."""
    from nats.js import api
    from nats.js.errors import BadRequestError, NotFoundError

    stream = api.StreamConfig(
        name=STREAM,
        description="InferenceHub asynchronous inference jobs, one subject per model",
        subjects=[f"{SUBJECT_PREFIX}.>"],
        retention=api.RetentionPolicy.WORK_QUEUE,
        storage=api.StorageType.FILE,
        discard=api.DiscardPolicy.NEW,
        discard_new_per_subject=True,
        max_msgs_per_subject=max_queue,
        max_age=ttl_seconds,
        num_replicas=replicas,
        duplicate_window=min(120.0, ttl_seconds),
    )
    try:
        await js.update_stream(stream)
    except NotFoundError:
        await js.add_stream(stream)
    bucket = api.KeyValueConfig(
        bucket=BUCKET,
        description="InferenceHub job records and idempotency keys",
        ttl=ttl_seconds,
        history=1,
        replicas=replicas,
        storage=api.StorageType.FILE,
    )
    try:
        await js.create_key_value(bucket)
    except BadRequestError:
        # The bucket exists with other limits: update its stream (KV_<bucket>) in place.
        info = await js.stream_info(f"KV_{BUCKET}")
        config = info.config
        config.max_age = ttl_seconds
        config.num_replicas = replicas
        await js.update_stream(config)


async def layout_missing(js) -> bool:
    """True when the server answers that the stream or the bucket does not exist (a server restarted empty);
    False when they exist, or the server cannot tell now (no leader, a timeout)."""
    from nats.js.errors import NotFoundError

    try:
        await js.stream_info(STREAM)
        await js.stream_info(f"KV_{BUCKET}")
    except NotFoundError:
        return True
    except Exception:
        return False
    return False


def now() -> float:
    return time.time()
