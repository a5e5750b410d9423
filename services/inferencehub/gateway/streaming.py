"""One client stream = one upstream ``ModelStreamInfer`` call, relayed response by response.

Shared by the Triton generate routes (``gateway.generate``) and the OpenAI-compatible ones (``gateway.openai_api``):

- The call goes over the same load-balanced channel as unary calls (``Upstream``): gRPC's balancer picks the
  replica, which counts the open stream as in flight in its load reports. One request is written on it, then
  the replica's responses are read until the one flagged ``triton_final_response``.
- The client's deadline (``X-InferenceHub-Deadline-Ms``, at most ``--max-deadline-seconds``) is the call's gRPC
  deadline: it covers the whole stream, not each response.
- A client that hangs up cancels the call at once (``GatewayConnection.on_lost``): gRPC resets the HTTP/2 stream
  and the replica's handler is cancelled; nothing waits for the next token to notice.
- Pacing: the next response is read from the replica only after the previous event was written and the socket
  drained below its high-water mark, so a slow reader holds at most the socket's write buffer (64 KiB) and one
  event in the gateway, plus what the gRPC stream's flow-control window lets the replica send ahead; the replica
  then blocks in its own write (see docs/streaming.md).
- Failures before the first response raise ``UpstreamError`` (an HTTP error status); after it, the caller writes
  them as the stream's last event.
- The answer's headers name the replica (``x-inferencehub-replica``), as a unary answer's do: the replica sends
  its name in the call's initial metadata, with its first response, so it is known before the headers go out.
- Metrics: open streams, time to first token, time per output token (each gap between two tokens), output tokens;
  the live page's stream panel (``StreamWindow``); a client span ``upstream ModelStreamInfer`` when tracing is on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from inferencehub import logs
from inferencehub.buckets import LATENCY_BUCKETS
from inferencehub.errors import InvalidInput
from inferencehub.gateway import rest, sse
from inferencehub.gateway.connections import GatewayConnection
from inferencehub.gateway.http_errors import upstream_error
from inferencehub.gateway.keys import METRICS, STATE, TRACING, UPSTREAM
from inferencehub.gateway.status import percentiles_ms
from inferencehub.gateway.upstream import UpstreamError
from inferencehub.metadata import REPLICA_KEY, REQUEST_ID_HEADER, REQUEST_ID_KEY
from inferencehub.protocol.inference import grpc_predict_v2_pb2 as pb
from inferencehub.tracing import REPLICA_ATTRIBUTE

METHOD = "ModelStreamInfer"
FINAL = "triton_final_response"
TEXT_OUTPUT = "text_output"
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
WINDOW_SECONDS = 60
SHUT_DOWN_MARGIN = 0.5  # seconds before the end of the grace period that open streams get their last event
SHUT_DOWN = "the gateway shut down before the stream ended (its --grace-seconds ran out); retry"


class StreamMetrics:
    """The gateway's stream metrics, named in the streaming contract."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.open = Gauge(
            "inferencehub_gateway_open_streams",
            "Client streams (generate, generate_stream, OpenAI completions) open now, by model.",
            ["model"],
            registry=registry,
            multiprocess_mode="livesum",  # with --workers: the whole gateway's, as its other gauges
        )
        self.first_token = Histogram(
            "inferencehub_gateway_time_to_first_token_seconds",
            "From a stream's request reaching the gateway to its first token from the replica, by model.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.per_token = Histogram(
            "inferencehub_gateway_time_per_output_token_seconds",
            "Time between two consecutive tokens of a stream, as the gateway receives them, by model.",
            ["model"],
            buckets=TOKEN_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter(
            "inferencehub_gateway_output_tokens",
            "Tokens (responses with output) relayed to clients, by model; tokens a second is its rate.",
            ["model"],
            registry=registry,
        )


class StreamWindow:
    """The last minute of streams for the live page: started, failed, tokens, and time-to-first-token samples."""

    def __init__(self) -> None:
        self.seconds: dict[int, list] = {}  # second -> [started, failed, tokens, [ttft...]]
        self.open = 0

    def _bucket(self) -> list:
        now = int(time.monotonic())
        bucket = self.seconds.get(now)
        if bucket is None:
            for old in [s for s in self.seconds if s <= now - WINDOW_SECONDS]:
                del self.seconds[old]
            bucket = self.seconds[now] = [0, 0, 0, []]
        return bucket

    def started(self) -> None:
        self._bucket()[0] += 1

    def failed(self) -> None:
        self._bucket()[1] += 1

    def token(self) -> None:
        self._bucket()[2] += 1

    def first_token(self, seconds: float) -> None:
        samples = self._bucket()[3]
        if len(samples) < 1000:
            samples.append(seconds)

    def part(self) -> dict[str, Any]:
        """This process's last minute: counts and time-to-first-token samples (seconds), to be summed with other
        workers' parts (``summary``)."""
        now = int(time.monotonic())
        recent = [b for s, b in self.seconds.items() if now - WINDOW_SECONDS < s <= now]
        return {
            "open": self.open,
            "started": sum(b[0] for b in recent),
            "errors": sum(b[1] for b in recent),
            "tokens": sum(b[2] for b in recent),
            "first_token_seconds": [t for b in recent for t in b[3]],
        }


def summary(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The live page's stream panel (``/status.json`` ``streams``) from one or more processes' ``part()``s."""
    tokens = sum(p["tokens"] for p in parts)
    return {
        "open": sum(p["open"] for p in parts),
        "started": sum(p["started"] for p in parts),
        "errors": sum(p["errors"] for p in parts),
        "tokens": tokens,
        "tokens_per_second": tokens / WINDOW_SECONDS,
        "time_to_first_token_ms": percentiles_ms([t for p in parts for t in p["first_token_seconds"]], "p50", "p99"),
    }


@dataclass
class Streams:
    metrics: StreamMetrics
    window: StreamWindow = field(default_factory=StreamWindow)
    metadata: dict[tuple[str, str], tuple[float, pb.ModelMetadataResponse]] = field(default_factory=dict)
    open: set[TokenStream] = field(default_factory=set)

    def end_open_streams(self, grace: float) -> None:
        """On shutdown: streams still open near the end of the ``grace`` seconds are ended with a last error event
        (``SHUT_DOWN_MARGIN`` before aiohttp cancels their handlers and closes their connections, which would cut
        them without a word)."""
        after = max(0.0, grace - min(SHUT_DOWN_MARGIN, grace / 10))
        asyncio.get_running_loop().call_later(after, self._end_open_streams)

    def _end_open_streams(self) -> None:
        for stream in list(self.open):
            stream.shut_down()


METADATA_SECONDS = 5.0  # how long a model's metadata is reused to map JSON fields to its inputs
MAX_CACHED_MODELS = 256


async def model_metadata(request: web.Request, model: str, version: str, timeout: float) -> pb.ModelMetadataResponse:
    """The model's metadata (its inputs' datatypes), cached briefly; ``UpstreamError`` (404...) as a unary call."""
    cache = request.app[STREAMS].metadata
    key = (model, version)
    found = cache.get(key)
    now = time.monotonic()
    if found is not None and found[0] > now:
        return found[1]
    metadata, _ = await request.app[UPSTREAM].call(
        "ModelMetadata",
        pb.ModelMetadataRequest(name=model, version=version),
        request_id=logs.request_id.get(),
        timeout=timeout,
    )
    if len(cache) >= MAX_CACHED_MODELS:
        cache.clear()
    cache[key] = (now + METADATA_SECONDS, metadata)
    return metadata


STREAMS = web.AppKey("streams", Streams)


def install(app: web.Application) -> None:
    app[STREAMS] = Streams(StreamMetrics(app[METRICS].registry))


@dataclass
class Piece:
    """One response of the stream: its outputs as JSON values, its parameters, and whether it is the last."""

    model_name: str
    model_version: str
    outputs: dict[str, Any]
    parameters: dict[str, Any]
    final: bool

    @property
    def text(self) -> str:
        value = self.outputs.get(TEXT_OUTPUT, "")
        return "".join(value) if isinstance(value, list) else str(value)


class ClientGone(ConnectionResetError):
    """The client hung up mid-stream; the upstream call was cancelled."""


def error_code(message: str) -> grpc.StatusCode:
    """The status of a request's error inside an open stream (``error_message``: text only, as in Triton's)."""
    lowered = message.lower()
    if "not found" in lowered or "unknown model" in lowered:
        return grpc.StatusCode.NOT_FOUND
    if "not ready" in lowered or "unavailable" in lowered:
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INVALID_ARGUMENT


def error_message(exc: UpstreamError) -> str:
    """What a client is told of a failure mid-stream: the words an error status would carry (the stream's own
    deadline message as it is)."""
    if exc.code is grpc.StatusCode.DEADLINE_EXCEEDED or exc.details == SHUT_DOWN:
        return exc.details
    return upstream_error(exc.code, exc.details)[1]


class TokenStream:
    """One upstream ModelStreamInfer call carrying ``message``; use as ``async with`` and call ``next()``."""

    def __init__(self, request: web.Request, message: pb.ModelInferRequest, timeout: float) -> None:
        self.request = request
        self.message = message
        self.timeout = timeout
        self.model = message.model_name
        app = request.app
        self.upstream = app[UPSTREAM]
        self.streams = app[STREAMS]
        self.tracing = app[TRACING]
        self.replica = ""
        self.started = time.perf_counter()
        self.last_token: float | None = None
        self.tokens = 0
        self.done = False
        self.hung_up = False
        self.shutting_down = False
        self.failed = False  # ended by an error (the stream's or the request's)
        self._call: Any = None
        self._closed = False
        self._span: Any = None
        self._span_cm: Any = None
        self._forget: Callable[[], Any] | None = None

    async def __aenter__(self) -> TokenStream:
        if self.request.app[STATE].draining:  # readiness already fails; anything that still arrives goes elsewhere
            raise web.HTTPServiceUnavailable(
                text="this gateway is shutting down: it takes no new streams; retry", headers={"Retry-After": "1"}
            )
        metadata: tuple = ((REQUEST_ID_KEY, logs.request_id.get()),)
        if self.tracing is not None:
            self._span_cm = self.tracing.span(f"upstream {METHOD}", kind=self.tracing.CLIENT)
            self._span = self._span_cm.__enter__()
            metadata += self.tracing.inject()
        self.upstream.refresh_tls()
        self._call = self.upstream.stub.ModelStreamInfer(timeout=self.timeout, metadata=metadata)
        protocol = self.request.protocol
        if isinstance(protocol, GatewayConnection):
            self._forget = protocol.on_lost(self._hang_up)
        self.streams.metrics.open.labels(self.model).inc()
        self.streams.open.add(self)
        self.streams.window.open += 1
        self.streams.window.started()
        try:
            await self._call.write(self.message)
            await self._call.done_writing()
        except grpc.aio.AioRpcError as exc:
            await self.__aexit__(None, None, None)
            raise self._failed(exc) from None
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    def shut_down(self) -> None:
        if not self.done:
            self.shutting_down = True
            self._call.cancel()

    def _hang_up(self) -> None:
        if not self.done:
            self.hung_up = True
            self._call.cancel()

    async def __aexit__(self, *exc_info) -> None:
        if self._call is None or self._closed:
            return
        self._closed = True
        call = self._call
        if self._forget is not None:
            self._forget()
        if not self.done:
            call.cancel()
        self.streams.metrics.open.labels(self.model).dec()
        self.streams.open.discard(self)
        self.streams.window.open -= 1
        if self._span_cm is not None:
            if self.replica:
                self._span.set_attribute(REPLICA_ATTRIBUTE, self.replica)
            self._span_cm.__exit__(*exc_info)
        if self.hung_up:
            self.upstream.metrics.upstream(METHOD, self.replica, "CANCELLED")
        elif not self.done or self.failed:
            self.streams.window.failed()

    def _error(self, code: grpc.StatusCode, details: str) -> UpstreamError:
        self.failed = True
        return UpstreamError(code, details)

    def _error_from(self, exc: grpc.aio.AioRpcError) -> UpstreamError:
        self.failed = True
        return self._failed(exc)

    def _failed(self, exc: grpc.aio.AioRpcError) -> UpstreamError:
        code = exc.code()
        self.upstream.metrics.upstream(METHOD, _replica(exc.trailing_metadata()) or self.replica, code.name)
        if self._span is not None:
            self._span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            return UpstreamError(
                code,
                f"the stream did not finish within its deadline ({self.timeout * 1000:.0f} ms, which covers "
                "the whole stream; X-InferenceHub-Deadline-Ms asks for another)",
            )
        return UpstreamError(code, exc.details() or code.name)

    async def next(self) -> Piece:
        """The next response; ``UpstreamError`` when the stream or the request failed; ``ClientGone``."""
        try:
            answer = await self._call.read()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            if self.hung_up:
                raise ClientGone("the client closed the connection") from None
            if self.shutting_down:
                self.done = True
                raise self._error(grpc.StatusCode.UNAVAILABLE, SHUT_DOWN) from None
            raise
        except grpc.aio.AioRpcError as exc:
            if self.hung_up:
                raise ClientGone("the client closed the connection") from None
            self.done = True
            if self.shutting_down:
                raise self._error(grpc.StatusCode.UNAVAILABLE, SHUT_DOWN) from None
            raise self._error_from(exc) from None
        if answer is grpc.aio.EOF:
            self.done = True
            self.upstream.metrics.upstream(METHOD, await self._replica_name(), "OK")
            raise self._error(
                grpc.StatusCode.INTERNAL, f"model '{self.model}' ended its stream without a final response"
            )
        if answer.error_message:
            self.done = True
            self._call.cancel()
            code = error_code(answer.error_message)
            self.upstream.metrics.upstream(METHOD, await self._replica_name(), code.name)
            raise self._error(code, answer.error_message)
        response = answer.infer_response
        parameters = rest.parameter_values(response.parameters)
        final = bool(parameters.pop(FINAL, False))
        try:
            outputs = rest.output_values(response)
        except InvalidInput as exc:
            self.done = True
            raise self._error(grpc.StatusCode.INTERNAL, str(exc)) from None
        now = time.perf_counter()
        metrics = self.streams.metrics
        if outputs:
            self.tokens += 1
            metrics.tokens.labels(self.model).inc()
            self.streams.window.token()
            if self.last_token is None:
                metrics.first_token.labels(self.model).observe(now - self.started)
                self.streams.window.first_token(now - self.started)
            else:
                metrics.per_token.labels(self.model).observe(now - self.last_token)
            self.last_token = now
        if not self.replica:
            self.replica = await self._replica_name()
        if final:
            self.done = True
            self.upstream.metrics.upstream(METHOD, self.replica, "OK")
        return Piece(response.model_name, response.model_version, outputs, parameters, final)

    async def _replica_name(self) -> str:
        """The serving replica's name, from the call's initial metadata (sent with its first response), or its
        trailers once it has ended."""
        call = self._call
        name = _replica(await call.initial_metadata())
        if not name and call.done():
            name = _replica(await call.trailing_metadata())
        return name


def _replica(metadata) -> str:
    for key, value in metadata or ():
        if key == REPLICA_KEY:
            return value
    return ""


async def write(request: web.Request, response: web.StreamResponse, data: bytes) -> None:
    """Write one event and wait until the socket's buffer is below its high-water mark again (the pacing)."""
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ClientGone("the client closed the connection")
    await response.write(data)
    await request.writer.drain()


async def relay(
    request: web.Request,
    stream: TokenStream,
    render: Callable[[Piece], list[bytes]],
    render_error: Callable[[UpstreamError], bytes],
    done: bytes = b"",
) -> web.StreamResponse:
    """Answer with server-sent events: ``render(piece)`` for each response, ``render_error`` for a failure after
    the first one (a final event, never a cut connection), then ``done``. A failure before the first response
    raises ``UpstreamError``, so the client gets an HTTP error status instead of an event stream."""
    piece = await stream.next()
    headers = {**sse.HEADERS, REQUEST_ID_HEADER: logs.request_id.get()}  # sent now: observe() would be too late
    if stream.replica:
        headers[REPLICA_KEY] = stream.replica
    response = web.StreamResponse(headers=headers)
    await response.prepare(request)
    try:
        while True:
            for data in render(piece):
                await write(request, response, data)
            if piece.final:
                break
            try:
                piece = await stream.next()
            except UpstreamError as exc:
                await write(request, response, render_error(exc))
                break
        if done:
            await write(request, response, done)
        await response.write_eof()
    except ConnectionError:  # ClientGone, or the write that found the socket closed
        stream.hung_up = True
    return response
