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

import re
from typing import Any

import msgspec
import numpy as np
import orjson
from msgspec import UNSET

from inferencehub.errors import InvalidInput
from inferencehub.gateway.schema import (
    REQUEST_DECODER,
    InputParameters,
    OutputParameters,
    RequestInput,
    RequestParameters,
)
from inferencehub.metadata import HEADER_LENGTH
from inferencehub.oip.plan import OutputPlan
from inferencehub.protocol.inference import grpc_predict_v2_pb2 as pb
from inferencehub.tensors import DATATYPES, Datatype, deserialize_bytes, element_count, serialize_bytes, to_raw

JSON_KINDS = {"BOOL": "b", "FP16": "iuf", "FP32": "iuf", "FP64": "iuf"}  # numpy kinds each datatype accepts
KIND_WORDS = {"b": "true/false", "iu": "integers", "iuf": "numbers"}


def _set_parameters(params: dict[str, Any], target) -> None:
    """Copy JSON parameters (already typed by the schema) into a protobuf parameter map."""
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
        else:
            param.string_param = item


def _known(params: dict[str, Any], kind: type[msgspec.Struct], what: str):
    """The parameters this API gives a meaning to, checked against their types in the schema."""
    try:
        return msgspec.convert(params, kind)
    except msgspec.ValidationError as exc:
        raise InvalidInput(f"{what} parameters: {_where(exc, '$')}") from None


def _where(exc: msgspec.MsgspecError, root: str) -> str:
    """msgspec's message with its JSON path made readable ("... - at `$.inputs[0]`" -> "... at inputs[0]")."""
    message, _, path = str(exc).partition(" - at ")
    path = path.strip("`").removeprefix(root).lstrip(".")
    return f"{message} at {path}" if path else message


def _tensor_named(exc: msgspec.ValidationError, document: bytes) -> str:
    """For an error inside inputs[i] or outputs[i], the tensor's name, if it has one (errors only: re-reads)."""
    found = re.search(r"\$\.(inputs|outputs)\[(\d+)\]", str(exc))
    if found is None:
        return ""
    try:
        name = orjson.loads(document)[found.group(1)][int(found.group(2))]["name"]
    except (orjson.JSONDecodeError, LookupError, TypeError):
        return ""
    kind = found.group(1)[:-1]
    return f" ({kind} '{name}')" if isinstance(name, str) else ""


def parse_header_length(value: str | None, body_length: int) -> int | None:
    if value is None:
        return None
    if not value.isascii() or not value.isdigit():
        raise InvalidInput(f"{HEADER_LENGTH} must be a non-negative integer")
    length = int(value)
    if length > body_length:
        raise InvalidInput(f"{HEADER_LENGTH} is {length}, but the body has {body_length} bytes")
    return length


def parse_infer_request(
    body: bytes, header_length: int | None, model: str, version: str
) -> tuple[pb.ModelInferRequest, OutputPlan]:
    json_part = body if header_length is None else body[:header_length]
    binary = memoryview(body)[header_length:] if header_length is not None else memoryview(b"")
    try:
        doc = REQUEST_DECODER.decode(json_part)
    except msgspec.ValidationError as exc:
        raise InvalidInput(f"invalid request: {_where(exc, '$')}{_tensor_named(exc, json_part)}") from None
    except msgspec.DecodeError as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None
    # Some clients (the kserve SDK) repeat the model in the body: it must agree with the path.
    if doc.model_name is not UNSET and doc.model_name != model:
        raise InvalidInput(f"request 'model_name' is {doc.model_name!r}, but the path says {model!r}")
    body_version = "" if doc.model_version is UNSET else doc.model_version
    if version and body_version and body_version != version:
        raise InvalidInput(f"request 'model_version' is {body_version!r}, but the path says {version!r}")
    version = version or body_version

    request = pb.ModelInferRequest(model_name=model, model_version=version)
    if doc.id is not UNSET:
        request.id = doc.id
    known = _known(doc.parameters, RequestParameters, "request")
    _set_parameters(doc.parameters, request.parameters)
    binary_default = known.binary_data_output is True

    offset = 0
    for item in doc.inputs:
        offset = _add_input(request, item, binary, offset)
    if offset != len(binary):
        raise InvalidInput(f"{len(binary) - offset} bytes of binary data are not claimed by any input")

    binary_outputs: dict[str, bool] = {}
    for out in doc.outputs:
        requested = request.outputs.add(name=out.name)
        out_known = _known(out.parameters, OutputParameters, f"output '{out.name}'")
        _set_parameters(out.parameters, requested.parameters)
        if out_known.binary_data is not UNSET:
            binary_outputs[out.name] = out_known.binary_data
    return request, OutputPlan(binary_default, binary_outputs)


def _add_input(request: pb.ModelInferRequest, item: RequestInput, binary: memoryview, offset: int) -> int:
    name, shape = item.name, item.shape
    count = element_count(shape, name)
    dt = DATATYPES[item.datatype]
    tensor = request.inputs.add(name=name, datatype=dt.name, shape=shape)
    size = _known(item.parameters, InputParameters, f"input '{name}'").binary_data_size
    if size is not UNSET:
        _set_parameters({k: v for k, v in item.parameters.items() if k != "binary_data_size"}, tensor.parameters)
        if item.data is not UNSET:
            raise InvalidInput(f"input '{name}': has both 'data' and 'binary_data_size'; use one")
        if offset + size > len(binary):
            raise InvalidInput(
                f"input '{name}': binary_data_size {size} runs past the end of the binary data ({len(binary)} bytes)"
            )
        raw = bytes(binary[offset : offset + size])
        _check_raw(raw, dt, shape, count, name)
        request.raw_input_contents.append(raw)
        return offset + size
    _set_parameters(item.parameters, tensor.parameters)
    if item.data is UNSET:
        raise InvalidInput(f"input '{name}': needs 'data' (or binary data with 'binary_data_size')")
    request.raw_input_contents.append(_json_data_to_raw(item.data, dt, shape, count, name))
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
