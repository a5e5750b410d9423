"""The gateway's server span: only installed when tracing is on (``inferencehub.tracing``).

It continues the caller's W3C ``traceparent`` (or starts a trace), names the span by route
template, and puts the trace id on the request's log lines. Probes, scrapes and the live page's
polling (``UNTRACED``) make no spans: they would bury the traces worth reading. Handlers add ``parse``, and
``upstream`` adds the client span whose context travels to the replica in gRPC metadata.
"""

from __future__ import annotations

from aiohttp import web

from inferencehub import logs
from inferencehub.tracing import Tracing

UNTRACED = frozenset({"/healthz", "/readyz", "/metrics", "/status.json", "/ui"})


def traced_requests(tracing: Tracing):
    from opentelemetry.trace import Status, StatusCode

    @web.middleware
    async def trace(request: web.Request, handler) -> web.StreamResponse:
        route = request.match_info.route.resource
        template = route.canonical if route is not None else "unmatched"
        if template in UNTRACED:
            return await handler(request)
        attributes = {"http.request.method": request.method, "http.route": template, "url.path": request.path}
        with tracing.span(
            f"{request.method} {template}",
            context=tracing.extract(request.headers),
            kind=tracing.SERVER,
            attributes=attributes,
        ) as span:
            token = logs.trace_id.set(tracing.trace_id(span))
            try:
                response = await handler(request)
                span.set_attribute("http.response.status_code", response.status)
                if response.status >= 500:
                    span.set_status(Status(StatusCode.ERROR))
                return response
            finally:
                logs.trace_id.reset(token)

    return trace
