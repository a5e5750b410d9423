"""OpenAI-compatible routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``.

They serve the generative models of the streaming contract (inputs ``text_input``, ``max_tokens``, ``stop``; output
``text_output``; final parameters ``finish_reason``, ``prompt_tokens``, ``completion_tokens``), so the ``openai``
SDK works against the gateway unchanged (``OpenAI(base_url="http://gateway/v1", api_key=...)``).

- ``prompt`` (one string) goes to ``text_input``; ``max_tokens`` (default 16), ``stop`` (a string or up to 4) to the
  inputs of those names. Chat ``messages`` become one prompt, a line per message, ``role: content``, then a last
  line ``assistant:`` (``content`` as a string or a list of text parts).
- Sampling fields (``temperature``, ``top_p``, ``seed``, penalties, ``user``...) are accepted and have no effect
  (the model decides); fields that would change the answer's shape (``n`` above 1, ``logprobs``, ``echo``,
  ``best_of``, ``suffix``, tools) are refused with 400 naming them, as are fields OpenAI does not define.
- ``stream: true`` answers with server-sent events, ``data: {chunk}`` per token and ``data: [DONE]``;
  ``stream_options.include_usage`` adds a last chunk with ``usage`` and no choices.
- Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with the HTTP status; an error
  after the first token is a last event ``data: {"error": {...}}`` (the SDK raises it as ``APIError``).
"""

from __future__ import annotations

import asyncio
import time
import typing
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from aiohttp import web

from inferencehub import logs
from inferencehub.errors import InvalidInput
from inferencehub.gateway import schema, sse, streaming
from inferencehub.gateway.deadlines import deadline
from inferencehub.gateway.http_errors import HTTP_STATUS, upstream_error
from inferencehub.gateway.keys import UPSTREAM
from inferencehub.gateway.upstream import UpstreamError
from inferencehub.metadata import REPLICA_KEY
from inferencehub.protocol.inference import grpc_predict_v2_pb2 as pb
from inferencehub.tensors import serialize_bytes

PREFIX = "/v1/"
DEFAULT_MAX_TOKENS = 16
MAX_STOP = 4
# The fields each route accepts are its request type's in ``schema`` (the OpenAPI document's): OpenAI's sampling
# fields are accepted and have no effect; these would change what the answer holds, unless at their default.
REFUSED = {
    "n": 1,
    "best_of": 1,
    "echo": False,
    "logprobs": None,
    "top_logprobs": None,
    "suffix": None,
    "tools": None,
    "tool_choice": None,
    "functions": None,
    "function_call": None,
    "response_format": None,
    "audio": None,
    "prediction": None,
}
COMPLETION_FIELDS = frozenset(schema.CompletionRequest.__struct_fields__)
CHAT_FIELDS = frozenset(schema.ChatCompletionRequest.__struct_fields__)
ROLES = frozenset(typing.get_args(schema.Role))
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error"}  # fmt: skip


