"""Logging set-up: one format for every process, with the caller's request id on each line.

With tracing on (``inferencehub.tracing``), each line also carries the trace id.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
from contextvars import ContextVar

request_id: ContextVar[str] = ContextVar("request_id", default="-")
trace_id: ContextVar[str] = ContextVar("trace_id", default="-")

_ID_PREFIX = os.urandom(8).hex()
_id_counter = itertools.count(int.from_bytes(os.urandom(7), "big"))


def new_request_id() -> str:
    """32 hex digits, unique: a random per-process prefix and a counter (uuid4 costs a system call per request)."""
    return f"{_ID_PREFIX}{next(_id_counter) & 0xFFFF_FFFF_FFFF_FFFF:016x}"


FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
TRACED_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s trace=%(trace_id)s] %(message)s"


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        record.trace_id = trace_id.get()
        return True


def show_trace_ids() -> None:
    """Put the trace id on every line (tracing is on)."""
    for handler in logging.getLogger().handlers:
        if any(isinstance(f, _RequestIdFilter) for f in handler.filters):
            handler.setFormatter(logging.Formatter(TRACED_FORMAT))


def configure(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(_RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
