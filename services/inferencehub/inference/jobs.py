"""The replica's side of asynchronous jobs: pull jobs from NATS JetStream and run them through the engine.

For each model it serves, the replica binds the model's durable pull consumer (shared by all replicas) and
fetches only while it has room: at most ``jobs_per_model`` jobs held at once (default twice the model's
execution slots), and only while the model's scheduler queue is below its bound. Jobs then go through
``Engine.infer`` exactly like synchronous calls: the same per-model FIFO queue, the same batching, the same
execution slots. A held job whose queue is momentarily full (synchronous traffic) waits and retries
instead of failing.

- Lease: while a job is held, ``in_progress`` is sent every third of the lease, so a long job is never
  redelivered; a replica that dies stops sending them and the job is redelivered after the lease.
- Once: the record moves through compare-and-set (``jobqueue.transition``); a delivery that finds its job
  already finished only acknowledges it, so a job delivered twice is reported once, with one result.
- A deterministic error (invalid input, a model error) fails the job at once with its message, and the
  message is terminated (not redelivered). A delivery beyond ``jobs_max_attempts`` does not run the job: it
  fails it ("delivered N times..."), so a job that kills replicas ends ``failed``.
- Cancellation: checked when a job is picked up and at each heartbeat; a job still waiting in the model's
  queue is dropped there; a model call already running completes and its result is discarded.
- A NATS server that comes back with an empty store (a lost volume): after reconnecting, and whenever a fetch
  fails, the replica creates its consumers again (once the gateway has re-created the stream and the bucket); the
  pull subscriptions stay bound by name, so pulling resumes without a restart.
- SIGTERM: no new fetches at once; held jobs get the grace period to finish and be acknowledged; the rest
  are handed back (nak) so another replica picks them up without waiting for the lease.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from inferencehub import jobqueue, logs
from inferencehub.buckets import LATENCY_BUCKETS
from inferencehub.errors import InferenceHubError, ModelNotReady
from inferencehub.inference import pipeline
from inferencehub.inference.engine import Engine, ServedModel
from inferencehub.jobqueue import CANCELLED, FAILED, FINAL, QUEUED, RUNNING, SUCCEEDED, JobRecord
from inferencehub.oip.plan import HEADER as PLAN_HEADER
from inferencehub.oip.plan import OutputPlan
from inferencehub.protocol.inference import grpc_predict_v2_pb2 as pb
from inferencehub.settings import InferenceSettings

if TYPE_CHECKING:  # nats is imported when jobs are configured, not with this module
    from nats.aio.client import Client as NATS
    from nats.js import JetStreamContext
    from nats.js.kv import KeyValue

log = logging.getLogger(__name__)

FETCH_SECONDS = 1.0  # longest a pull request waits for jobs; SIGTERM stops pulling within this
JOB_BUCKETS = (*LATENCY_BUCKETS, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
RESULT_ROOM = 1024  # bytes of NATS's max_payload kept for the record's other fields


class JobMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.jobs = Counter(
            "inferencehub_jobs",
            "Async jobs finished by this replica, by model and outcome (succeeded, failed, cancelled, "
            "handed_back: released for another replica).",
            ["model", "outcome"],
            registry=registry,
        )
        self.queued = Histogram(
            "inferencehub_jobs_queued_seconds",
            "Time from a job's submission to the start of its run.",
            ["model"],
            buckets=JOB_BUCKETS,
            registry=registry,
        )
        self.running = Histogram(
            "inferencehub_jobs_running_seconds",
            "Time a job ran on this replica (its queue wait in the model's scheduler included).",
            ["model"],
            buckets=JOB_BUCKETS,
            registry=registry,
        )
        self.held = Gauge(
            "inferencehub_jobs_held",
            "Jobs this replica holds now (fetched, not yet acknowledged), by model.",
            ["model"],
            registry=registry,
        )


class JobRunner:
    def __init__(
        self, settings: InferenceSettings, engine: Engine, registry: CollectorRegistry, replica: str, tracing=None
    ):
        self.settings = settings
        self.tracing = tracing  # a tracing.Tracing when tracing is on
        self.url = settings.nats_url
        self.engine = engine
        self.replica = replica
        self.metrics = JobMetrics(registry)
        self.nc: NATS | None = None
        self.js: JetStreamContext | None = None
        self.kv: KeyValue | None = None
        self.stopping = False
        self.loops: list[asyncio.Task] = []
        self.held: dict[str, set[asyncio.Task]] = collections.defaultdict(set)
        self.freed: dict[str, asyncio.Event] = collections.defaultdict(asyncio.Event)
        self.bound: set[str] = set()  # models whose jobs are pulled (those loaded since start too)
        self.starter: asyncio.Task | None = None
        self.binding: asyncio.Task | None = None  # creating the consumers again

    # The connection and the stream's context, for code that runs once they exist (after _start() connected).
    def _nc(self) -> NATS:
        assert self.nc is not None, "jobs: not connected"
        return self.nc

    def _js(self) -> JetStreamContext:
        assert self.js is not None, "jobs: not connected"
        return self.js

    def start(self) -> None:
        self.starter = asyncio.create_task(self._start(), name="jobs start")

    async def _start(self) -> None:
        warned = False
        while self.nc is None and not self.stopping:
            try:
                self.nc = await jobqueue.connect(
                    self.url,
                    f"inferencehub-replica {self.replica}",
                    log,
                    user=self.settings.nats_user,
                    password=self.settings.nats_password,
                    tls_ca=self.settings.nats_tls_ca,
                    reconnected=self.rebind,
                )
            except Exception as exc:
                if not warned:
                    log.warning("jobs: cannot connect to NATS at %s (%s); retrying", self.url, exc)
                    warned = True
                await asyncio.sleep(1.0)
        if self.nc is None:
            return
        self.js = self.nc.jetstream(timeout=5.0)
        subscriptions = await self._bind()
        if subscriptions is None:
            return
        for name, subscription in subscriptions.items():
            self.loops.append(asyncio.create_task(self._pull(name, subscription), name=name))
        log.info("jobs: pulling for %s from NATS at %s", ", ".join(subscriptions), self.url)

    def consumer_config(self, name: str):
        from nats.js import api

        return api.ConsumerConfig(
            durable_name=jobqueue.consumer_name(name),
            filter_subject=jobqueue.subject(name),
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=self.settings.jobs_lease_seconds,
            max_deliver=self.settings.jobs_max_attempts + 1,  # the last delivery only fails the job
            max_ack_pending=-1,
        )

    async def _bind(self):
        """Wait for the stream and bucket (the gateway creates them), then bind each model's consumer."""
        if not await self._create_consumers():
            return None
        subscriptions = {}
        for name in [n for n in self.engine.models if n not in self.bound]:  # see follow()
            subscriptions[name] = await self._js().pull_subscribe_bind(
                durable=jobqueue.consumer_name(name), stream=jobqueue.STREAM
            )
        self.bound.update(subscriptions)
        return subscriptions

    def rebind(self) -> None:
        """Create the consumers again (in the background, once at a time): after a reconnection or a failed fetch,
        the server may have come back with an empty store."""
        if self.stopping or self.js is None or (self.binding is not None and not self.binding.done()):
            return
        self.binding = asyncio.create_task(self._create_consumers(), name="jobs consumers")

    async def _create_consumers(self) -> bool:
        """Wait for the stream and bucket, then create (or confirm) each model's consumer; False if stopped first."""
        warned = False
        while not self.stopping:
            try:
                self.kv = await self._js().key_value(jobqueue.BUCKET)
                await self._js().stream_info(jobqueue.STREAM)
                for name in list(self.engine.models):  # those loaded since start too (see follow())
                    await self._js().add_consumer(jobqueue.STREAM, self.consumer_config(name))
                if warned:
                    log.info("jobs: stream %s, bucket %s and consumers ready again", jobqueue.STREAM, jobqueue.BUCKET)
                return True
            except Exception as exc:
                if not warned:
                    log.warning(
                        "jobs: waiting for stream %s and bucket %s on NATS at %s (%s)",
                        jobqueue.STREAM,
                        jobqueue.BUCKET,
                        self.url,
                        exc or type(exc).__name__,
                    )
                    warned = True
                await asyncio.sleep(0.5)
        return False

    async def _subscribe(self, name: str):
        config = self.consumer_config(name)
        await self._js().add_consumer(jobqueue.STREAM, config)
        return await self._js().pull_subscribe_bind(durable=config.durable_name, stream=jobqueue.STREAM)

    def follow(self, name: str) -> None:
        """A model loaded at run time: pull its jobs too. (An unloaded model's loop idles: its jobs wait in the
        stream for a replica that serves it; a replaced model's loop goes on with the new instance.)"""
        if name in self.bound or self.kv is None or self.stopping:
            return  # pulled already, or not bound yet (the bind takes every model loaded by then)
        self.bound.add(name)
        self.loops.append(asyncio.create_task(self._follow(name), name=name))

    async def _follow(self, name: str) -> None:
        try:
            subscription = await self._subscribe(name)
        except Exception as exc:
            self.bound.discard(name)
            log.warning("jobs: cannot pull for %s, loaded at run time (%s)", name, exc or type(exc).__name__)
            return
        log.info("jobs: pulling for %s too", name)
        await self._pull(name, subscription)

    def limit(self, served: ServedModel) -> int:
        if self.settings.jobs_per_model > 0:
            return self.settings.jobs_per_model
        scheduler = served.scheduler
        return 2 * scheduler.concurrency if scheduler is not None else 1

    def room(self, served: ServedModel) -> int:
        scheduler = served.scheduler
        if scheduler is None or not self.engine.ready:
            return 0
        held = len(self.held[served.config.name])
        return min(self.limit(served) - held, scheduler.max_queue - len(scheduler.queue))

    async def _pull(self, name: str, subscription) -> None:
        from nats.errors import TimeoutError as NatsTimeout

        while not self.stopping:
            served = self.engine.models.get(name)  # the instance serving now (models are replaced and unloaded)
            room = self.room(served) if served is not None else 0
            if served is None or room <= 0:
                self.freed[name].clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.freed[name].wait(), 0.1)
                continue
            try:
                messages = await subscription.fetch(room, timeout=FETCH_SECONDS)
            except (NatsTimeout, TimeoutError):
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("jobs: fetch for %s: %s", name, exc)
                self.rebind()  # the consumer may be gone with the server's store
                await asyncio.sleep(0.5)
                continue
            for message in messages:
                if self.stopping:  # fetched while SIGTERM came: hand it back at once
                    with contextlib.suppress(Exception):
                        await message.nak()
                    continue
                task = asyncio.create_task(self._handle(served, message))
                self.held[name].add(task)
                self.metrics.held.labels(name).set(len(self.held[name]))
                task.add_done_callback(functools.partial(self._done, name))

    def _done(self, name: str, task: asyncio.Task) -> None:
        self.held[name].discard(task)
        self.metrics.held.labels(name).set(len(self.held[name]))
        self.freed[name].set()

    async def _handle(self, served: ServedModel, message) -> None:
        headers = message.headers or {}
        job_id = headers.get(jobqueue.JOB_HEADER, "")
        token = logs.request_id.set(job_id or "-")
        try:
            if self.tracing is None:
                await self._run(served, message, job_id, headers)
            else:  # a new trace for the run, linked to the request that submitted the job
                links = self.tracing.link(headers.items())
                attributes = {"inferencehub.job_id": job_id, "inferencehub.replica": self.replica}
                with self.tracing.span(f"job {served.config.name}", links=links, attributes=attributes, context=None):
                    await self._run(served, message, job_id, headers)
        except asyncio.CancelledError:
            # Not finished within the grace period: hand it back so another replica takes it at once.
            with contextlib.suppress(Exception):
                await asyncio.shield(message.nak())
            self.metrics.jobs.labels(served.config.name, "handed_back").inc()
        except Exception:
            log.exception("job %s: could not be handled; it will be redelivered", job_id)
        finally:
            logs.request_id.reset(token)

    async def _run(self, served: ServedModel, message, job_id: str, headers: dict) -> None:
        name = served.config.name
        delivered = message.metadata.num_delivered
        if not jobqueue.JOB_ID.match(job_id):
            log.warning("a message without a job id on %s; dropped", message.subject)
            await message.term()
            return
        created = float(headers.get(jobqueue.CREATED_HEADER, "0") or 0) or jobqueue.now()
        plan = OutputPlan.from_header(headers.get(PLAN_HEADER, ""))
        give_up = delivered > self.settings.jobs_max_attempts
        failed_here = []
        request = None
        with contextlib.suppress(Exception):
            request = pb.ModelInferRequest.FromString(message.data)

        def claim(current: JobRecord | None) -> JobRecord | None:
            if current is not None and current.status in FINAL:
                return None
            base = current or JobRecord(
                id=job_id,
                model=request.model_name if request is not None else name,
                version=request.model_version if request is not None else "",
                status=QUEUED,
                created=created,
                seq=message.metadata.sequence.stream,
                binary_default=plan.binary_default,
                binary=dict(plan.binary),
            )
            if give_up:
                failed_here.append(True)
                return base.evolve(
                    status=FAILED,
                    finished=jobqueue.now(),
                    error_code="INTERNAL",
                    error=f"job was delivered {delivered - 1} times and no replica finished it "
                    "(each stopped while running it: a crash, or killed?); not retried",
                )
            if request is None:
                failed_here.append(True)
                return base.evolve(
                    status=FAILED, finished=jobqueue.now(), error_code="INVALID_ARGUMENT", error="unreadable job"
                )
            return base.evolve(status=RUNNING, started=jobqueue.now(), attempts=base.attempts + 1, replica=self.replica)

        record = await jobqueue.transition(self.kv, job_id, claim)
        if record is None or record.status != RUNNING:
            # Already finished (a redelivery of a job whose result is written, or a cancelled one), or failed
            # just now as undeliverable: remove the message, never run it again.
            if failed_here and record is not None and record.status == FAILED:
                self.metrics.jobs.labels(name, "failed").inc()
                log.warning("job %s failed: %s", job_id, record.error)
            await message.term()
            return
        self.metrics.queued.labels(name).observe(max(0.0, jobqueue.now() - created))
        started = time.perf_counter()
        assert request is not None  # claim() failed an unreadable job
        work = asyncio.create_task(pipeline.infer(self.engine, request, wait_when_full=True))
        beat = asyncio.create_task(self._heartbeat(message, job_id, work))
        try:
            response = await work
        except asyncio.CancelledError:
            if work.cancelled() and beat.done() and beat.result() == "cancelled":
                await message.term()
                self.metrics.jobs.labels(name, "cancelled").inc()
                log.info("job %s cancelled while running; its result is not computed or is discarded", job_id)
                return
            raise
        except ModelNotReady as exc:  # this replica is shutting down: another one takes the job
            log.info("job %s handed back: %s", job_id, exc)
            await message.nak()
            self.metrics.jobs.labels(name, "handed_back").inc()
            return
        except InferenceHubError as exc:
            await self._finish(message, job_id, name, FAILED, error=str(exc), code=exc.status.name)
            return
        except Exception:
            log.exception("job %s failed", job_id)
            error = "internal error; the replica's log has the details"
            await self._finish(message, job_id, name, FAILED, error=error, code="INTERNAL")
            return
        finally:
            beat.cancel()
            self.metrics.running.labels(name).observe(time.perf_counter() - started)
        result = response.SerializeToString()
        limit = self._nc().max_payload - RESULT_ROOM
        if len(result) > limit:
            await self._finish(
                message,
                job_id,
                name,
                FAILED,
                error=f"the result is {len(result)} bytes, over the job queue's limit of {limit} bytes "
                f"(NATS max_payload {self._nc().max_payload}); call the model synchronously",
                code="RESOURCE_EXHAUSTED",
            )
            return
        await self._finish(message, job_id, name, SUCCEEDED, result=result, version=response.model_version)

    async def _finish(
        self,
        message,
        job_id: str,
        model: str,
        status: str,
        *,
        result: bytes = b"",
        error: str = "",
        code: str = "",
        version: str = "",
    ) -> None:
        def done(current: JobRecord | None) -> JobRecord | None:
            if current is None or current.status in FINAL:
                return None  # written once: a cancelled job, or another delivery that finished first
            finished = jobqueue.now()
            return current.evolve(
                status=status,
                finished=finished,
                result=result,
                error=error,
                error_code=code,
                version=version or current.version,
            )

        record = await jobqueue.transition(self.kv, job_id, done)
        outcome = record.status if record is not None else status
        if status == FAILED:
            log.warning("job %s failed: %s", job_id, error)
            await message.term()
        else:
            with contextlib.suppress(Exception):
                await message.ack_sync(timeout=5.0)
        self.metrics.jobs.labels(model, outcome if outcome in (SUCCEEDED, FAILED, CANCELLED) else status).inc()

    async def _heartbeat(self, message, job_id: str, work: asyncio.Task) -> str:
        """Keep the lease while the job runs; cancel the work if the job is cancelled."""
        interval = max(self.settings.jobs_lease_seconds / 3, 0.1)
        while not work.done():
            await asyncio.sleep(interval)
            with contextlib.suppress(Exception):
                await message.in_progress()
            with contextlib.suppress(Exception):
                record = await jobqueue.read(self.kv, job_id)
                if record is not None and record.status == CANCELLED:
                    work.cancel()
                    return "cancelled"
        return "done"

    async def stop(self, grace: float) -> None:
        """Stop pulling at once; give held jobs ``grace`` seconds to finish, then hand the rest back."""
        self.stopping = True
        for task in (self.starter, self.binding):
            if task is not None and not task.done():
                task.cancel()
        held = [task for tasks in self.held.values() for task in tasks]
        if held:
            log.info("jobs: no new pulls; %d held job(s) have %.1fs to finish", len(held), grace)
            _, pending = await asyncio.wait(held, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        for loop in self.loops:
            loop.cancel()
        log.debug("jobs: stopping the pull loops")
        if self.loops:
            await asyncio.wait(self.loops, timeout=FETCH_SECONDS + 1)
        log.debug("jobs: closing the NATS connection")
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.close(), 5)
        log.debug("jobs: stopped")
