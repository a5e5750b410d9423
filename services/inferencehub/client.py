"""A small client for both front doors: the gateway (HTTP, OIP REST with binary tensor data) and an
inference replica (gRPC). Used by ``inferencehub infer`` and ``inferencehub bench``.

Requests are prepared once and sent many times, so a load test measures the system, not the client's encoding.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from inferencehub.errors import InferenceHubError, InvalidInput
from inferencehub.metadata import HEADER_LENGTH, REPLICA_KEY
from inferencehub.oip.signature import Signature
from inferencehub.tensors import DATATYPES, datatype_of, from_raw, to_raw

if TYPE_CHECKING:
    import aiohttp


@dataclass
class Outcome:
    status: str  # "200", "503", ... for HTTP; "OK", "UNAVAILABLE", ... for gRPC; "connection-error"
    ok: bool
    latency: float
    replica: str = ""
    error: str = ""
    outputs: dict[str, np.ndarray] | None = None


def to_inputs(metadata: dict, data: dict[str, Any]) -> dict[str, np.ndarray]:
    """Arrays for the model's inputs, in its datatypes, from JSON-like values or arrays; checked against the
    model's specs as the replica would check them."""
    signature = Signature.of_json(metadata)
    arrays = {}
    for name, value in data.items():
        spec = signature.input_named(name)
        dt = DATATYPES[spec.datatype]
        if dt.name == "BYTES":
            array = np.array(value, dtype=object)
            array = np.vectorize(lambda v: v.encode() if isinstance(v, str) else v, otypes=[object])(array)
        else:
            array = np.asarray(value, dtype=dt.dtype)
        signature.input(name, spec.datatype, array.shape)
        arrays[name] = array
    signature.check_complete(list(arrays))
    return arrays


