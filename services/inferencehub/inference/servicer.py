"""The Open Inference Protocol gRPC servicer: the replica's gRPC adapter.

``ModelInfer`` hands the request to the one infer pipeline (``inference/pipeline.py``: the ``oip`` codec and the
engine) with the call's deadline, and keeps what belongs to the call: its request id, metrics, statistics, load
report and span. Errors are mapped to gRPC statuses here and only here.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from prometheus_client import Counter

import inferencehub
from inferencehub import logs
from inferencehub.errors import InferenceHubError
from inferencehub.inference import pipeline
from inferencehub.inference.control import ModelControl
from inferencehub.inference.engine import Engine, ServedModel
from inferencehub.inference.load_report import LoadReporter
from inferencehub.inference.metrics import UNKNOWN_MODEL, InferenceMetrics
from inferencehub.inference.spans import replica_spans
from inferencehub.inference.statistics import Timing
from inferencehub.metadata import QUEUE_DEPTH_KEY, REQUEST_ID_KEY
from inferencehub.model import ModelConfig
from inferencehub.protocol.inference import grpc_predict_v2_pb2 as pb
from inferencehub.protocol.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from inferencehub.tracing import REPLICA_ATTRIBUTE, Tracing

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
# The protocol extensions this replica serves over gRPC (the gateway adds its HTTP-only ones).
EXTENSIONS = ("model_configuration", "statistics", "model_repository")


def model_config(config: ModelConfig) -> pb.ModelConfig:
    """Triton's view of a model's configuration: with batching, dims leave out the batch dimension."""
    batching = config.batching
    skip = 1 if batching else 0

    def data_type(datatype: str) -> pb.DataType:
        return pb.DataType.Value("TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}")

    message = pb.ModelConfig(
        name=config.name,
        platform=config.platform,
        backend=config.runtime,
        max_batch_size=batching.max_batch_size if batching else 0,
        input=[
            pb.ModelInput(name=s.name, data_type=data_type(s.datatype), dims=s.shape[skip:], optional=s.optional)
            for s in config.inputs
        ],
        output=[
            pb.ModelOutput(name=s.name, data_type=data_type(s.datatype), dims=s.shape[skip:]) for s in config.outputs
        ],
    )
    if config.decoupled:
        message.model_transaction_policy.decoupled = True
    if batching:
        message.dynamic_batching.preferred_batch_size.extend(batching.preferred_batch_sizes)
        message.dynamic_batching.max_queue_delay_microseconds = int(batching.max_queue_delay_ms * 1000)
    return message


def caller_request_id(context: grpc.aio.ServicerContext, request_id: str = "") -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY:
            return value
    return request_id or logs.new_request_id()


class ModelChildren:
    """One model's ModelInfer metric children: labels() looked up once per model and code, not per call."""

    def __init__(self, metrics: InferenceMetrics, model: str) -> None:
        self.metrics = metrics
        self.model = model
        self.in_flight = metrics.in_flight.labels(model)
        self.duration = metrics.duration.labels(model)
        self.requests: dict[grpc.StatusCode, Counter] = {}

    def count(self, code: grpc.StatusCode, start: float | None = None) -> None:
        """One request ended with ``code``; its duration observed from ``start`` (a unary call: a stream's length is
        its reader's, not a latency)."""
        counter = self.requests.get(code)
        if counter is None:
            counter = self.requests[code] = self.metrics.requests.labels(self.model, code.name)
        counter.inc()
        if start is not None:
            self.duration.observe(time.perf_counter() - start)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        engine: Engine,
        metrics: InferenceMetrics,
        replica: str,
        tracing: Tracing | None = None,
        load: LoadReporter | None = None,
        control: ModelControl | None = None,
    ) -> None:
        self.engine = engine
        self.control = control
        self.metrics = metrics
        self.replica = replica
        self.tracing = tracing
        self.load = load or LoadReporter(replica)
        self._children: dict[str, ModelChildren] = {}  # metric children per model (served names only), looked up once

    @property
    def replica_metadata(self) -> tuple:
        # The replica's name and its load report travel in trailing metadata: initial metadata sent
        # early would commit the call, and a committed call is not retried elsewhere when this
        # replica dies mid-call.
        return self.load.trailers

    def _metrics_for(self, model: str) -> ModelChildren:
        children = self._children.get(model)
        if children is None:
            children = self._children[model] = ModelChildren(self.metrics, model)
        return children

    async def ServerLive(self, request, context):
        # With the queue depth: the gateway's status page polls each replica with this call.
        depth = sum(len(s.scheduler.queue) for s in self.engine.models.values() if s.scheduler is not None)
        context.set_trailing_metadata((*self.replica_metadata, (QUEUE_DEPTH_KEY, str(depth))))
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        context.set_trailing_metadata(self.replica_metadata)
        return pb.ServerReadyResponse(ready=self.engine.ready)

    async def _served(self, request, context) -> ServedModel:
        """The model a metadata-style request names; NOT_FOUND (with the replica's name) if there is none."""
        context.set_trailing_metadata(self.replica_metadata)
        try:
            return self.engine.get(request.name, request.version)
        except InferenceHubError as exc:
            await context.abort(exc.status, str(exc), self.replica_metadata)
            raise  # abort raises; this line only tells readers and type checkers so

    async def ModelReady(self, request, context):
        if request.name not in self.engine.models and await self._known(request.name):
            context.set_trailing_metadata(self.replica_metadata)
            return pb.ModelReadyResponse(ready=False)  # in the repository, not loaded (or loading): not ready
        served = await self._served(request, context)
        return pb.ModelReadyResponse(ready=self.engine.ready and served.ready)

    async def ServerMetadata(self, request, context):
        context.set_trailing_metadata(self.replica_metadata)
        return pb.ServerMetadataResponse(
            name="inferencehub", version=inferencehub.__version__, extensions=list(EXTENSIONS)
        )

    async def _known(self, name: str) -> bool:
        if name in self.engine.states:
            return True
        return self.control is not None and any(row[0] == name for row in await self.control.index())

    async def ModelMetadata(self, request, context):
        config = (await self._served(request, context)).config
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=config.name,
            versions=list(self.engine.versions.get(config.name) or [config.version]),
            platform=config.platform,
            inputs=[tensor(name=s.name, datatype=s.datatype, shape=s.shape) for s in config.inputs],
            outputs=[tensor(name=s.name, datatype=s.datatype, shape=s.shape) for s in config.outputs],
        )

    async def ModelConfig(self, request, context):
        config = (await self._served(request, context)).config
        return pb.ModelConfigResponse(config=model_config(config))

    async def ModelStatistics(self, request, context):
        """Triton's statistics extension: NOT_FOUND for a model or version that is not served."""
        context.set_trailing_metadata(self.replica_metadata)
        try:
            stats = self.engine.statistics(request.name, request.version)
        except InferenceHubError as exc:
            await context.abort(exc.status, str(exc), self.replica_metadata)
            raise
        return pb.ModelStatisticsResponse(model_stats=[s.message() for s in stats])

    # --- Triton's model repository extension ------------------------------------------------

    async def _control(self, request, context) -> ModelControl:
        context.set_trailing_metadata(self.replica_metadata)
        if self.control is None:
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED, "this replica has no model control", self.replica_metadata
            )
        if request.repository_name:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"repository '{request.repository_name}' not found: this replica has one (leave repository_name empty)",
                self.replica_metadata,
            )
        assert self.control is not None
        return self.control

    async def RepositoryIndex(self, request, context):
        control = await self._control(request, context)
        entry = pb.RepositoryIndexResponse.ModelIndex
        rows = await control.index(request.ready)
        return pb.RepositoryIndexResponse(
            models=[
                entry(name=name, version=version, state=state, reason=reason) for name, version, state, reason in rows
            ]
        )

    async def RepositoryModelLoad(self, request, context):
        control = await self._control(request, context)
        parameters = {
            key: getattr(p, p.WhichOneof("parameter_choice") or "string_param") for key, p in request.parameters.items()
        }
        try:
            await control.load(request.model_name, parameters)
        except InferenceHubError as exc:
            log.warning("RepositoryModelLoad %s: %s: %s", request.model_name, exc.status.name, exc)
            await context.abort(exc.status, str(exc), self.replica_metadata)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        control = await self._control(request, context)
        try:
            await control.unload(request.model_name)
        except InferenceHubError as exc:
            log.warning("RepositoryModelUnload %s: %s: %s", request.model_name, exc.status.name, exc)
            await context.abort(exc.status, str(exc), self.replica_metadata)
        return pb.RepositoryModelUnloadResponse()

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext):
        start = time.perf_counter()
        timing = Timing(received=time.perf_counter_ns())
        served = self.engine.models.get(request.model_name)
        if served is not None and request.model_version:
            served = self.engine.versions.get(request.model_name, {}).get(request.model_version)
        model = UNKNOWN_MODEL if served is None else request.model_name
        token = logs.request_id.set(caller_request_id(context, request.id))
        span = None if self.tracing is None else self._start_span(context)
        children = self._metrics_for(model)
        in_flight = children.in_flight
        in_flight.inc()
        share = self.load.begin(model)
        context.set_trailing_metadata(self.replica_metadata)
        try:
            remaining = context.time_remaining()
            deadline = None if remaining is None else asyncio.get_running_loop().time() + remaining
            response = await pipeline.infer(self.engine, request, deadline, timing)
        except InferenceHubError as exc:
            code, message = exc.status, str(exc)
            log.warning("ModelInfer %s: %s: %s", request.model_name, code.name, exc)
        except asyncio.CancelledError:
            self.load.end(share, None)
            children.count(grpc.StatusCode.CANCELLED, start)
            if span is not None:
                span.end()
            raise
        except Exception:
            code, message = grpc.StatusCode.INTERNAL, "internal error; the replica's log has the details"
            log.exception("ModelInfer %s failed", request.model_name)
        else:
            code, message = grpc.StatusCode.OK, ""
        finally:
            in_flight.dec()
            logs.request_id.reset(token)
        # Counted before the caller hears the outcome, so a scrape right after a call sees it.
        self.load.end(share, code)
        children.count(code, start)
        if served is not None and served.stats is not None:
            if code is grpc.StatusCode.OK:
                served.stats.succeeded(timing, time.perf_counter_ns())
            else:
                served.stats.failed(timing, time.perf_counter_ns())
        if span is not None:
            self._end_span(span, timing, code)
        if code is grpc.StatusCode.OK:
            return response
        await context.abort(code, message, self.replica_metadata)

    def _start_span(self, context: grpc.aio.ServicerContext):
        """The replica's server span, continuing the caller's trace from the gRPC metadata."""
        assert self.tracing is not None
        parent = self.tracing.extract(dict(context.invocation_metadata() or ()))
        span = self.tracing.tracer.start_span(
            "ModelInfer", parent, kind=self.tracing.SERVER, attributes={REPLICA_ATTRIBUTE: self.replica}
        )
        logs.trace_id.set(self.tracing.trace_id(span))  # this call's task has a context of its own
        return span

    def _end_span(self, span, timing: Timing, code: grpc.StatusCode) -> None:
        assert self.tracing is not None
        from opentelemetry.trace import Status, StatusCode

        replica_spans(self.tracing, span, timing)
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code is not grpc.StatusCode.OK:
            span.set_status(Status(StatusCode.ERROR, code.name))
        span.end()