class OpenAIError(InvalidInput):
    """A request OpenAI's API would refuse: 400 naming ``param``."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.status = status
        self.code = code


@dataclass(frozen=True)
class Completion:
    """A parsed completions or chat completions request."""

    model: str
    prompt: str
    max_tokens: int
    stop: list[str]
    stream: bool
    include_usage: bool
    chat: bool


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(message: str, status: int, param: str | None = None, code: str | None = None, headers=None):
    return web.json_response(error_body(message, status, param, code), status=status, headers=headers)


def _load(body: bytes) -> dict[str, Any]:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise OpenAIError(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise OpenAIError("the request body must be a JSON object")
    return doc


def _check_fields(doc: dict[str, Any], allowed: frozenset[str]) -> None:
    for name, value in doc.items():
        if name not in allowed:
            raise OpenAIError(f"unrecognized request argument: '{name}'", name)
        if name in REFUSED and value is not None:
            default = REFUSED[name]
            if value != default or type(value) is not type(default):  # true is not 1, nor 0 false
                raise OpenAIError(f"'{name}' is not supported by this server (only its default, {default!r})", name)


def _string(doc: dict[str, Any], name: str) -> str:
    value = doc.get(name)
    if not isinstance(value, str) or not value:
        raise OpenAIError(f"'{name}' is required and must be a non-empty string", name)
    return value


def _max_tokens(doc: dict[str, Any], name: str) -> int:
    value = doc.get(name)
    if value is None:
        return DEFAULT_MAX_TOKENS
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise OpenAIError(f"'{name}' must be a positive integer", name)
    return value


def _stop(doc: dict[str, Any]) -> list[str]:
    value = doc.get("stop")
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP:
        raise OpenAIError(f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them", "stop")
    return stops


def _streaming(doc: dict[str, Any]) -> tuple[bool, bool]:
    stream = doc.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise OpenAIError("'stream' must be true or false", "stream")
    options = doc.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise OpenAIError("'stream_options' is only allowed when 'stream' is true", "stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage", "include_obfuscation"}:
        raise OpenAIError("'stream_options' may hold only 'include_usage' (true or false)", "stream_options")
    include = options.get("include_usage")
    if include is None:
        include = False
    if not isinstance(include, bool):
        raise OpenAIError("'stream_options.include_usage' must be true or false", "stream_options.include_usage")
    return stream, include


def parse_completion(body: bytes) -> Completion:
    """A ``/v1/completions`` body; ``OpenAIError`` naming the field that is wrong."""
    doc = _load(body)
    _check_fields(doc, COMPLETION_FIELDS)
    model = _string(doc, "model")
    prompt = doc.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list):
        raise OpenAIError("'prompt' must be one string (several prompts, or token ids, are not supported)", "prompt")
    if not isinstance(prompt, str) or not prompt:
        raise OpenAIError("'prompt' is required and must be a non-empty string", "prompt")
    stream, include_usage = _streaming(doc)
    return Completion(model, prompt, _max_tokens(doc, "max_tokens"), _stop(doc), stream, include_usage, chat=False)


def chat_prompt(messages: Any) -> str:
    """The prompt for chat ``messages``: a line ``role: content`` per message, then ``assistant:``."""
    if not isinstance(messages, list) or not messages:
        raise OpenAIError("'messages' is required and must be a non-empty list", "messages")
    lines = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise OpenAIError(f"'{where}' must be an object with 'role' and 'content'", where)
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or role not in ROLES:  # a list or object is no role (and not hashable)
            raise OpenAIError(f"'{where}.role' must be one of {', '.join(sorted(ROLES))}", f"{where}.role")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise OpenAIError(
                        f"'{where}.content[{j}]' must be a text part ({{'type': 'text', 'text': ...}})",
                        f"{where}.content",
                    )
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise OpenAIError(f"'{where}.content' must be a string or a list of text parts", f"{where}.content")
        lines.append(f"{role}: {content}")
    lines.append("assistant:")
    return "\n".join(lines)


def parse_chat(body: bytes) -> Completion:
    """A ``/v1/chat/completions`` body; ``OpenAIError`` naming the field that is wrong."""
    doc = _load(body)
    _check_fields(doc, CHAT_FIELDS)
    model = _string(doc, "model")
    prompt = chat_prompt(doc.get("messages"))
    max_tokens = _max_tokens(doc, "max_tokens")
    if doc.get("max_completion_tokens") is not None:  # OpenAI's newer name wins
        max_tokens = _max_tokens(doc, "max_completion_tokens")
    stream, include_usage = _streaming(doc)
    return Completion(model, prompt, max_tokens, _stop(doc), stream, include_usage, chat=True)


def infer_request(completion: Completion, request_id: str) -> pb.ModelInferRequest:
    """The model's request: ``text_input``, ``max_tokens`` and (if any) ``stop``."""
    message = pb.ModelInferRequest(model_name=completion.model, id=request_id)
    message.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    message.raw_input_contents.append(serialize_bytes(np.array([completion.prompt.encode()], dtype=object)))
    message.inputs.add(name="max_tokens", datatype="INT32", shape=[1])
    message.raw_input_contents.append(np.array([completion.max_tokens], dtype=np.int32).tobytes())
    if completion.stop:
        message.inputs.add(name="stop", datatype="BYTES", shape=[len(completion.stop)])
        message.raw_input_contents.append(
            serialize_bytes(np.array([s.encode() for s in completion.stop], dtype=object))
        )
    return message


