"""The REST API's documents as types: the one definition the gateway validates requests with and the
OpenAPI document (``openapi.py``) is generated from.

msgspec decodes a request body straight into these types, checking structure, types, enums and bounds
in one pass (faster than decoding to dicts and checking by hand); what a schema cannot say (element
counts against shapes, binary sizes, integer ranges per datatype) is checked in ``rest.py``. Responses
are written by ``rest.py`` directly; their types here document them, and the API tests check that what
the gateway sends conforms.

The generate and OpenAI-compatible routes (``generate.py``, ``openai_api.py``) parse their bodies by hand, to
name the field that is wrong as those APIs do; their types here are what the document says of them, and the
OpenAI routes accept exactly the fields their request types list (``openai_api`` reads the field names here).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from inferencehub.jobqueue import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED
from inferencehub.tensors import DATATYPES

# Datatype and the *Params types are built at run time (for msgspec and the OpenAPI document); a type checker
# sees what their values are.
if TYPE_CHECKING:
    Datatype = str
else:
    Datatype = Literal[tuple(DATATYPES)]
Dimension = Annotated[int, Meta(ge=0, le=2**63 - 1)]
Name = Annotated[str, Meta(min_length=1, max_length=256)]
Value = bool | int | float | str
MAX_DIMENSIONS = 64  # numpy's limit


def _parameters(known: type[Struct], description: str) -> Any:
    """A parameters object: any names with scalar values; the names this API knows typed as ``known`` says."""
    properties = msgspec.json.schema(known)["$defs"][known.__name__]["properties"]
    return Annotated[dict[str, Value], Meta(description=description, extra_json_schema={"properties": properties})]


class InputParameters(Struct, forbid_unknown_fields=False):
    binary_data_size: Annotated[int, Meta(ge=0, description="bytes of this input in the binary part")] | UnsetType = (
        UNSET
    )


class OutputParameters(Struct, forbid_unknown_fields=False):
    binary_data: Annotated[bool, Meta(description="send this output in the binary part")] | UnsetType = UNSET


class RequestParameters(Struct, forbid_unknown_fields=False):
    binary_data_output: Annotated[bool, Meta(description="send every output in the binary part")] | UnsetType = UNSET


if TYPE_CHECKING:
    InputParams = dict[str, Value]
    OutputParams = dict[str, Value]
    RequestParams = dict[str, Value]
else:
    InputParams = _parameters(InputParameters, "input parameters, passed to the model")
    OutputParams = _parameters(OutputParameters, "output parameters")
    RequestParams = _parameters(RequestParameters, "request parameters, passed to the model")


class RequestInput(Struct, forbid_unknown_fields=True):
    """An input tensor: ``data`` (flat or nested, row-major) or, with the binary extension, ``binary_data_size``."""

    name: Name
    shape: Annotated[list[Dimension], Meta(max_length=MAX_DIMENSIONS)]
    datatype: Datatype
    parameters: InputParams = {}
    data: Annotated[list[Any], Meta(description="the elements, flat or nested; BYTES as UTF-8 strings")] | UnsetType = (
        UNSET
    )


class RequestOutput(Struct, forbid_unknown_fields=True):
    name: Name
    parameters: OutputParams = {}


class InferenceRequest(Struct, forbid_unknown_fields=True):
    """The body of ``POST .../infer`` (or its JSON part, with the binary tensor data extension)."""

    inputs: Annotated[list[RequestInput], Meta(min_length=1)]
    id: Annotated[str, Meta(max_length=256)] | UnsetType = UNSET
    parameters: RequestParams = {}
    outputs: list[RequestOutput] = []
    model_name: Annotated[str, Meta(description="if given, must be the model in the path")] | UnsetType = UNSET
    model_version: Annotated[str, Meta(description="if given, must agree with the path")] | UnsetType = UNSET


# --- responses (documentation; rest.py writes them) ----------------------------------------------------------


class ResponseOutput(Struct):
    name: str
    datatype: Datatype
    shape: list[int]
    data: list[Any] | UnsetType = UNSET
    parameters: dict[str, Value] | UnsetType = UNSET


class InferenceResponse(Struct):
    model_name: str
    model_version: str
    outputs: list[ResponseOutput]
    id: str | UnsetType = UNSET


class TensorMetadata(Struct):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(Struct):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerMetadata(Struct):
    name: str
    version: str
    extensions: list[str]


class Error(Struct):
    """Every error answer: a message naming what was wrong."""

    error: str


class Live(Struct):
    live: bool


class Ready(Struct):
    ready: bool


class ModelReady(Struct):
    name: str
    ready: bool


class Status(Struct):
    status: str


if TYPE_CHECKING:
    JobStatus = str
else:
    JobStatus = Literal[(QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)]
Time = Annotated[str, Meta(extra_json_schema={"format": "date-time"})]


class Job(Struct):
    """An async job, submitted with POST .../infer and Prefer: respond-async; its times are ISO 8601, UTC."""

    id: str
    model_name: str
    model_version: str
    status: JobStatus
    created_at: Time
    started_at: Time | None
    finished_at: Time | None
    attempts: int
    result: Annotated[dict[str, Any], Meta(description="the inference response, when succeeded")] | UnsetType = UNSET
    error: Annotated[str, Meta(description="why it failed or was cancelled")] | UnsetType = UNSET


# --- Triton's generate extension (gateway/generate.py) ------------------------------------------------------


class GenerateRequest(Struct, forbid_unknown_fields=False):
    """The body of ``POST .../generate`` and ``.../generate_stream``: every field but ``parameters`` is an input
    tensor of the model by name (a scalar, shape [1], or a list with its shape), typed by the model's metadata;
    a name that is not an input is refused (400, listing the inputs)."""

    parameters: Annotated[dict[str, Value], Meta(description="request parameters, passed to the model")] = {}


class Usage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateResponse(Struct, forbid_unknown_fields=False):
    """The answer of ``.../generate``, and each event of ``.../generate_stream``: every output of the model by name
    (``text_output``: the tokens joined; one event: one response's), and with the last response ``finish_reason``
    and ``usage`` (when the model reports them)."""

    model_name: str
    model_version: str
    finish_reason: str | UnsetType = UNSET
    usage: Usage | UnsetType = UNSET


# --- the OpenAI-compatible API (gateway/openai_api.py) --------------------------------------------------------


class OpenAIErrorDetail(Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(Struct):
    """Every error answer of the ``/v1`` routes (and an error event after a stream's first token), OpenAI's shape."""

    error: OpenAIErrorDetail


class OpenAIModel(Struct):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class OpenAIModelList(Struct):
    """The text generation models the replicas serve (a BYTES input ``text_input``, a BYTES output
    ``text_output``)."""

    object: Literal["list"]
    data: list[OpenAIModel]


Ignored = Annotated[Any, Meta(description="accepted, no effect: the model decides")]
DefaultOnly = "would change the answer's shape: only its default (or null) is accepted"
NonEmpty = Annotated[str, Meta(min_length=1)]
Stop = Annotated[
    NonEmpty | Annotated[list[NonEmpty], Meta(max_length=4)],
    Meta(description="stop strings (input 'stop'): the text ends before the first"),
]
Tokens = Annotated[int, Meta(ge=1, description="at most this many tokens (input 'max_tokens'; default 16)")]


class StreamOptions(Struct, forbid_unknown_fields=True):
    include_usage: Annotated[bool, Meta(description="a last chunk with usage and no choices")] | None = None
    include_obfuscation: Ignored = None


class _OpenAIRequest(Struct, kw_only=True, forbid_unknown_fields=True):
    """What both completion requests accept: OpenAI's sampling fields (no effect), and the fields that would change
    the answer's shape, at their defaults only."""

    model: Annotated[str, Meta(min_length=1, description="a text generation model the replicas serve")]
    max_tokens: Tokens | None = None
    stop: Stop | None = None
    stream: Annotated[bool, Meta(description="answer with server-sent events, a chunk per token")] | None = None
    stream_options: Annotated[StreamOptions, Meta(description="only with stream true")] | None = None
    temperature: Ignored = None
    top_p: Ignored = None
    top_k: Ignored = None
    presence_penalty: Ignored = None
    frequency_penalty: Ignored = None
    seed: Ignored = None
    user: Ignored = None
    logit_bias: Ignored = None
    metadata: Ignored = None
    store: Ignored = None
    service_tier: Ignored = None
    parallel_tool_calls: Ignored = None
    reasoning_effort: Ignored = None
    prompt_cache_key: Ignored = None
    safety_identifier: Ignored = None
    modalities: Ignored = None
    verbosity: Ignored = None
    n: Annotated[Literal[1], Meta(description=DefaultOnly)] | None = None
    best_of: Annotated[Literal[1], Meta(description=DefaultOnly)] | None = None
    echo: Annotated[Literal[False], Meta(description=DefaultOnly)] | None = None
    logprobs: Annotated[None, Meta(description=DefaultOnly)] = None
    top_logprobs: Annotated[None, Meta(description=DefaultOnly)] = None
    suffix: Annotated[None, Meta(description=DefaultOnly)] = None
    tools: Annotated[None, Meta(description=DefaultOnly)] = None
    tool_choice: Annotated[None, Meta(description=DefaultOnly)] = None
    functions: Annotated[None, Meta(description=DefaultOnly)] = None
    function_call: Annotated[None, Meta(description=DefaultOnly)] = None
    response_format: Annotated[None, Meta(description=DefaultOnly)] = None
    audio: Annotated[None, Meta(description=DefaultOnly)] = None
    prediction: Annotated[None, Meta(description=DefaultOnly)] = None


class CompletionRequest(_OpenAIRequest, kw_only=True, forbid_unknown_fields=True):
    """The body of ``POST /v1/completions``; a field not listed is refused (400 naming it)."""

    prompt: Annotated[
        NonEmpty | Annotated[list[NonEmpty], Meta(min_length=1, max_length=1)],
        Meta(description="one prompt (input 'text_input'), or a list holding one"),
    ]


if TYPE_CHECKING:
    Role = str
else:
    Role = Literal["system", "developer", "user", "assistant", "tool"]


class TextPart(Struct, forbid_unknown_fields=False):
    type: Literal["text"]
    text: str


class ChatMessage(Struct, forbid_unknown_fields=False):
    role: Role
    content: str | list[TextPart]


class ChatCompletionRequest(_OpenAIRequest, kw_only=True, forbid_unknown_fields=True):
    """The body of ``POST /v1/chat/completions``: the messages become one prompt, a line ``role: content`` each,
    then ``assistant:``; a field not listed is refused (400 naming it)."""

    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_completion_tokens: Tokens | None = None


class CompletionChoice(Struct):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None


class Completion(Struct):
    """The answer of ``POST /v1/completions``; streamed, each chunk has this shape (one token's text)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | UnsetType | None = UNSET


class ChatAnswer(Struct):
    role: Literal["assistant"]
    content: str


class ChatChoice(Struct):
    index: int
    message: ChatAnswer
    finish_reason: str | None
    logprobs: None


class ChatCompletion(Struct):
    """The answer of ``POST /v1/chat/completions`` with ``stream`` false."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(Struct):
    role: Literal["assistant"] | UnsetType = UNSET
    content: str | UnsetType = UNSET


class ChatChunkChoice(Struct):
    index: int
    delta: ChatDelta
    finish_reason: str | None
    logprobs: None


class ChatCompletionChunk(Struct):
    """Each event of ``POST /v1/chat/completions`` with ``stream`` true (the first delta carries the role)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | UnsetType | None = UNSET


SCHEMAS: list[type[Struct]] = [
    InferenceRequest,
    InferenceResponse,
    ModelMetadata,
    ServerMetadata,
    Error,
    Live,
    Ready,
    ModelReady,
    Status,
    Job,
    GenerateRequest,
    GenerateResponse,
    OpenAIError,
    OpenAIModel,
    OpenAIModelList,
    CompletionRequest,
    ChatCompletionRequest,
    Completion,
    ChatCompletion,
    ChatCompletionChunk,
]

REQUEST_DECODER = msgspec.json.Decoder(InferenceRequest)
