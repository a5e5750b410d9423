"""Coalescing's pure parts: which requests may travel as one ``ModelInfer``, merging them into one request
(inputs concatenated along the first dimension), and splitting the one response back by rows.

The gateway's ``Coalescer`` decides when groups go and what happens on failure; everything here is a function of
the messages alone.
"""

from __future__ import annotations

import itertools
import math
import struct
from collections.abc import Sequence
from typing import Protocol

from inferencehub.protocol.inference import grpc_predict_v2_pb2 as pb
from inferencehub.tensors import DATATYPES


class Part(Protocol):
    """A request in a group: its message and its rows (the first dimension of every input)."""

    message: pb.ModelInferRequest
    rows: int


def coalescing_key(message: pb.ModelInferRequest) -> tuple[tuple, int] | None:
    """What a request must share with others to travel with them, and its rows; None if it must go alone."""
    raw = message.raw_input_contents
    if not message.inputs or len(raw) != len(message.inputs):
        return None
    rows = -1
    inputs = []
    for tensor in message.inputs:
        shape = tensor.shape
        if not shape or (rows >= 0 and shape[0] != rows):
            return None
        rows = shape[0]
        params = _params_key(tensor.parameters) if tensor.parameters else ()
        inputs.append((tensor.name, tensor.datatype, tuple(shape[1:]), params))
    if rows < 1:
        return None
    outputs = tuple((o.name, _params_key(o.parameters) if o.parameters else ()) for o in message.outputs)
    params = _params_key(message.parameters) if message.parameters else ()
    return (tuple(inputs), outputs, params), rows


def _params_key(parameters) -> tuple:
    return tuple(sorted((name, str(value)) for name, value in parameters.items()))  # str names the kind too


def merge(members: Sequence[Part]) -> pb.ModelInferRequest:
    """One request: the members' inputs concatenated along the first dimension, in member order."""
    first = members[0].message
    merged = pb.ModelInferRequest(model_name=first.model_name, model_version=first.model_version)
    if first.parameters:
        merged.parameters.MergeFrom(first.parameters)
    if first.outputs:
        merged.outputs.extend(first.outputs)
    total = sum(m.rows for m in members)
    for i, tensor in enumerate(first.inputs):
        added = merged.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=[total, *tensor.shape[1:]])
        if tensor.parameters:
            added.parameters.MergeFrom(tensor.parameters)
        merged.raw_input_contents.append(b"".join([m.message.raw_input_contents[i] for m in members]))
    return merged


def split(response: pb.ModelInferResponse, members: Sequence[Part]) -> list[pb.ModelInferResponse] | None:
    """Each member's own rows of a coalesced response; None if the response cannot be split by rows."""
    rows = [m.rows for m in members]
    total = sum(rows)
    raw = response.raw_output_contents
    if len(raw) != len(response.outputs):
        return None
    parts: list[list[bytes]] = []  # per output, per member
    for i, tensor in enumerate(response.outputs):
        shape = tensor.shape
        dt = DATATYPES.get(tensor.datatype)
        if dt is None or not shape or shape[0] != total:
            return None
        per_row = math.prod(shape[1:])
        data = raw[i]
        if dt.name == "BYTES":
            cuts = _bytes_cuts(data, [r * per_row for r in rows])
            if cuts is None:
                return None
        else:
            width = per_row * dt.dtype.itemsize
            if len(data) != total * width:
                return None
            cuts = [0]
            for r in rows:
                cuts.append(cuts[-1] + r * width)
        parts.append([data[a:b] for a, b in itertools.pairwise(cuts)])
    answers = []
    for j, member in enumerate(members):
        answer = pb.ModelInferResponse(
            model_name=response.model_name, model_version=response.model_version, id=member.message.id
        )
        if response.parameters:
            answer.parameters.MergeFrom(response.parameters)
        for i, tensor in enumerate(response.outputs):
            out = answer.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=[rows[j], *tensor.shape[1:]])
            if tensor.parameters:
                out.parameters.MergeFrom(tensor.parameters)
            answer.raw_output_contents.append(parts[i][j])
        answers.append(answer)
    return answers


def _bytes_cuts(data: bytes, counts: list[int]) -> list[int] | None:
    """Byte offsets that cut length-prefixed BYTES elements into runs of ``counts`` elements."""
    cuts = [0]
    offset = 0
    size = len(data)
    for count in counts:
        for _ in range(count):
            if offset + 4 > size:
                return None
            (length,) = struct.unpack_from("<I", data, offset)
            offset += 4 + length
        if offset > size:
            return None
        cuts.append(offset)
    return cuts if offset == size else None
