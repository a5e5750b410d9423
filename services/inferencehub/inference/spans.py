"""The replica's trace spans under its ``ModelInfer`` span: ``queue``, ``batch`` (forming the batch, with
``inferencehub.batch_size``) and ``execute`` (the model call), recorded after the fact from the call's ``Timing``
(the scheduler stamps it; no span is open while the call waits or runs)."""

from __future__ import annotations

from inferencehub.inference.statistics import Timing
from inferencehub.tracing import Tracing

BATCH_SIZE_ATTRIBUTE = "inferencehub.batch_size"


def replica_spans(tracing: Tracing, parent, timing: Timing) -> None:
    """queue, batch and execute under ``parent`` (the replica's ModelInfer span), as they happened."""
    from opentelemetry.trace import set_span_in_context

    if not timing.taken:
        return
    context = set_span_in_context(parent)
    at = tracing.offset  # perf_counter_ns -> epoch ns
    tracer = tracing.tracer
    tracer.start_span("queue", context, start_time=at + timing.enqueued).end(at + timing.taken)
    if not timing.started:
        return
    batch = {BATCH_SIZE_ATTRIBUTE: timing.batch_size}
    formed = tracer.start_span("batch", context, attributes=batch, start_time=at + timing.taken)
    formed.end(at + timing.started)
    run = tracer.start_span("execute", context, attributes=batch, start_time=at + timing.started)
    run.end(at + timing.finished)
