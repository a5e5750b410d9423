"""``ModelStreamInfer``: a decoupled (generative) model's responses, streamed with Triton's semantics.

One bidirectional call carries any number of requests; each is answered by one or more
``ModelStreamInferResponse`` messages whose ``infer_response.id`` is the request's id. The last one
carries the response parameter ``triton_final_response`` (true) and the model's final parameters (the mock
LLM's ``finish_reason``, ``prompt_tokens``, ``completion_tokens``). A request with the parameter
``triton_enable_empty_final_response`` true gets the model's responses without the flag and then an empty
final response (no outputs) carrying it and the final parameters, as Triton does. A generator that ends
without marking a response final is followed by an empty final response in either case (the only way to say
it ended). A request on a model that is not decoupled gets its one response, marked final.

An error for one request (bad input, unknown model, overload, a model failure mid-generation) is a
``ModelStreamInferResponse`` with ``error_message`` (and ``infer_response`` holding the request's id, the
final flag and the parameter ``error_code``: the gRPC status name, such as ``INVALID_ARGUMENT``); the call
stays open for further requests. The call's own status is kept for whole-call failures:
``DEADLINE_EXCEEDED`` (the deadline covers the whole call, every generation in it),
``UNAVAILABLE`` for a call that arrives while the replica drains (it goes elsewhere), ``CANCELLED``.

The replica names itself (``x-inferencehub-replica``) in the call's initial metadata, sent with its first
response, so the gateway can put the name on a streamed answer's headers before the stream ends; the trailers
carry it too, with the load report, as for unary calls (a call refused before any response has only those).

Guarantees:
- pacing: each response is written with ``await context.write`` (one write at a time per call), and the
  generator is resumed only after its previous response was written, so between a model and its reader
  there is at most one response on the replica's side, plus what gRPC's transport accepts: the reader's
  HTTP/2 flow-control window and the sockets' buffers (docs/api.md, "Streaming", gives the numbers);
- a caller that hangs up or cancels, or a deadline that passes, cancels the call's task: each generation's
  task is cancelled at its ``await`` and its generator closed at once (``aclose``); nothing more is computed
  (a plain generator's step already running in the thread pool finishes, then the generator is closed);
  each such generation counts in ``inferencehub_inference_streams_cancelled``;
- admission and balancing: a generation holds one of its model's execution slots from start to end
  (``ModelScheduler.hold``), so open streams count against ``max_concurrency`` and the queue, as busy slots
  in the ORCA load report and as in flight (``LoadReporter.begin``/``end``), like unary calls;
- shutdown: a call that arrives once the replica drains is refused with UNAVAILABLE, and so is a new request on
  an open call (in the stream, which stays open); open generations continue and have the grace period to finish
  (then they are cancelled, as above).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator
from typing import Any, cast

import grpc
import numpy as np

from inferencehub import logs
from inferencehub.errors import InferenceHubError, ModelError, ModelNotReady
from inferencehub.inference import pipeline
from inferencehub.inference.engine import ServedModel, State
from inferencehub.inference.metrics import UNKNOWN_MODEL
from inferencehub.inference.servicer import InferenceServicer, caller_request_id
from inferencehub.inference.statistics import Timing
from inferencehub.metadata import REPLICA_KEY
from inferencehub.model import Model, Response
from inferencehub.oip.codec import decode_inputs, encode_outputs
from inferencehub.protocol.inference import grpc_predict_v2_pb2 as pb
from inferencehub.tracing import REPLICA_ATTRIBUTE

log = logging.getLogger(__name__)

FINAL = "triton_final_response"
EMPTY_FINAL = "triton_enable_empty_final_response"
ERROR_CODE = "error_code"
_END = object()
MAX_OPEN_PER_CALL = 256  # requests of one call answered at once; the next ones are read as these end
# The call is ended this long before its deadline, so the caller gets DEADLINE_EXCEEDED with the replica's message
# while the call is still open; at the deadline itself the transport's own ending races it (and may be a bare reset).
DEADLINE_MARGIN_SECONDS = 0.05


class CallerGone(Exception):
    """A response could not be written: the call is over (handled like cancellation)."""


Write = Callable[[pb.ModelStreamInferResponse], Awaitable[None]]


def parameter(value: bool | int | str) -> pb.InferParameter:
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        return pb.InferParameter(int64_param=value)
    return pb.InferParameter(string_param=str(value))


def _close_in(pool: concurrent.futures.Executor, generator: Generator) -> None:
    """Close a plain generator in the pool (its ``finally`` may block); inline once the pool is shut down."""
    try:
        pool.submit(generator.close)
    except RuntimeError:  # the replica is stopping
        with contextlib.suppress(Exception):
            generator.close()


def _stepped(generator: Generator, pool: concurrent.futures.Executor) -> AsyncGenerator:
    """A plain generator as an async one: each step in ``pool``; closed in the pool once no step runs."""

    async def steps() -> AsyncGenerator:
        step: concurrent.futures.Future | None = None
        try:
            while True:
                step = pool.submit(next, generator, _END)
                item = await asyncio.wrap_future(step)
                if item is _END:
                    return
                yield item
        finally:
            if step is not None and not step.done():  # cancelled mid-step: close it when the step returns
                step.add_done_callback(lambda _: _close_in(pool, generator))
            else:
                _close_in(pool, generator)

    return steps()


def responses(model: Model, inputs: dict[str, np.ndarray], pool: concurrent.futures.Executor) -> AsyncGenerator:
    """The model's responses to one request, as an async generator whatever kind of generator it wrote."""
    generator: Any = model.generate(inputs)
    if inspect.isasyncgen(generator):
        return cast(AsyncGenerator, generator)
    if inspect.isgenerator(generator):
        return _stepped(cast(Generator, generator), pool)
    raise ModelError(f"model '{model.config.name}': generate returned {type(generator).__name__}, not a generator")


