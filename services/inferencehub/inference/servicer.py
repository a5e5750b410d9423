"""The Open Inference Protocol gRPC servicer: converts protobuf <-> numpy and delegates to the engine.

Errors are mapped to gRPC statuses here and only here.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import grpc
import numpy as np

import inferencehub
from inferencehub import logs
from inferencehub.errors import InferenceHubError, InvalidInput
from inferencehub.inference.engine import Engine, ServedModel
from inferencehub.inference.load_report import LoadReporter
from inferencehub.inference.metrics import UNKNOWN_MODEL, InferenceMetrics
from inferencehub.metadata import REQUEST_ID_KEY
from inferencehub.model import ModelConfig
from inferencehub.protocol.inference import grpc_predict_v2_pb2 as pb
from inferencehub.protocol.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from inferencehub.tensors import DATATYPES, from_raw, from_values, to_raw, to_values

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


def decode_inputs(request: pb.ModelInferRequest, served: ServedModel) -> dict[str, np.ndarray]:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs")
    inputs: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        shape = tuple(tensor.shape)
        spec = served.input_spec(tensor.name, tensor.datatype, shape)
        dt = DATATYPES[spec.datatype]
        given = [f.name for f, _ in tensor.contents.ListFields()]
        if raw:
            if given:
                raise InvalidInput(f"input '{tensor.name}': contents and raw_input_contents are both set; use one")
            inputs[tensor.name] = from_raw(raw[i], dt, list(shape), tensor.name)
            continue
        if dt.contents_field is None:
            raise InvalidInput(f"input '{tensor.name}': {dt.name} data must be sent in raw_input_contents")
        if given and given != [dt.contents_field]:
            raise InvalidInput(
                f"input '{tensor.name}': datatype {dt.name} takes contents.{dt.contents_field}, got {', '.join(given)}"
            )
        inputs[tensor.name] = from_values(getattr(tensor.contents, dt.contents_field), dt, list(shape), tensor.name)
    served.check_complete([t.name for t in request.inputs])
    return inputs


def encode_outputs(response: pb.ModelInferResponse, specs, arrays: list[np.ndarray], raw: bool) -> None:
    # Raw replies when the request came raw (tritonclient) or a datatype has no typed field
    # (FP16); typed contents otherwise, so grpcurl users read plain numbers.
    raw = raw or any(DATATYPES[s.datatype].contents_field is None for s in specs)
    for spec, array in zip(specs, arrays, strict=True):
        dt = DATATYPES[spec.datatype]
        out = response.outputs.add(name=spec.name, datatype=spec.datatype, shape=array.shape)
        if raw:
            response.raw_output_contents.append(to_raw(array, dt))
        else:
            getattr(out.contents, dt.contents_field).extend(to_values(array, dt))


def model_config(config: ModelConfig) -> pb.ModelConfig:
    """Triton's view of a model's configuration: with batching, dims leave out the batch dimension."""
    batching = config.batching
    skip = 1 if batching else 0

    def data_type(datatype: str) -> int:
        return pb.DataType.Value("TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}")

    message = pb.ModelConfig(
        name=config.name,
        platform=config.platform,
        backend=config.runtime,
        max_batch_size=batching.max_batch_size if batching else 0,
        input=[pb.ModelInput(name=s.name, data_type=data_type(s.datatype), dims=s.shape[skip:]) for s in config.inputs],
        output=[
            pb.ModelOutput(name=s.name, data_type=data_type(s.datatype), dims=s.shape[skip:]) for s in config.outputs
        ],
    )
    if batching:
        message.dynamic_batching.preferred_batch_size.extend(batching.preferred_batch_sizes)
        message.dynamic_batching.max_queue_delay_microseconds = int(batching.max_queue_delay_ms * 1000)
    return message


def caller_request_id(context: grpc.aio.ServicerContext, request_id: str = "") -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY:
            return value
    return request_id or uuid.uuid4().hex


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self, engine: Engine, metrics: InferenceMetrics, replica: str, load: LoadReporter | None = None
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.load = load or LoadReporter(replica)

    @property
    def replica_metadata(self) -> tuple:
        # The replica's name and its load report travel in trailing metadata: initial metadata sent
        # early would commit the call, and a committed call is not retried elsewhere when this
        # replica dies mid-call.
        return self.load.trailers

    async def ServerLive(self, request, context):
        context.set_trailing_metadata(self.replica_metadata)
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
        served = await self._served(request, context)
        return pb.ModelReadyResponse(ready=self.engine.ready and served.ready)

    async def ServerMetadata(self, request, context):
        context.set_trailing_metadata(self.replica_metadata)
        return pb.ServerMetadataResponse(name="inferencehub", version=inferencehub.__version__, extensions=[])

    async def ModelMetadata(self, request, context):
        config = (await self._served(request, context)).config
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=config.name,
            versions=[config.version],
            platform=config.platform,
            inputs=[tensor(name=s.name, datatype=s.datatype, shape=s.shape) for s in config.inputs],
            outputs=[tensor(name=s.name, datatype=s.datatype, shape=s.shape) for s in config.outputs],
        )

    async def ModelConfig(self, request, context):
        config = (await self._served(request, context)).config
        return pb.ModelConfigResponse(config=model_config(config))

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext):
        start = time.perf_counter()
        model = request.model_name if request.model_name in self.engine.models else UNKNOWN_MODEL
        token = logs.request_id.set(caller_request_id(context, request.id))
        in_flight = self.metrics.in_flight.labels(model)
        in_flight.inc()
        share = self.load.begin(model)
        context.set_trailing_metadata(self.replica_metadata)
        try:
            response = await self._infer(request, context)
        except InferenceHubError as exc:
            code, message = exc.status, str(exc)
            log.warning("ModelInfer %s: %s: %s", request.model_name, code.name, exc)
        except asyncio.CancelledError:
            self.load.end(share, None)
            self._count(model, grpc.StatusCode.CANCELLED, start)
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
        self._count(model, code, start)
        if code is grpc.StatusCode.OK:
            return response
        await context.abort(code, message, self.replica_metadata)

    def _count(self, model: str, code: grpc.StatusCode, start: float) -> None:
        self.metrics.requests.labels(model, code.name).inc()
        self.metrics.duration.labels(model).observe(time.perf_counter() - start)

    async def _infer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        served = self.engine.get(request.model_name, request.model_version)
        inputs = decode_inputs(request, served)
        specs = served.output_specs([o.name for o in request.outputs])
        remaining = context.time_remaining()
        deadline = None if remaining is None else asyncio.get_running_loop().time() + remaining
        arrays = await self.engine.infer(served, inputs, specs, deadline)
        response = pb.ModelInferResponse(
            model_name=served.config.name, model_version=served.config.version, id=request.id
        )
        encode_outputs(response, specs, arrays, raw=bool(request.raw_input_contents))
        return response
