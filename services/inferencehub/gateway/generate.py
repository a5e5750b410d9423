"""Triton's generate extension: ``POST /v2/models/{m}[/versions/{v}]/generate`` and ``.../generate_stream``.

The request is one JSON object. ``parameters`` (an object of strings, numbers and booleans) become the request's
parameters; every other field is an input tensor of that name, typed by the model's metadata: a scalar is a
tensor of shape [1], a list has the list's shape. For the ``mock-llm`` contract that is
``{"text_input": "...", "max_tokens": 8, "stop": ["."]}``.

``generate_stream`` answers with server-sent events, one per response of the model: ``data: {"model_name": ...,
"model_version": ..., "text_output": "..."}`` (every output by name, one element as a scalar). ``generate``
answers once, with ``text_output`` joined over all the responses (other outputs: the last response's). The last
event, and the single answer, also carry ``finish_reason`` and ``usage`` (``prompt_tokens``,
``completion_tokens``, ``total_tokens``) when the model reports them. A failure before the first response is an
HTTP error (``{"error": "..."}`` with 400, 404, 503, 504...); after it, a last event ``data: {"error": "..."}``.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from inferencehub import logs
from inferencehub.errors import InvalidInput
from inferencehub.gateway import rest, sse, streaming
from inferencehub.gateway.deadlines import deadline
from inferencehub.gateway.upstream import UpstreamError
from inferencehub.metadata import REPLICA_KEY
from inferencehub.protocol.inference import grpc_predict_v2_pb2 as pb


def final_fields(parameters: dict[str, Any]) -> dict[str, Any]:
    """``finish_reason`` and ``usage`` from a final response's parameters (whichever the model reports)."""
    fields: dict[str, Any] = {}
    if "finish_reason" in parameters:
        fields["finish_reason"] = parameters["finish_reason"]
    prompt, completion = parameters.get("prompt_tokens"), parameters.get("completion_tokens")
    if isinstance(prompt, int) and isinstance(completion, int):
        fields["usage"] = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
    return fields


def parse_generate_request(
    body: bytes, metadata: pb.ModelMetadataResponse, model: str, version: str
) -> pb.ModelInferRequest:
    """The ModelInferRequest for a generate body, its fields typed by the model's metadata; ``InvalidInput``
    naming what is wrong."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidInput("the request body must be a JSON object: input names to values, and 'parameters'")
    message = pb.ModelInferRequest(model_name=model, model_version=version)
    parameters = doc.pop("parameters", {})
    if not isinstance(parameters, dict):
        raise InvalidInput("'parameters' must be an object")
    rest.set_parameters(parameters, message.parameters)
    inputs = {tensor.name: tensor.datatype for tensor in metadata.inputs}
    for name, value in doc.items():
        if name not in inputs:
            known = ", ".join(sorted(inputs)) or "none"
            raise InvalidInput(f"'{name}' is not an input of model '{model}' (its inputs: {known}; or 'parameters')")
        rest.add_json_input(message, name, inputs[name], value)
    return message


async def _open(request: web.Request) -> streaming.TokenStream:
    name, version = request.match_info["model"], request.match_info.get("version", "")
    timeout = deadline(request)
    body = await request.read()  # at most --max-body-bytes (the app's client_max_size), else 413
    metadata = await streaming.model_metadata(request, name, version, timeout)
    message = parse_generate_request(body, metadata, name, version)
    message.id = logs.request_id.get()
    return streaming.TokenStream(request, message, timeout)


def _event(piece: streaming.Piece) -> dict[str, Any]:
    doc: dict[str, Any] = {"model_name": piece.model_name, "model_version": piece.model_version, **piece.outputs}
    if piece.final:
        doc.update(final_fields(piece.parameters))
    return doc


async def generate(request: web.Request) -> web.Response:
    async with await _open(request) as stream:
        text: list[str] = []
        outputs: dict[str, Any] = {}
        while True:
            piece = await stream.next()
            if streaming.TEXT_OUTPUT in piece.outputs:
                text.append(piece.text)
            outputs.update(piece.outputs)
            if piece.final:
                break
    doc = _event(piece)
    doc.update(outputs)
    if text:  # a model with a text_output: its tokens joined (other outputs: the last response's)
        doc[streaming.TEXT_OUTPUT] = "".join(text)
    headers = {REPLICA_KEY: stream.replica} if stream.replica else None
    return web.json_response(doc, headers=headers, dumps=lambda d: orjson.dumps(d).decode())


def _error_event(exc: UpstreamError) -> bytes:
    return sse.event({"error": streaming.error_message(exc)})


async def generate_stream(request: web.Request) -> web.StreamResponse:
    async with await _open(request) as stream:
        return await streaming.relay(request, stream, lambda piece: [sse.event(_event(piece))], _error_event)


def routes() -> list[web.RouteDef]:
    table = []
    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        table += [web.post(prefix + "/generate", generate), web.post(prefix + "/generate_stream", generate_stream)]
    return table
