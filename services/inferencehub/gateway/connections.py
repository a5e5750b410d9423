"""The gateway's HTTP connections: limits a hostile or broken client cannot get around.

aiohttp parses HTTP; this module bounds what a connection may cost:
- headers must arrive within ``header_timeout`` of their first byte (a client dripping a header line a
  second is cut), and a request's body within ``body_timeout`` of its headers (a body shorter than its
  ``Content-Length``, or dripped a byte a second, is answered 408 and the connection closed);
- at most ``max_connections`` are open at once; beyond, a new connection gets 503 and is closed;
- errors raised by the HTTP parser itself (bad or duplicate ``Content-Length``, contradictory framing,
  oversized headers...) get the documented ``{"error": ...}`` body, a fixed message that never echoes
  the client's bytes, and a warning in the log without a traceback.

It plugs into aiohttp through its request handler (``web.RequestHandler``) and the factory that makes one
per connection; both are aiohttp internals, pinned in constraints.txt and covered by the tests.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import StreamReader, http_exceptions, web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server

from inferencehub.gateway.http_errors import RETRY_AFTER_SECONDS

log = logging.getLogger(__name__)
RETRY_AFTER_LINE = f"Retry-After: {RETRY_AFTER_SECONDS}\r\n".encode()
REASON = re.compile(r"[A-Za-z][A-Za-z' -]{2,80}")  # words only: a parser reason that quotes nothing


class BodyTimeout(asyncio.TimeoutError):
    """The request body did not arrive in time. A TimeoutError, so aiohttp's lingering read ends quietly."""


@dataclass(frozen=True)
class Limits:
    header_timeout: float
    body_timeout: float
    max_connections: int


# Parser errors, most specific first: the status and a fixed message for each (never the client's bytes).
PARSER_ERRORS: list[tuple[type[Exception], int, str]] = [
    (http_exceptions.LineTooLong, 431, "a request line or header is too long"),
    (http_exceptions.BadHttpMethod, 400, "malformed request line: unknown method"),
    (http_exceptions.BadStatusLine, 400, "malformed request line"),
    (http_exceptions.InvalidHeader, 400, "malformed header (a bad, duplicate or contradictory header)"),
    (http_exceptions.ContentLengthError, 400, "the body does not match its Content-Length"),
    (http_exceptions.TransferEncodingError, 400, "malformed chunked body"),
    (http_exceptions.BadHttpMessage, 400, "malformed HTTP request"),
]


def _json_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    response = web.Response(
        status=status, body=orjson.dumps({"error": message}), content_type="application/json", headers=headers
    )
    response.force_close()
    return response