def synthetic_inputs(metadata: dict, batch: int, size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for load tests: ``batch`` for the first variable dimension, ``size`` for the others."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for spec in metadata["inputs"]:
        shape = [d if d > 0 else (batch if i == 0 else size) for i, d in enumerate(spec["shape"])]
        dt = DATATYPES[spec["datatype"]]
        count = math.prod(shape)
        if dt.name == "BYTES":
            array = np.array([b"x" * 8] * count, dtype=object)
        elif dt.dtype.kind == "f":
            array = rng.random(count).astype(dt.dtype)
        elif dt.dtype.kind == "b":
            array = rng.random(count) < 0.5
        else:
            array = rng.integers(0, 100, count).astype(dt.dtype)
        arrays[spec["name"]] = array.reshape(shape)
    return arrays


class HttpTransport:
    """The gateway, over HTTP/1.1 keep-alive connections."""

    def __init__(self, url: str, timeout: float = 60.0, api_key: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session: aiohttp.ClientSession | None = None
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def __aenter__(self) -> HttpTransport:
        import aiohttp

        self._aiohttp = aiohttp
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            headers=self._headers,
        )
        return self

    def _session(self) -> aiohttp.ClientSession:
        assert self.session is not None, "open HttpTransport with `async with` first"
        return self.session

    async def __aexit__(self, *exc) -> None:
        await self._session().close()

    async def metadata(self, model: str) -> dict:
        try:
            async with self._session().get(f"{self.url}/v2/models/{model}") as response:
                payload = await response.read()
                status = response.status
        except (self._aiohttp.ClientError, TimeoutError) as exc:
            raise InferenceHubError(f"cannot reach the gateway at {self.url}: {exc or type(exc).__name__}") from None
        if status != 200:
            raise InvalidInput(f"{self.url}: {status}: {_error_text(payload)}")
        try:
            return json.loads(payload)
        except ValueError:
            raise InferenceHubError(f"{self.url} did not answer with model metadata (is it the gateway?)") from None

    def prepare(self, model: str, arrays: dict[str, np.ndarray], binary: bool = True) -> tuple[str, bytes, dict]:
        inputs, blobs = [], []
        for name, array in arrays.items():
            dt = DATATYPES[datatype_of(array)]
            tensor: dict[str, Any] = {"name": name, "shape": list(array.shape), "datatype": dt.name}
            if binary:
                raw = to_raw(array, dt)
                tensor["parameters"] = {"binary_data_size": len(raw)}
                blobs.append(raw)
            else:
                flat = array.ravel().tolist()
                tensor["data"] = [v.decode() for v in flat] if dt.name == "BYTES" else flat
            inputs.append(tensor)
        header = json.dumps({"inputs": inputs, "parameters": {"binary_data_output": binary}}).encode()
        headers = {"Content-Type": "application/octet-stream" if binary else "application/json"}
        if binary:
            headers[HEADER_LENGTH] = str(len(header))
        return f"{self.url}/v2/models/{model}/infer", b"".join([header, *blobs]), headers

    async def send(self, prepared: tuple[str, bytes, dict], decode: bool = False) -> Outcome:
        url, body, headers = prepared
        start = time.perf_counter()
        try:
            async with self._session().post(url, data=body, headers=headers) as response:
                payload = await response.read()
                latency = time.perf_counter() - start
                replica = response.headers.get(REPLICA_KEY, "")
                if response.status != 200:
                    error = _error_text(payload)
                    return Outcome(str(response.status), False, latency, replica, error)
                outputs = _decode_http(payload, response.headers.get(HEADER_LENGTH)) if decode else None
                return Outcome("200", True, latency, replica, outputs=outputs)
        except (self._aiohttp.ClientError, TimeoutError) as exc:
            return Outcome("connection-error", False, time.perf_counter() - start, error=str(exc) or type(exc).__name__)


class GrpcTransport:
    """An inference replica (or any OIP gRPC server), over one channel."""

    def __init__(self, target: str, timeout: float = 60.0) -> None:
        self.target = target
        self.timeout = timeout

    async def __aenter__(self) -> GrpcTransport:
        import grpc

        from inferencehub.protocol.inference import grpc_predict_v2_pb2 as pb
        from inferencehub.protocol.inference import grpc_predict_v2_pb2_grpc as pb_grpc

        self._grpc, self._pb = grpc, pb
        self.channel = grpc.aio.insecure_channel(
            self.target, options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
        )
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.channel.close()

    async def metadata(self, model: str) -> dict:
        try:
            reply = await self.stub.ModelMetadata(self._pb.ModelMetadataRequest(name=model), timeout=self.timeout)
        except self._grpc.aio.AioRpcError as exc:
            raise InvalidInput(f"{self.target}: {exc.code().name}: {exc.details()}") from None

        def tensors(items) -> list[dict]:
            return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in items]

        return {
            "name": reply.name,
            "versions": list(reply.versions),
            "platform": reply.platform,
            "inputs": tensors(reply.inputs),
            "outputs": tensors(reply.outputs),
        }

    def prepare(self, model: str, arrays: dict[str, np.ndarray], binary: bool = True):
        request = self._pb.ModelInferRequest(model_name=model)
        for name, array in arrays.items():
            dt = DATATYPES[datatype_of(array)]
            request.inputs.add(name=name, datatype=dt.name, shape=array.shape)
            request.raw_input_contents.append(to_raw(array, dt))
        return request

    async def send(self, request, decode: bool = False) -> Outcome:
        start = time.perf_counter()
        call = self.stub.ModelInfer(request, timeout=self.timeout)
        try:
            reply = await call
        except self._grpc.aio.AioRpcError as exc:
            return Outcome(
                exc.code().name,
                False,
                time.perf_counter() - start,
                _replica(exc.trailing_metadata()),
                exc.details() or "",
            )
        latency = time.perf_counter() - start
        replica = _replica(await call.trailing_metadata())
        outputs = None
        if decode:
            outputs = {}
            for i, out in enumerate(reply.outputs):
                dt = DATATYPES[out.datatype]
                outputs[out.name] = from_raw(reply.raw_output_contents[i], dt, list(out.shape), out.name)
        return Outcome("OK", True, latency, replica, outputs=outputs)


def transport(url: str | None, grpc_target: str | None, timeout: float = 60.0, api_key: str | None = None):
    """The gateway over HTTP (sending ``api_key`` as a bearer token), or a replica over gRPC."""
    if grpc_target:
        return GrpcTransport(grpc_target, timeout)
    return HttpTransport(url or "http://127.0.0.1:8080", timeout, api_key)


def _replica(metadata) -> str:
    return next((v for k, v in metadata or () if k == REPLICA_KEY), "")


def _error_text(payload: bytes) -> str:
    try:
        return json.loads(payload)["error"]
    except (ValueError, KeyError, TypeError):
        return payload[:200].decode(errors="replace")


def _decode_http(payload: bytes, header_length: str | None) -> dict[str, np.ndarray]:
    size = int(header_length) if header_length else len(payload)
    doc = json.loads(payload[:size])
    offset = size
    outputs = {}
    for out in doc["outputs"]:
        dt = DATATYPES[out["datatype"]]
        binary = (out.get("parameters") or {}).get("binary_data_size")
        if binary is not None:
            raw = payload[offset : offset + binary]
            offset += binary
            outputs[out["name"]] = from_raw(raw, dt, out["shape"], out["name"])
        elif dt.name == "BYTES":
            outputs[out["name"]] = np.array([v.encode() for v in out["data"]], dtype=object).reshape(out["shape"])
        else:
            outputs[out["name"]] = np.asarray(out["data"], dtype=dt.dtype).reshape(out["shape"])
    return outputs
