"""The gateway's side of the job queue: one NATS connection, the stream and the bucket (layout in ``jobqueue``).

Submitting publishes the request to its model's subject and writes the job's record (idempotently, with the
Idempotency-Key's entry, and again through a JetStream cluster's fail-over); reading, cancelling and waiting go to
the record. The gateway creates the stream and the bucket; it never waits for NATS to start: without a connection,
each call raises ``QueueUnavailable`` (503 naming the queue) and synchronous requests go on as usual. It creates
them again after each reconnection, and when a submission finds them missing (a NATS server restarted empty).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import logging
import time
from typing import TYPE_CHECKING

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge

from inferencehub import jobqueue
from inferencehub.gateway.http_errors import RETRY_AFTER_SECONDS
from inferencehub.gateway.upstream import UpstreamError
from inferencehub.jobqueue import FINAL, QUEUED, JobRecord
from inferencehub.metadata import IDEMPOTENCY_HEADER
from inferencehub.oip.plan import HEADER as PLAN_HEADER
from inferencehub.oip.plan import OutputPlan
from inferencehub.oip.signature import Signature
from inferencehub.protocol.inference import grpc_predict_v2_pb2 as pb
from inferencehub.settings import GatewaySettings
from inferencehub.tracing import Tracing

if TYPE_CHECKING:  # nats is imported when a queue is configured, not with this module
    from nats.aio.client import Client as NATS
    from nats.js import JetStreamContext
    from nats.js.kv import KeyValue

log = logging.getLogger(__name__)

PUBLISH_TIMEOUT = 5.0
FAILOVER_SECONDS = 8.0  # a submit waits this long for a JetStream cluster to elect a new leader
HEADER_ROOM = 1024  # bytes of a job message's limit kept for its NATS headers
METADATA_TTL = 5.0  # seconds a model's metadata is reused for checking submissions
STATS_INTERVAL = 2.0
RECENT_JOBS = 20  # jobs submitted through this gateway that the live page lists


class QueueError(Exception):
    status = 503

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.headers = headers or {}


class QueueUnavailable(QueueError):
    status = 503


class QueueFull(QueueError):
    status = 429


class TooLarge(QueueError):
    status = 413


class IdempotencyConflict(QueueError):
    status = 409


class JobMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.submitted = Counter(
            "inferencehub_gateway_jobs_submitted",
            "Async job submissions by model and outcome (accepted, duplicate, queue_full, too_large, unavailable).",
            ["model", "outcome"],
            registry=registry,
        )
        self.depth = Gauge(
            "inferencehub_jobs_queue_depth",
            "Unfinished jobs in the model's queue (waiting, or held by a replica).",
            ["model"],
            registry=registry,
        )
        self.oldest = Gauge(
            "inferencehub_jobs_oldest_age_seconds",
            "Age of the model's oldest unfinished job.",
            ["model"],
            registry=registry,
        )


class JobQueue:
    """The gateway's side of the job queue: one NATS connection, the stream and the bucket."""

    def __init__(self, settings: GatewaySettings, registry: CollectorRegistry) -> None:
        self.settings = settings
        self.url = settings.nats_url
        self.metrics = JobMetrics(registry)
        self.nc: NATS | None = None
        self.js: JetStreamContext | None = None
        self.kv: KeyValue | None = None
        self.problem = "not connected yet"
        self.metadata: dict[tuple[str, str], tuple[float, Signature]] = {}  # (model, version) -> (expiry, signature)
        self.tasks: list[asyncio.Task] = []
        self.models_seen: set[str] = set()
        self.recent: collections.deque[str] = collections.deque(maxlen=RECENT_JOBS)  # newest last
        self.tracing: Tracing | None = None
        self.layout: asyncio.Task | None = None  # creating the stream and the bucket

    # The connection, the stream's context and the bucket, for code that runs once they exist (after
    # check_available(), or when the NATS client calls back).
    def _nc(self) -> NATS:
        assert self.nc is not None, "the job queue is not connected"
        return self.nc

    def _js(self) -> JetStreamContext:
        assert self.js is not None, "the job queue is not connected"
        return self.js

    def _kv(self) -> KeyValue:
        assert self.kv is not None, "the job queue's bucket is not set up"
        return self.kv

    @property
    def name(self) -> str:
        return f"the job queue (NATS JetStream stream {jobqueue.STREAM} at {self.url})"

    async def start(self) -> None:
        self.tasks.append(asyncio.create_task(self._connect(), name="nats connect"))

    async def _connect(self) -> None:
        warned = False
        while self.nc is None:
            try:
                self.nc = await jobqueue.connect(
                    self.url,
                    "inferencehub-gateway",
                    log,
                    user=self.settings.nats_user,
                    password=self.settings.nats_password,
                    tls_ca=self.settings.nats_tls_ca,
                    reconnected=self.set_up,
                )
            except Exception as exc:
                self.problem = f"cannot connect: {exc or type(exc).__name__}"
                if not warned:
                    log.warning("%s: %s; async requests get 503 until it answers", self.name, self.problem)
                    warned = True
                await asyncio.sleep(1.0)
        self.js = self.nc.jetstream(timeout=PUBLISH_TIMEOUT)
        await self.set_up()
        self.tasks.append(asyncio.create_task(self._watch_stats(), name="job queue stats"))

    def set_up(self) -> asyncio.Task:
        """Create (or update) the stream and the bucket, once at a time: at the start, after each reconnection (the
        server may have come back with an empty store), and when a call finds them missing."""
        if self.layout is None or self.layout.done():
            self.layout = asyncio.create_task(self._ensure_layout(), name="job queue layout")
        return self.layout

    async def _set_up_again(self, deadline: float) -> bool:
        """If the server says the stream or the bucket is missing, create them (waiting until ``deadline``);
        True if they had to be."""
        if self.nc is None or not await jobqueue.layout_missing(self.nc.jetstream(timeout=1.0)):
            return False
        log.warning(
            "%s: the stream or the bucket is missing (a NATS server restarted empty?); creating them", self.name
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.set_up()), max(0.1, deadline - time.monotonic()))
        return True

    async def _ensure_layout(self) -> None:
        while True:
            try:
                await jobqueue.ensure_layout(
                    self.js,
                    replicas=self.settings.jobs_replicas,
                    ttl_seconds=self.settings.jobs_ttl_seconds,
                    max_queue=self.settings.jobs_max_queue,
                )
                self.kv = await self._js().key_value(jobqueue.BUCKET)
                self.problem = ""
                log.info(
                    "job queue ready: NATS at %s, stream %s, bucket %s", self.url, jobqueue.STREAM, jobqueue.BUCKET
                )
                return
            except Exception as exc:
                self.problem = f"cannot set up the stream and bucket: {exc or type(exc).__name__}"
                log.warning("%s: %s", self.name, self.problem)
                await asyncio.sleep(1.0)

    async def close(self) -> None:
        tasks = [*self.tasks, *([self.layout] if self.layout is not None else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()

    def check_available(self) -> None:
        if self.nc is None or self.kv is None or not self.nc.is_connected:
            problem = self.problem or "not connected"
            raise QueueUnavailable(
                f"{self.name} is unavailable ({problem}); synchronous requests (without "
                "'Prefer: respond-async') are not affected",
                {"Retry-After": RETRY_AFTER_SECONDS},
            )

    def _unavailable(self, exc: BaseException) -> QueueUnavailable:
        return QueueUnavailable(
            f"{self.name} is unavailable ({exc or type(exc).__name__}); synchronous requests (without "
            "'Prefer: respond-async') are not affected",
            {"Retry-After": RETRY_AFTER_SECONDS},
        )

    @property
    def payload_limit(self) -> int:
        """The largest serialized request a job can carry: NATS's max_payload (and the gateway's body limit)."""
        return min(self._nc().max_payload - HEADER_ROOM, self.settings.max_body_bytes)

    # --- submit, read, cancel, wait ------------------------------------------------------

    async def submit(
        self, message: pb.ModelInferRequest, plan: OutputPlan, idempotency: str | None
    ) -> tuple[JobRecord, bool]:
        """Queue the job; returns its record and whether it is new (False: the Idempotency-Key's job)."""
        self.check_available()
        model = message.model_name
        payload = message.SerializeToString()
        if len(payload) > self.payload_limit:
            self.metrics.submitted.labels(model, "too_large").inc()
            raise TooLarge(
                f"the request is {len(payload)} bytes encoded; {self.name} takes jobs of at most "
                f"{self.payload_limit} bytes (the NATS server's max_payload is {self._nc().max_payload} bytes): "
                "send it synchronously, or raise max_payload on the NATS servers"
            )
        try:
            record, new = await self._submit(message, payload, plan, idempotency)
        except QueueFull:
            self.metrics.submitted.labels(model, "queue_full").inc()
            raise
        except QueueUnavailable:
            self.metrics.submitted.labels(model, "unavailable").inc()
            raise
        self.models_seen.add(model)
        self.metrics.submitted.labels(model, "accepted" if new else "duplicate").inc()
        if new:
            self.recent.append(record.id)
        return record, new

    async def recent_jobs(self, timeout: float = 0.5) -> list[dict]:
        """The jobs most recently submitted here, newest first, with their state now (for the live page)."""
        if self.kv is None or not self.recent:
            return []

        async def one(job_id: str) -> dict | None:
            try:
                record = await asyncio.wait_for(jobqueue.read(self.kv, job_id), timeout)
            except Exception:  # the page shows what it can; the queue's health is reported elsewhere
                return None
            if record is None:
                return None
            return {
                "id": record.id,
                "model_name": record.model,
                "status": record.status,
                "created_at": iso_time(record.created),
                "finished_at": iso_time(record.finished),
                "replica": record.replica,
            }

        found = await asyncio.gather(*(one(job_id) for job_id in reversed(self.recent)))
        return [job for job in found if job is not None]

    async def _submit(self, message, payload: bytes, plan, idempotency: str | None) -> tuple[JobRecord, bool]:
        job_id = jobqueue.new_job_id()
        deadline = time.monotonic() + FAILOVER_SECONDS
        try:
            return await self._submit_once(job_id, message, payload, plan, idempotency)
        except QueueError:
            raise
        except Exception as exc:
            if not await self._set_up_again(deadline):
                raise self._unavailable(exc) from None
        try:  # the same job id: if the first attempt was published after all, the stream drops the copy
            return await self._submit_once(job_id, message, payload, plan, idempotency)
        except QueueError:
            raise
        except Exception as exc:
            raise self._unavailable(exc) from None

    async def _submit_once(
        self, job_id: str, message, payload: bytes, plan, idempotency: str | None
    ) -> tuple[JobRecord, bool]:
        from nats.js.errors import KeyWrongLastSequenceError

        idem_key = jobqueue.idempotency_key(idempotency) if idempotency else None
        if idem_key is not None:
            try:
                await self._kv().create(idem_key, job_id.encode())
            except KeyWrongLastSequenceError:
                return await self._replay(idem_key, idempotency, message, payload, plan), False
        try:
            return await self._enqueue(job_id, message, payload, plan, jobqueue.now()), True
        except QueueError:
            if idem_key is not None:
                with contextlib.suppress(Exception):
                    await self._kv().delete(idem_key)
            raise

    async def _replay(self, idem_key: str, idempotency: str | None, message, payload: bytes, plan) -> JobRecord:
        entry = await self._kv().get(idem_key)
        assert entry.value is not None  # written by create() with the job's id
        job_id = entry.value.decode()
        record = await jobqueue.read(self.kv, job_id)
        if record is not None and record.model != message.model_name:
            raise IdempotencyConflict(
                f"{IDEMPOTENCY_HEADER} {idempotency!r} already names job {job_id} for model '{record.model}'"
            )
        if record is None:
            # The first submission stopped before its record was written (a gateway that died, a 503): publish and
            # record now; if it had been published, the stream drops the duplicate (same Nats-Msg-Id).
            record = await self._enqueue(job_id, message, payload, plan, jobqueue.now())
        return record

    async def _enqueue(self, job_id: str, message, payload: bytes, plan, created: float) -> JobRecord:
        from nats.js.errors import APIError

        headers = {
            "Nats-Msg-Id": job_id,
            jobqueue.JOB_HEADER: job_id,
            jobqueue.CREATED_HEADER: repr(created),
            PLAN_HEADER: plan.header(),
        }
        if self.tracing is not None:  # the replica's job span links back to the submitting request's trace
            headers.update(self.tracing.inject())
        deadline = time.monotonic() + FAILOVER_SECONDS
        try:
            ack = await self._retrying(
                lambda timeout: self._js().publish(
                    jobqueue.subject(message.model_name), payload, headers=headers, timeout=timeout
                ),
                deadline,
            )
        except APIError as exc:
            if exc.err_code == 10077:  # maximum messages per subject exceeded
                raise QueueFull(
                    f"the job queue of model '{message.model_name}' is full ({self.settings.jobs_max_queue} "
                    "unfinished jobs); retry later",
                    {"Retry-After": RETRY_AFTER_SECONDS},
                ) from None
            raise self._unavailable(exc) from None
        record = JobRecord(
            id=job_id,
            model=message.model_name,
            version=message.model_version,
            status=QUEUED,
            created=created,
            seq=ack.seq or 0,
            binary_default=plan.binary_default,
            binary=dict(plan.binary),
        )
        current = await self._retrying(
            lambda _: jobqueue.transition(self.kv, job_id, lambda cur: record if cur is None else None), deadline
        )
        return current or record

    async def _retrying(self, attempt, deadline: float):
        """Run ``attempt(timeout)``, again while the stream has no leader (a JetStream cluster failing over) or
        the call times out, until ``deadline``: the job's Nats-Msg-Id makes a repeated publish a no-op. When nothing
        answers because the stream or the bucket is gone (a server restarted empty), they are created again."""
        from nats.errors import NoRespondersError
        from nats.errors import TimeoutError as NatsTimeout
        from nats.js.errors import NoStreamResponseError, ServiceUnavailableError

        pause = 0.05
        checked = False
        while True:
            left = deadline - time.monotonic()
            try:
                return await attempt(max(0.5, min(PUBLISH_TIMEOUT, left)))
            except (NoStreamResponseError, NoRespondersError, NatsTimeout, ServiceUnavailableError) as exc:
                if getattr(exc, "err_code", None) == 10077 or time.monotonic() + pause >= deadline:
                    raise
                if not self._nc().is_connected:
                    raise
                if not checked and isinstance(exc, (NoStreamResponseError, NoRespondersError)):
                    checked = True
                    if await self._set_up_again(deadline):
                        continue
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.5)

    async def get(self, job_id: str) -> JobRecord | None:
        if not jobqueue.JOB_ID.match(job_id):
            return None
        self.check_available()
        try:
            return await jobqueue.read(self.kv, job_id)
        except Exception as exc:
            raise self._unavailable(exc) from None

    async def cancel(self, job_id: str) -> tuple[JobRecord | None, bool]:
        """Cancel a queued or running job: (the record afterwards, whether this call cancelled it)."""
        if not jobqueue.JOB_ID.match(job_id):
            return None, False
        self.check_available()

        def change(current: JobRecord | None) -> JobRecord | None:
            if current is None or current.status in FINAL:
                return None
            return current.evolve(
                status=jobqueue.CANCELLED, finished=jobqueue.now(), error="cancelled by a DELETE request"
            )

        try:
            before = await jobqueue.read(self.kv, job_id)
            after = await jobqueue.transition(self.kv, job_id, change)
        except Exception as exc:
            raise self._unavailable(exc) from None
        cancelled = after is not None and after.status == jobqueue.CANCELLED and (before is None or before != after)
        if cancelled and before is not None and before.status == QUEUED and before.seq:
            # Free its place in the model's queue now; a replica that fetched it meanwhile sees it cancelled.
            with contextlib.suppress(Exception):
                await self._js().delete_msg(jobqueue.STREAM, before.seq)
        return after, cancelled

    async def wait(self, job_id: str, seconds: float) -> JobRecord | None:
        """The job's record once it is finished, or as it is after ``seconds``."""
        subscription = await self._nc().subscribe(f"$KV.{jobqueue.BUCKET}.{jobqueue.job_key(job_id)}")
        try:
            record = await jobqueue.read(self.kv, job_id)
            deadline = time.monotonic() + seconds
            while record is not None and record.status not in FINAL:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    update = await subscription.next_msg(timeout=left)
                except Exception:
                    break
                if update.data:
                    record = JobRecord.decode(update.data)
            return record
        finally:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()

    # --- metrics -------------------------------------------------------------------------

    async def _watch_stats(self) -> None:
        while True:
            await asyncio.sleep(STATS_INTERVAL)
            with contextlib.suppress(Exception):
                await self.refresh_stats()

    async def refresh_stats(self) -> None:
        if self.nc is None or not self.nc.is_connected:
            return
        info = await self._js().stream_info(jobqueue.STREAM, subjects_filter=">")
        subjects = info.state.subjects or {}
        now = datetime.datetime.now(datetime.UTC)
        seen = set()
        for name, count in subjects.items():
            model = jobqueue.model_of_subject(name)
            seen.add(model)
            self.metrics.depth.labels(model).set(count)
            oldest = await self._js().get_msg(jobqueue.STREAM, seq=info.state.first_seq or 1, subject=name, next=True)
            age = (now - oldest.time).total_seconds() if oldest.time else 0.0
            self.metrics.oldest.labels(model).set(max(age, 0.0))
        for model in self.models_seen - seen:
            self.metrics.depth.labels(model).set(0)
            self.metrics.oldest.labels(model).set(0)
        self.models_seen |= seen

    # --- checks before queueing ----------------------------------------------------------

    async def signature(self, upstream, message, request_id: str) -> Signature | None:
        """The model's signature from its metadata and max_batch_size (0: no batching), cached briefly; None when
        no replica answers now: the job may wait for one."""
        key = (message.model_name, message.model_version)
        cached = self.metadata.get(key)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        timeout = min(5.0, self.settings.deadline_seconds)
        try:
            metadata, _ = await upstream.call(
                "ModelMetadata",
                pb.ModelMetadataRequest(name=message.model_name, version=message.model_version),
                request_id=request_id,
                timeout=timeout,
            )
            config, _ = await upstream.call(
                "ModelConfig",
                pb.ModelConfigRequest(name=message.model_name, version=message.model_version),
                request_id=request_id,
                timeout=timeout,
            )
        except UpstreamError as exc:
            if exc.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                raise
            return None
        found = Signature.of_metadata(metadata, config.config.max_batch_size)
        self.metadata[key] = (time.monotonic() + METADATA_TTL, found)
        return found


def iso_time(value: float | None) -> str | None:
    """Unix seconds as an ISO 8601 UTC time with milliseconds (None stays None)."""
    if value is None:
        return None
    stamp = datetime.datetime.fromtimestamp(value, datetime.UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")
