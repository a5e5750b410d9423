"""The Open Inference Protocol's tensors on the replica: ``ModelInferRequest`` inputs -> numpy arrays (checked
against the model's signature on the way), numpy outputs -> a ``ModelInferResponse``.

Requests may carry their inputs raw (``raw_input_contents``, what tritonclient and the gateway send) or as typed
``contents`` (grpcurl, hand-written clients); responses go back raw when the request came raw or a datatype has no
typed field (FP16), typed otherwise, so grpcurl users read plain numbers.
"""

from __future__ import annotations

import numpy as np

from inferencehub.errors import InvalidInput
from inferencehub.model import TensorSpec
from inferencehub.oip.signature import Signature
from inferencehub.protocol.inference import grpc_predict_v2_pb2 as pb
from inferencehub.tensors import DATATYPES, from_raw, from_values, to_raw, to_values


def decode_inputs(
    request: pb.ModelInferRequest, signature: Signature
) -> tuple[dict[str, np.ndarray], list[TensorSpec]]:
    """The request's inputs as arrays, and the outputs to return: ``Signature.check``'s checks, in its order, each
    input decoded right after its own check (so a request with several faults is told the first one)."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs")
    inputs: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        shape = list(tensor.shape)
        dt = DATATYPES[signature.input(tensor.name, tensor.datatype, shape).datatype]
        given = [f.name for f, _ in tensor.contents.ListFields()]
        if raw:
            if given:
                raise InvalidInput(f"input '{tensor.name}': contents and raw_input_contents are both set; use one")
            inputs[tensor.name] = from_raw(raw[i], dt, shape, tensor.name)
            continue
        if dt.contents_field is None:
            raise InvalidInput(f"input '{tensor.name}': {dt.name} data must be sent in raw_input_contents")
        if given and given != [dt.contents_field]:
            raise InvalidInput(
                f"input '{tensor.name}': datatype {dt.name} takes contents.{dt.contents_field}, got {', '.join(given)}"
            )
        inputs[tensor.name] = from_values(getattr(tensor.contents, dt.contents_field), dt, shape, tensor.name)
    signature.check_complete([t.name for t in request.inputs])
    return inputs, signature.output_specs([o.name for o in request.outputs])


def encode_outputs(response: pb.ModelInferResponse, specs, arrays: list[np.ndarray], raw: bool) -> None:
    """Add the outputs to ``response``: raw when asked for (or a datatype has no typed field), typed otherwise."""
    raw = raw or any(DATATYPES[s.datatype].contents_field is None for s in specs)
    for spec, array in zip(specs, arrays, strict=True):
        dt = DATATYPES[spec.datatype]
        out = response.outputs.add(name=spec.name, datatype=spec.datatype, shape=array.shape)
        if raw:
            response.raw_output_contents.append(to_raw(array, dt))
        else:
            assert dt.contents_field is not None  # raw otherwise
            getattr(out.contents, dt.contents_field).extend(to_values(array, dt))


def encode_response(
    request: pb.ModelInferRequest, model: str, version: str, specs, arrays: list[np.ndarray]
) -> pb.ModelInferResponse:
    """The answer to ``request``: its id, the model and version that ran it, the outputs in the request's form."""
    response = pb.ModelInferResponse(model_name=model, model_version=version, id=request.id)
    encode_outputs(response, specs, arrays, raw=bool(request.raw_input_contents))
    return response