class _Children:
    """One model's stream metric children, looked up once."""

    def __init__(self, servicer: StreamingServicer, model: str) -> None:
        metrics = servicer.metrics
        self.open = metrics.open_streams.labels(model)
        self.tokens = metrics.stream_tokens.labels(model)
        self.cancelled = metrics.streams_cancelled.labels(model)
        self.in_flight = metrics.in_flight.labels(model)  # an open generation is a request in flight


class StreamingServicer(InferenceServicer):
    """The inference servicer with ``ModelStreamInfer`` (the unary methods are ``InferenceServicer``'s)."""

    _stream_children: dict[str, _Children]

    def _stream_metrics(self, model: str) -> _Children:
        cache = self.__dict__.setdefault("_stream_children", {})
        children = cache.get(model)
        if children is None:
            children = cache[model] = _Children(self, model)
        return children

    async def ModelStreamInfer(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        if self.engine.state is not State.SERVING:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"replica {self.replica} is {self.engine.state.value}: not starting new streams; retry elsewhere",
                self.replica_metadata,
            )
        lock = asyncio.Lock()
        named = False

        async def write(message: pb.ModelStreamInferResponse) -> None:
            nonlocal named
            async with lock:
                try:
                    if not named:  # with the first response, which commits the call anyway
                        named = True
                        await context.send_initial_metadata(((REPLICA_KEY, self.replica),))
                    await context.write(message)
                except Exception as exc:  # the call ended under the write (the caller hung up, the deadline passed)
                    raise CallerGone(str(exc) or type(exc).__name__) from exc

        remaining = context.time_remaining()
        deadline = None if remaining is None else asyncio.get_running_loop().time() + remaining
        ends = None if deadline is None else deadline - min(DEADLINE_MARGIN_SECONDS, remaining / 10)
        tasks: set[asyncio.Task] = set()
        room = asyncio.Semaphore(MAX_OPEN_PER_CALL)
        expired = False
        try:
            async with asyncio.timeout_at(ends):
                async for request in request_iterator:
                    if self.engine.state is not State.SERVING:  # draining: what is open finishes, nothing new starts
                        await self._refuse_while_draining(write, request)
                        continue
                    # A caller with MAX_OPEN_PER_CALL requests unanswered waits (HTTP/2 flow control) to send more.
                    await room.acquire()
                    task = asyncio.create_task(self._generation(request, context, write, deadline))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    task.add_done_callback(lambda _: room.release())
                while tasks:
                    await asyncio.wait(set(tasks))
        except TimeoutError:
            expired = True
        finally:
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(set(tasks))
        if expired:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"deadline ({remaining:.3f}s) passed while streaming; generation stopped",
                self.replica_metadata,
            )
        context.set_trailing_metadata(self.replica_metadata)

    async def _generation(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext, write: Write, deadline: float | None
    ) -> None:
        """Answer one request of the stream; every outcome but cancellation is told in the stream."""
        timing = Timing(received=time.perf_counter_ns())
        token = logs.request_id.set(caller_request_id(context, request.id))
        span = None
        served: ServedModel | None = None
        try:
            served = self.engine.get(request.model_name, request.model_version)
            if self.tracing is not None:
                span = self._start_stream_span(context, served)
            if served.config.decoupled:
                await self._decoupled(request, served, write, deadline, timing)
            else:
                response = await pipeline.infer(self.engine, request, deadline, timing)
                response.parameters[FINAL].bool_param = True
                await write(pb.ModelStreamInferResponse(infer_response=response))
        except InferenceHubError as exc:
            log.warning("ModelStreamInfer %s: %s: %s", request.model_name, exc.status.name, exc)
            await self._error(write, request, served, exc.status, str(exc))
            self._finish(served, timing, span, exc.status)
        except asyncio.CancelledError:
            self._finish(served, timing, span, grpc.StatusCode.CANCELLED)
            raise
        except CallerGone:
            self._finish(served, timing, span, grpc.StatusCode.CANCELLED)
        except Exception:
            log.exception("ModelStreamInfer %s failed", request.model_name)
            code = grpc.StatusCode.INTERNAL
            await self._error(write, request, served, code, "internal error; the replica's log has the details")
            self._finish(served, timing, span, code)
        else:
            self._finish(served, timing, span, grpc.StatusCode.OK)
        finally:
            logs.request_id.reset(token)

    async def _decoupled(
        self,
        request: pb.ModelInferRequest,
        served: ServedModel,
        write: Write,
        deadline: float | None,
        timing: Timing,
    ) -> None:
        config = served.config
        inputs, specs = decode_inputs(request, served.signature)
        timing.decoded = time.perf_counter_ns()
        empty_final = request.parameters[EMPTY_FINAL].bool_param if EMPTY_FINAL in request.parameters else False
        raw = bool(request.raw_input_contents)
        if served.retired:
            served = self.engine._successor(served)
        scheduler, model = served.scheduler, served.model
        if not served.ready or scheduler is None or model is None:
            raise ModelNotReady(f"model '{config.name}' is not ready")
        children = self._stream_metrics(config.name)
        share = self.load.begin(config.name)
        try:
            release = await scheduler.hold(deadline, timing)
        except BaseException as exc:
            self.load.end(share, exc.status if isinstance(exc, InferenceHubError) else None)
            raise
        children.open.inc()
        children.in_flight.inc()
        generator = responses(model, inputs, self.engine.workers.threads)
        code: grpc.StatusCode | None = grpc.StatusCode.OK
        finished = False
        try:
            async for item in generator:
                response = item if isinstance(item, Response) else Response(item)
                arrays = [self.engine._checked_output(config, response.outputs, spec) for spec in specs]
                message = pb.ModelInferResponse(model_name=config.name, model_version=config.version, id=request.id)
                encode_outputs(message, specs, arrays, raw)
                final = response.final and not empty_final
                if final or not response.final:
                    for key, value in response.parameters.items():
                        message.parameters[key].CopyFrom(parameter(value))
                message.parameters[FINAL].bool_param = final
                await write(pb.ModelStreamInferResponse(infer_response=message))
                children.tokens.inc()
                if response.final:
                    finished = True
                    break
            timing.finished = time.perf_counter_ns()
            if not finished or empty_final:
                message = pb.ModelInferResponse(model_name=config.name, model_version=config.version, id=request.id)
                if finished:
                    for key, value in response.parameters.items():
                        message.parameters[key].CopyFrom(parameter(value))
                message.parameters[FINAL].bool_param = True
                await write(pb.ModelStreamInferResponse(infer_response=message))
            finished = True
        except (asyncio.CancelledError, CallerGone):
            code = None
            children.cancelled.inc()
            raise
        except InferenceHubError as exc:
            code = exc.status
            raise
        except Exception as exc:
            code = grpc.StatusCode.INTERNAL
            raise ModelError(f"model '{config.name}' failed while generating: {exc!r}") from exc
        finally:
            timing.finished = timing.finished or time.perf_counter_ns()
            await generator.aclose()  # at once: no further step is computed
            release()
            children.open.dec()
            children.in_flight.dec()
            self.load.end(share, code)

    async def _refuse_while_draining(self, write: Write, request: pb.ModelInferRequest) -> None:
        """A request sent on an open call once the replica drains: refused in the stream (the call stays open for
        the generations it holds), UNAVAILABLE, so that the caller sends it elsewhere."""
        state = self.engine.state.value
        message = f"replica {self.replica} is {state}: not starting new generations; send the request elsewhere"
        await self._error(write, request, None, grpc.StatusCode.UNAVAILABLE, message)
        self._finish(None, Timing(received=time.perf_counter_ns()), None, grpc.StatusCode.UNAVAILABLE)

    async def _error(
        self,
        write: Write,
        request: pb.ModelInferRequest,
        served: ServedModel | None,
        code: grpc.StatusCode,
        message: str,
    ) -> None:
        response = pb.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version, id=request.id
        )
        if served is not None:
            response.model_name, response.model_version = served.config.name, served.config.version
        response.parameters[FINAL].bool_param = True
        response.parameters[ERROR_CODE].string_param = code.name
        with contextlib.suppress(Exception):  # the caller may be gone; the call's end is told by gRPC then
            await write(pb.ModelStreamInferResponse(error_message=message, infer_response=response))

    def _finish(self, served: ServedModel | None, timing: Timing, span, code: grpc.StatusCode) -> None:
        done = time.perf_counter_ns()
        # One request in inferencehub_inference_requests_total, with its outcome, as a ModelInfer call (and as
        # Triton counts every request, streamed or not); the duration histogram stays unary calls' latency.
        self._metrics_for(UNKNOWN_MODEL if served is None else served.config.name).count(code)
        stats = served.stats if served is not None else None
        if served is not None and stats is not None:
            # A generation that succeeds is one inference and one execution (as a unary model call that returns):
            # its compute time runs from its first step to its last response written (the reader's pace included).
            # Unary requests were counted by the scheduler.
            if served.config.decoupled and timing.started and code is grpc.StatusCode.OK:
                stats.executed(1, 1, timing.dispatched, timing.started, timing.finished or done, done)
            if code is grpc.StatusCode.OK:
                stats.succeeded(timing, done)
            else:
                stats.failed(timing, done)
        if span is not None:
            self._end_span(span, timing, code)

    def _start_stream_span(self, context: grpc.aio.ServicerContext, served: ServedModel):
        assert self.tracing is not None
        parent = self.tracing.extract(dict(context.invocation_metadata() or ()))
        span = self.tracing.tracer.start_span(
            "ModelStreamInfer",
            parent,
            kind=self.tracing.SERVER,
            attributes={REPLICA_ATTRIBUTE: self.replica, "inferencehub.model": served.config.name},
        )
        logs.trace_id.set(self.tracing.trace_id(span))
        return span