class GatewayConnection(RequestHandler):
    """One client connection, with header and body deadlines."""

    def __init__(self, manager: GatewayServer, **kwargs) -> None:
        super().__init__(manager, **kwargs)
        self._limits = manager.limits
        self._header_deadline: asyncio.TimerHandle | None = None
        self._awaiting_headers = True
        self._refused = False
        self._on_lost: list[Callable[[], None]] = []

    def on_lost(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` as soon as the client's connection is lost (aiohttp does not cancel a handler when
        its client hangs up: a streaming handler cancels its upstream call here). Returns what unregisters it."""
        self._on_lost.append(callback)
        return lambda: self._on_lost.remove(callback) if callback in self._on_lost else None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        manager = self._manager
        if isinstance(manager, GatewayServer) and len(manager.connections) >= self._limits.max_connections:
            self._refused = True
            manager.record(503)
            message = "too many open connections; retry later"
            # typed BaseTransport by asyncio's Protocol; a stream transport (asyncio's or uvloop's) writes
            transport.write(_raw_error(503, "Service Unavailable", message, RETRY_AFTER_LINE))  # type: ignore[attr-defined]
            transport.close()
            return
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_header_deadline()
        if not self._refused:
            super().connection_lost(exc)
        callbacks, self._on_lost = self._on_lost, []
        for callback in callbacks:
            callback()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._awaiting_headers and self._header_deadline is None and data:
            self._header_deadline = self._loop.call_later(self._limits.header_timeout, self._headers_too_slow)
        pending = len(self._messages)
        super().data_received(data)
        if len(self._messages) > pending:  # the headers of a request are complete
            self._awaiting_headers = False
            self._cancel_header_deadline()

    def _gateway(self) -> GatewayServer:
        """The server that made this connection (aiohttp types it as a plain ``Server``, or None once lost)."""
        assert isinstance(self._manager, GatewayServer)
        return self._manager

    def _cancel_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if self._awaiting_headers and self.transport is not None:
            log.warning("closed a connection whose headers took over %gs", self._limits.header_timeout)
            self._gateway().record(408)
            seconds = self._limits.header_timeout
            self.transport.write(_raw_error(408, "Request Timeout", f"headers not received within {seconds:g}s"))
            self.force_close()

    async def _handle_request(self, request, start_time, request_handler):
        body_deadline = None
        if not request.content.is_eof():
            body_deadline = self._loop.call_later(self._limits.body_timeout, self._body_too_slow, request.content)
        try:
            return await super()._handle_request(request, start_time, request_handler)
        finally:
            if body_deadline is not None:
                body_deadline.cancel()
            self._awaiting_headers = True  # what comes next on this connection is a new request

    def _body_too_slow(self, body: StreamReader) -> None:
        if not body.is_eof():
            body.set_exception(BodyTimeout(f"the request body did not arrive within {self._limits.body_timeout:g}s"))

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None, message=None):
        """Errors outside the app's middlewares: the HTTP parser's, or a handler that escaped them."""
        if request.writer.output_size > 0:
            raise ConnectionError("the response was already started")
        if isinstance(exc, ConnectionError):
            return _json_error(499, "the client closed the connection")
        for kind, code, text in PARSER_ERRORS:
            if isinstance(exc, kind):
                text = _parser_reason(exc) or text
                log.warning("bad HTTP request from %s: %s (%s)", request.remote, text, kind.__name__)
                self._gateway().record(code)
                return _json_error(code, text)
        if status == 504:
            return _json_error(504, "the request took too long")
        log.error("unhandled error answering %s: %r", request.remote, exc)
        return _json_error(500, "internal error in the gateway")


def _parser_reason(exc: BaseException) -> str | None:
    """The parser's own words ("Duplicate Content-Length"), without the client's bytes it quotes after them."""
    message = getattr(exc, "message", "")
    reason = message.split("\n", 1)[0].split(":", 1)[0].strip() if isinstance(message, str) else ""
    return f"malformed HTTP request: {reason}" if REASON.fullmatch(reason) else None


def _raw_error(status: int, reason: str, message: str, extra: bytes = b"") -> bytes:
    """A whole HTTP response, for connections that never reach the app."""
    body = orjson.dumps({"error": message})
    head = f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nConnection: close\r\n"
    return b"%s%sContent-Length: %d\r\n\r\n%s" % (head.encode(), extra, len(body), body)


class GatewayServer(Server):
    """aiohttp's per-listener connection factory, making ``GatewayConnection``s under ``limits``.

    ``record(status)`` counts the answers given outside the app (parser errors, refusals, header timeouts).
    """

    limits: Limits
    record: Callable[[int], None]

    def __call__(self) -> GatewayConnection:
        return GatewayConnection(self, loop=self._loop, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """An ``AppRunner`` whose connections are ``GatewayConnection``s."""

    def __init__(self, app: web.Application, limits: Limits, record: Callable[[int], None], **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.limits = limits
        self.record = record

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        server.__class__ = GatewayServer  # same state, our connection factory
        assert isinstance(server, GatewayServer)
        server.limits = self.limits
        server.record = self.record
        return server

    def open_connections(self) -> int:
        return len(self.server.connections) if self.server is not None else 0
