"""The Open Inference Protocol REST codec: HTTP/JSON (and binary tensor data) <-> the gRPC messages.

Requests are checked for everything that can be checked without the model (JSON
structure, datatypes, element counts against shapes, binary sizes) and always travel
upstream as raw bytes. A malformed request raises ``InvalidInput`` and never reaches
the inference service.

Binary tensor data extension: with an ``Inference-Header-Content-Length: N`` header
the first N bytes of the body are the JSON header and the rest is the tensors' raw
bytes, in input order, each input saying its size in ``parameters.binary_data_size``.
Outputs come back the same way when asked for with ``parameters.binary_data`` on an
output or ``parameters.binary_data_output`` on the request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from inferencehub.errors import InvalidInput
from inferencehub.protocol.inference import grpc_predict_v2_pb2 as pb
from inferencehub.tensors import DATATYPES, Datatype, deserialize_bytes, element_count, serialize_bytes, to_raw

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_KINDS = {"BOOL": "b", "FP16": "iuf", "FP32": "iuf", "FP64": "iuf"}  # numpy kinds each datatype accepts
KIND_WORDS = {"b": "true/false", "iu": "integers", "iuf": "numbers"}


@dataclass(frozen=True)
class OutputPlan:
    """Which outputs go back as binary data."""

    binary_default: bool
    binary: dict[str, bool]

    def is_binary(self, name: str) -> bool:
        return self.binary.get(name, self.binary_default)


def _object(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object")
    return value


def _only(doc: dict, allowed: set[str], what: str) -> None:
    unknown = sorted(set(doc) - allowed)
    if unknown:
        raise InvalidInput(f"{what} has unknown field '{unknown[0]}' (expected some of {', '.join(sorted(allowed))})")


def _parameters(value: Any, what: str, target) -> dict:
    params = _object(value, f"{what} parameters")
    for key, item in params.items():
        param = target[key]
        if isinstance(item, bool):
            param.bool_param = item
        elif isinstance(item, int):
            if item >= 2**63:
                param.uint64_param = item
            else:
                param.int64_param = item
        elif isinstance(item, float):
            param.double_param = item
        elif isinstance(item, str):
            param.string_param = item
        else:
            raise InvalidInput(f"{what} parameter '{key}' must be a boolean, number or string")
    return params


def parse_header_length(value: str | None, body_length: int) -> int | None:
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        raise InvalidInput(f"{HEADER_LENGTH} must be an integer, got {value!r}") from None
    if not 0 <= length <= body_length:
        raise InvalidInput(f"{HEADER_LENGTH} is {length}, but the body has {body_length} bytes")
    return length


def parse_infer_request(
    body: bytes, header_length: int | None, model: str, version: str
) -> tuple[pb.ModelInferRequest, OutputPlan]:
    json_part = body if header_length is None else body[:header_length]
    binary = memoryview(body)[header_length:] if header_length is not None else memoryview(b"")
    try:
        doc = orjson.loads(json_part)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None
    doc = _object(doc, "the request body")
    _only(doc, {"id", "parameters", "inputs", "outputs", "model_name", "model_version"}, "the request")
    # Some clients (the kserve SDK) repeat the model in the body: it must agree with the path.
    if "model_name" in doc and doc["model_name"] != model:
        raise InvalidInput(f"request 'model_name' is {doc['model_name']!r}, but the path says {model!r}")
    body_version = doc.get("model_version", "")
    if not isinstance(body_version, str) or (version and body_version and body_version != version):
        raise InvalidInput(f"request 'model_version' is {body_version!r}, but the path says {version!r}")
    version = version or body_version

    request = pb.ModelInferRequest(model_name=model, model_version=version)
    if "id" in doc:
        if not isinstance(doc["id"], str):
            raise InvalidInput("request 'id' must be a string")
        request.id = doc["id"]
    params = _parameters(doc.get("parameters", {}), "request", request.parameters)
    binary_default = params.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise InvalidInput("request parameter 'binary_data_output' must be true or false")

    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput("request 'inputs' must be a non-empty list of tensors")
    offset = 0
    for i, item in enumerate(inputs):
        offset = _add_input(request, _object(item, f"inputs[{i}]"), i, binary, offset)
    if offset != len(binary):
        raise InvalidInput(f"{len(binary) - offset} bytes of binary data are not claimed by any input")

    binary_outputs: dict[str, bool] = {}
    outputs = doc.get("outputs", [])
    if not isinstance(outputs, list):
        raise InvalidInput("request 'outputs' must be a list")
    for i, item in enumerate(outputs):
        out = _object(item, f"outputs[{i}]")
        _only(out, {"name", "parameters"}, f"outputs[{i}]")
        name = out.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidInput(f"outputs[{i}] needs a 'name' string")
        requested = request.outputs.add(name=name)
        out_params = _parameters(out.get("parameters", {}), f"output '{name}'", requested.parameters)
        if "binary_data" in out_params:
            if not isinstance(out_params["binary_data"], bool):
                raise InvalidInput(f"output '{name}' parameter 'binary_data' must be true or false")
            binary_outputs[name] = out_params["binary_data"]
    return request, OutputPlan(binary_default, binary_outputs)


def _add_input(request: pb.ModelInferRequest, item: dict, i: int, binary: memoryview, offset: int) -> int:
    _only(item, {"name", "shape", "datatype", "parameters", "data"}, f"inputs[{i}]")
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"inputs[{i}] needs a 'name' string")
    shape = item.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise InvalidInput(f"input '{name}': 'shape' must be a list of integers")
    count = element_count(shape, name)
    dtype_name = item.get("datatype")
    if not isinstance(dtype_name, str) or dtype_name not in DATATYPES:
        raise InvalidInput(
            f"input '{name}': unsupported datatype {dtype_name!r}, expected one of {', '.join(DATATYPES)}"
        )
    dt = DATATYPES[dtype_name]
    tensor = request.inputs.add(name=name, datatype=dt.name, shape=shape)
    params = _parameters(item.get("parameters", {}), f"input '{name}'", tensor.parameters)
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        del tensor.parameters["binary_data_size"]
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidInput(f"input '{name}': 'binary_data_size' must be a non-negative integer")
        if "data" in item:
            raise InvalidInput(f"input '{name}': has both 'data' and 'binary_data_size'; use one")
        if offset + size > len(binary):
            raise InvalidInput(
                f"input '{name}': binary_data_size {size} runs past the end of the binary data ({len(binary)} bytes)"
            )
        raw = bytes(binary[offset : offset + size])
        _check_raw(raw, dt, shape, count, name)
        request.raw_input_contents.append(raw)
        return offset + size
    if "data" not in item:
        raise InvalidInput(f"input '{name}': needs 'data' (or binary data with 'binary_data_size')")
    request.raw_input_contents.append(_json_data_to_raw(item["data"], dt, shape, count, name))
    return offset


def _check_raw(raw: bytes, dt: Datatype, shape: list[int], count: int, name: str) -> None:
    if dt.name == "BYTES":
        deserialize_bytes(raw, count, name)
    elif len(raw) != count * dt.dtype.itemsize:
        raise InvalidInput(
            f"input '{name}': binary data has {len(raw)} bytes, expected {count * dt.dtype.itemsize} "
            f"for {dt.name} with shape {shape}"
        )


def _flatten(data: Any, out: list) -> None:
    if isinstance(data, list):
        for item in data:
            _flatten(item, out)
    else:
        out.append(data)


def _json_data_to_raw(data: Any, dt: Datatype, shape: list[int], count: int, name: str) -> bytes:
    if dt.name == "BYTES":
        flat: list = []
        _flatten(data, flat)
        if not all(isinstance(v, str) for v in flat):
            raise InvalidInput(f"input '{name}': BYTES data must be strings")
        if len(flat) != count:
            raise InvalidInput(f"input '{name}': has {len(flat)} elements, expected {count} for shape {shape}")
        return serialize_bytes(np.array(flat, dtype=object))
    try:
        array = np.asarray(data)
    except (ValueError, TypeError):
        raise InvalidInput(f"input '{name}': 'data' is not a rectangular array") from None
    if array.size != count:
        raise InvalidInput(f"input '{name}': has {array.size} elements, expected {count} for shape {shape}")
    if array.ndim > 1 and list(array.shape) != shape:
        raise InvalidInput(f"input '{name}': nested data has shape {list(array.shape)}, but 'shape' says {shape}")
    kinds = JSON_KINDS.get(dt.name, "iu")
    if not count:
        return b""
    if kinds != "iu":
        if array.dtype.kind not in kinds:
            raise InvalidInput(f"input '{name}': {dt.name} data must be {KIND_WORDS[kinds]}")
        return np.ascontiguousarray(array, dtype=dt.dtype).tobytes()
    if array.dtype.kind not in "iu":
        # Mixed int64 and uint64-range integers make numpy guess float64 or object: check them as Python ints.
        values: list = []
        _flatten(data, values)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise InvalidInput(f"input '{name}': {dt.name} data must be integers")
        low, high = min(values), max(values)
        array = np.array(values, dtype=object)
    else:
        low, high = int(array.min()), int(array.max())
    info = np.iinfo(dt.dtype)
    if low < info.min or high > info.max:
        raise InvalidInput(f"input '{name}': values do not fit {dt.name} ({info.min} to {info.max})")
    return np.ascontiguousarray(array, dtype=dt.dtype).tobytes()


def _output_array(response: pb.ModelInferResponse, i: int, dt: Datatype, shape: list[int], name: str) -> np.ndarray:
    if i < len(response.raw_output_contents):
        raw = response.raw_output_contents[i]
        count = element_count(shape, name)
        if dt.name == "BYTES":
            return deserialize_bytes(raw, count, name)
        return np.frombuffer(raw, dtype=dt.dtype)
    contents = response.outputs[i].contents
    return np.asarray(list(getattr(contents, dt.contents_field or "bytes_contents")), dtype=dt.dtype)


def _json_strings(array: np.ndarray, name: str) -> list[str]:
    """BYTES elements as JSON strings, exactly: bytes that are not UTF-8 are refused, never altered."""
    try:
        return [v.decode("utf-8") for v in array]
    except UnicodeDecodeError:
        raise InvalidInput(
            f"output '{name}' holds bytes that are not valid UTF-8, which a JSON string cannot carry exactly; "
            f"ask for it as binary data (output parameter 'binary_data': true, or 'binary_data_output': true)"
        ) from None


def render_infer_response(response: pb.ModelInferResponse, plan: OutputPlan) -> tuple[bytes, dict[str, str]]:
    """The HTTP body and headers for an inference response."""
    doc: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        doc["id"] = response.id
    outputs = []
    blobs: list[bytes] = []
    for i, tensor in enumerate(response.outputs):
        dt = DATATYPES[tensor.datatype]
        shape = list(tensor.shape)
        out: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": shape}
        if plan.is_binary(tensor.name):
            raw = (
                response.raw_output_contents[i]
                if i < len(response.raw_output_contents)
                else to_raw(_output_array(response, i, dt, shape, tensor.name), dt)
            )
            out["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            array = _output_array(response, i, dt, shape, tensor.name)
            if dt.name == "BYTES":
                out["data"] = _json_strings(array, tensor.name)
            else:
                out["data"] = array
        outputs.append(out)
    doc["outputs"] = outputs
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, {"Content-Type": "application/json"}
    return b"".join([header, *blobs]), {
        "Content-Type": "application/octet-stream",
        HEADER_LENGTH: str(len(header)),
    }


def model_metadata_json(metadata: pb.ModelMetadataResponse) -> dict[str, Any]:
    def tensors(items) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in items]

    return {
        "name": metadata.name,
        "versions": list(metadata.versions),
        "platform": metadata.platform,
        "inputs": tensors(metadata.inputs),
        "outputs": tensors(metadata.outputs),
    }


def model_config_json(config: pb.ModelConfig) -> dict[str, Any]:
    """Triton's model configuration as JSON, the way Triton's HTTP API writes it."""

    def tensors(items) -> list[dict[str, Any]]:
        return [{"name": t.name, "data_type": pb.DataType.Name(t.data_type), "dims": list(t.dims)} for t in items]

    doc: dict[str, Any] = {
        "name": config.name,
        "platform": config.platform,
        "backend": config.backend,
        "max_batch_size": config.max_batch_size,
        "input": tensors(config.input),
        "output": tensors(config.output),
    }
    if config.HasField("dynamic_batching"):
        doc["dynamic_batching"] = {
            "preferred_batch_size": list(config.dynamic_batching.preferred_batch_size),
            "max_queue_delay_microseconds": config.dynamic_batching.max_queue_delay_microseconds,
        }
    return doc