def usage(parameters: dict[str, Any], tokens: int) -> dict[str, int]:
    """OpenAI's usage from the final response's parameters (the tokens relayed, if the model reports none)."""
    prompt = parameters.get("prompt_tokens", 0)
    completion = parameters.get("completion_tokens", tokens)
    prompt = prompt if isinstance(prompt, int) else 0
    completion = completion if isinstance(completion, int) else tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Answer:
    """The ids and envelopes of one completion's answer, streamed or not."""

    def __init__(self, completion: Completion, request_id: str) -> None:
        self.completion = completion
        self.id = ("chatcmpl-" if completion.chat else "cmpl-") + request_id
        self.created = int(time.time())
        self.role_sent = False

    def _envelope(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.completion.model}

    def whole(self, text: str, finish_reason: str | None, used: dict[str, int]) -> dict[str, Any]:
        if self.completion.chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}}
            doc = self._envelope("chat.completion")
        else:
            choice = {"index": 0, "text": text}
            doc = self._envelope("text_completion")
        choice.update(finish_reason=finish_reason, logprobs=None)
        doc.update(choices=[choice], usage=used)
        return doc

    def chunk(self, text: str | None, finish_reason: str | None) -> dict[str, Any]:
        if self.completion.chat:
            delta: dict[str, Any] = {}
            if not self.role_sent:
                delta["role"] = "assistant"
                self.role_sent = True
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta}
            doc = self._envelope("chat.completion.chunk")
        else:
            choice = {"index": 0, "text": text or ""}
            doc = self._envelope("text_completion")
        choice.update(finish_reason=finish_reason, logprobs=None)
        doc["choices"] = [choice]
        if self.completion.include_usage:
            doc["usage"] = None
        return doc

    def usage_chunk(self, used: dict[str, int]) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.completion.chat else "text_completion"
        return {**self._envelope(kind), "choices": [], "usage": used}


def upstream_error_answer(exc: UpstreamError) -> web.Response:
    """An ``UpstreamError`` as OpenAI's error, with the status the OIP routes give it."""
    status, message, headers = upstream_error(exc.code, exc.details)
    code = "model_not_found" if status == 404 else exc.code.name.lower()
    return error_response(message, status, "model" if status == 404 else None, code, headers)


def _stream_error(exc: UpstreamError) -> bytes:
    status = HTTP_STATUS.get(exc.code, 500)
    return sse.event(error_body(streaming.error_message(exc), status, None, exc.code.name.lower()))


async def _check_model(request: web.Request, completion: Completion, timeout: float) -> None:
    metadata = await streaming.model_metadata(request, completion.model, "", timeout)
    if not is_generative(metadata):
        raise OpenAIError(
            f"model '{completion.model}' is not a text generation model (it needs a BYTES input 'text_input' and "
            "a BYTES output 'text_output')",
            "model",
        )


def is_generative(metadata: pb.ModelMetadataResponse) -> bool:
    inputs = {t.name: t.datatype for t in metadata.inputs}
    outputs = {t.name: t.datatype for t in metadata.outputs}
    return inputs.get("text_input") == "BYTES" and outputs.get(streaming.TEXT_OUTPUT) == "BYTES"


