"""OpenTelemetry tracing, off unless an OTLP endpoint is configured.

On when ``--otlp-endpoint`` / ``INFERENCEHUB_OTLP_ENDPOINT`` is set, or the standard
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_ENDPOINT``; off again with
``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none``. Spans go over OTLP/HTTP (protobuf)
to ``<endpoint>/v1/traces``. The other standard variables are the SDK's own and work as
documented: ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER[_ARG]``,
``OTEL_BSP_*`` (batching of exports), ``OTEL_EXPORTER_OTLP_[TRACES_]HEADERS``/``TIMEOUT``...

Off, nothing of OpenTelemetry is imported and every hook in the services is one ``None`` check.
On, context travels as W3C ``traceparent`` (HTTP header in, gRPC metadata gateway -> replica).

Spans: gateway ``<METHOD> <route>`` (server) > ``parse`` and ``upstream <Method>`` (client, with
``inferencehub.replica``); replica ``ModelInfer`` (server, with ``inferencehub.replica``) >
``queue``, ``batch`` (forming the batch, with ``inferencehub.batch_size``) and ``execute`` (the
model call; ``inference/spans.py`` records them from the call's Timing). Async jobs: ``inject()``'s pairs
travel in the job message, and the replica starts the job's span with ``links=tracing.link(pairs)``.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

from inferencehub import logs
from inferencehub.errors import InferenceHubError

REPLICA_ATTRIBUTE = "inferencehub.replica"
NULL = contextlib.nullcontext()  # reusable: `with NULL if tracing is None else tracing.span(...)`


def endpoint(configured: str) -> str | None:
    """The OTLP endpoint to export to, or None when tracing is off."""
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    if os.environ.get("OTEL_TRACES_EXPORTER", "otlp").lower() == "none":
        return None
    return (
        configured
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or None
    )


def traces_url(base: str) -> str:
    """OTLP/HTTP posts traces to ``/v1/traces`` under the endpoint (the signal-specific variable is used as is)."""
    if base == os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return base
    return base.rstrip("/") + "/v1/traces"


class Tracing:
    """A tracer, the W3C propagator, and the provider to flush on exit."""

    def __init__(self, service_name: str, url: str) -> None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace import SpanKind
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; they win over the default name.
        resource = Resource.create({"service.name": service_name, **_resource_from_env()})
        self.provider = TracerProvider(resource=resource)  # reads OTEL_TRACES_SAMPLER
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))  # reads OTEL_BSP_*
        self.tracer = self.provider.get_tracer("inferencehub")
        self.propagator = TraceContextTextMapPropagator()
        self.url = url
        self.SERVER, self.CLIENT = SpanKind.SERVER, SpanKind.CLIENT
        # perf_counter_ns -> epoch ns, for spans recorded after the fact from a request's Timing.
        self.offset = time.time_ns() - time.perf_counter_ns()

    # --- context in and out ----------------------------------------------------------------

    def extract(self, carrier) -> Any:
        return self.propagator.extract(carrier)

    def inject(self) -> tuple[tuple[str, str], ...]:
        """The current context as gRPC metadata pairs (``traceparent``, ``tracestate``)."""
        carrier: dict[str, str] = {}
        self.propagator.inject(carrier)
        return tuple(carrier.items())

    def link(self, carrier) -> list:
        """Links to the context a message carried (``inject()``'s pairs): for work done later, e.g. async jobs."""
        from opentelemetry.trace import Link, get_current_span

        context = get_current_span(self.extract(dict(carrier))).get_span_context()
        return [Link(context)] if context.is_valid else []

    def span(self, name: str, **kwargs):
        return self.tracer.start_as_current_span(name, **kwargs)

    @staticmethod
    def trace_id(span) -> str:
        return format(span.get_span_context().trace_id, "032x")

    def shutdown(self) -> None:
        self.provider.shutdown()  # exports what is still buffered


def _resource_from_env() -> dict[str, str]:
    name = os.environ.get("OTEL_SERVICE_NAME")
    return {"service.name": name} if name else {}


class TracingConfigError(InferenceHubError):
    """The tracing configuration cannot work (the process does not start)."""


def check(base: str) -> None:
    if not base.startswith(("http://", "https://")):
        raise TracingConfigError(f"OTLP endpoint {base!r}: expected an http:// or https:// URL (OTLP/HTTP)")
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = os.environ.get(name)
        if protocol:
            if protocol != "http/protobuf":
                raise TracingConfigError(
                    f"{name}={protocol}: InferenceHub exports OTLP over http/protobuf only "
                    "(a collector's OTLP/HTTP port, usually 4318)"
                )
            break


def setup(service_name: str, configured: str) -> Tracing | None:
    """Tracing for this process, or None when no endpoint is configured (nothing is imported then)."""
    base = endpoint(configured)
    if base is None:
        return None
    check(base)
    tracing = Tracing(service_name, traces_url(base))
    logs.show_trace_ids()
    return tracing
