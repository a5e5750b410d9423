"""The one error hierarchy. Each error carries the gRPC status it maps to.

The inference service turns these into gRPC statuses in one place (the servicer);
the gateway turns gRPC statuses into HTTP in one place.
"""

from __future__ import annotations

import grpc


class InferenceHubError(Exception):
    """Base class: an error with a message meant for the caller."""

    status = grpc.StatusCode.INTERNAL


class InvalidInput(InferenceHubError):
    """The request is malformed: wrong datatype, shape, element count, names..."""

    status = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFound(InferenceHubError):
    status = grpc.StatusCode.NOT_FOUND


class ModelNotReady(InferenceHubError):
    status = grpc.StatusCode.UNAVAILABLE


class ModelLoadFailed(InferenceHubError):
    """A model could not be loaded at run time (its config or files); what was serving before stays."""

    status = grpc.StatusCode.INVALID_ARGUMENT


class ModelControlRefused(InferenceHubError):
    """Load or unload asked of a replica whose model control mode does not allow it."""

    status = grpc.StatusCode.FAILED_PRECONDITION


class Overloaded(InferenceHubError):
    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExpired(InferenceHubError):
    """The caller's deadline passed before the work could start."""

    status = grpc.StatusCode.DEADLINE_EXCEEDED


class ModelError(InferenceHubError):
    """The model itself failed (a bug, an injected failure, a bad output)."""

    status = grpc.StatusCode.INTERNAL


class ConfigError(InferenceHubError):
    """A model config is invalid; the message names the file and the field."""