async def _complete(request: web.Request, chat: bool) -> web.StreamResponse:
    try:
        timeout = deadline(request)
        completion = (parse_chat if chat else parse_completion)(await request.read())
        await _check_model(request, completion, timeout)
        request_id = logs.request_id.get()
        answer = Answer(completion, request_id)
        async with streaming.TokenStream(request, infer_request(completion, request_id), timeout) as stream:
            if completion.stream:
                return await streaming.relay(
                    request, stream, lambda piece: _chunks(answer, piece, stream), _stream_error, sse.DONE
                )
            text: list[str] = []
            while True:
                piece = await stream.next()
                text.append(piece.text)
                if piece.final:
                    break
        used = usage(piece.parameters, stream.tokens)
        doc = answer.whole("".join(text), _finish_reason(piece), used)
        headers = {REPLICA_KEY: stream.replica} if stream.replica else None
        return web.json_response(doc, headers=headers, dumps=lambda d: orjson.dumps(d).decode())
    except OpenAIError as exc:
        return error_response(str(exc), exc.status, exc.param, exc.code)
    except InvalidInput as exc:
        return error_response(str(exc), 400)
    except UpstreamError as exc:
        return upstream_error_answer(exc)


def _finish_reason(piece: streaming.Piece) -> str:
    reason = piece.parameters.get("finish_reason")
    return reason if isinstance(reason, str) else "stop"


def _chunks(answer: Answer, piece: streaming.Piece, stream: streaming.TokenStream) -> list[bytes]:
    events = []
    if streaming.TEXT_OUTPUT in piece.outputs or not piece.final:
        events.append(sse.event(answer.chunk(piece.text, None)))
    if piece.final:
        events.append(sse.event(answer.chunk(None if answer.completion.chat else "", _finish_reason(piece))))
        if answer.completion.include_usage:
            events.append(sse.event(answer.usage_chunk(usage(piece.parameters, stream.tokens))))
    return events


async def completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, chat=True)


async def _generative_models(request: web.Request) -> list[str]:
    timeout = deadline(request)
    index, _ = await request.app[UPSTREAM].call(
        "RepositoryIndex", pb.RepositoryIndexRequest(ready=True), request_id=logs.request_id.get(), timeout=timeout
    )
    names = sorted({m.name for m in index.models if m.state in ("", "READY")})
    found = await asyncio.gather(
        *(streaming.model_metadata(request, name, "", timeout) for name in names), return_exceptions=True
    )
    return [
        n for n, m in zip(names, found, strict=True) if isinstance(m, pb.ModelMetadataResponse) and is_generative(m)
    ]


def _model_json(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "inferencehub"}


async def list_models(request: web.Request) -> web.Response:
    """The text generation models the replicas serve (``text_input`` in, ``text_output`` out)."""
    try:
        names = await _generative_models(request)
    except UpstreamError as exc:
        return upstream_error_answer(exc)
    return web.json_response({"object": "list", "data": [_model_json(n) for n in names]})


async def retrieve_model(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    try:
        metadata = await streaming.model_metadata(request, name, "", deadline(request))
    except UpstreamError as exc:
        return upstream_error_answer(exc)
    except InvalidInput as exc:
        return error_response(str(exc), 400)
    if not is_generative(metadata):
        return error_response(f"model '{name}' is not a text generation model", 404, "model", "model_not_found")
    return web.json_response(_model_json(name))


@web.middleware
async def openai_errors(request: web.Request, handler) -> web.StreamResponse:
    """Errors on /v1/ routes in OpenAI's shape, whoever made them (API keys, rate limits, no such route...)."""
    response = await handler(request)
    if (
        request.path.startswith(PREFIX)
        and isinstance(response, web.Response)
        and response.status >= 400
        and response.content_type == "application/json"
        and isinstance(response.body, bytes)
    ):
        try:
            message = orjson.loads(response.body).get("error")
        except (orjson.JSONDecodeError, AttributeError):
            return response
        if isinstance(message, str):
            code = {401: "invalid_api_key", 429: "rate_limit_exceeded"}.get(response.status)
            body = orjson.dumps(error_body(message, response.status, None, code))
            headers = {
                k: v for k, v in response.headers.items() if k.lower() in ("allow", "retry-after", "www-authenticate")
            }
            replaced = web.Response(body=body, status=response.status, content_type="application/json", headers=headers)
            return replaced
    return response


def routes() -> list[web.RouteDef]:
    return [
        web.get("/v1/models", list_models),
        web.get("/v1/models/{model}", retrieve_model),
        web.post("/v1/completions", completions),
        web.post("/v1/chat/completions", chat_completions),
    ]
