"""The REST API's documents as types: the one definition the gateway validates requests with and the
OpenAPI document (``openapi.py``) is generated from.

msgspec decodes a request body straight into these types, checking structure, types, enums and bounds
in one pass (faster than decoding to dicts and checking by hand); what a schema cannot say (element
counts against shapes, binary sizes, integer ranges per datatype) is checked in ``rest.py``. Responses
are written by ``rest.py`` directly; their types here document them, and the API tests check that what
the gateway sends conforms.
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
]

REQUEST_DECODER = msgspec.json.Decoder(InferenceRequest)
