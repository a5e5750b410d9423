"""The headers that make an infer request a job: ``Prefer`` (RFC 7240) and ``Idempotency-Key``.

``Prefer: respond-async`` queues the request as a job (202 and a Location); ``wait=N`` asks to wait up to N seconds
for the result first. A preference that cannot be honoured is ignored, as RFC 7240 says; an Idempotency-Key that is
not 1 to 255 printable ASCII characters is refused (400).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

from inferencehub.errors import InvalidInput
from inferencehub.metadata import IDEMPOTENCY_HEADER


def async_wait(prefer: Iterable[str], max_wait: float) -> float | None:
    """None unless the ``Prefer`` values ask for ``respond-async``; else the seconds to wait for the result (``wait``,
    at most ``max_wait``; 0 when not given or unreadable)."""
    respond_async, wait = False, 0.0
    for value in prefer:
        for preference in value.replace(";", ",").split(","):
            token, _, argument = preference.strip().partition("=")
            token = token.strip().lower()
            if token == "respond-async":
                respond_async = True
            elif token == "wait":
                with contextlib.suppress(ValueError):  # a preference that cannot be honoured is ignored
                    wait = max(0.0, float(argument.strip().strip('"')))
    if not respond_async:
        return None
    return min(wait, max_wait)


def idempotency(value: str | None) -> str | None:
    """The Idempotency-Key, checked (None when the request has none)."""
    if value is None:
        return None
    if not 1 <= len(value) <= 255 or not value.isprintable() or not value.isascii():
        raise InvalidInput(f"{IDEMPOTENCY_HEADER} must be 1 to 255 printable ASCII characters")
    return value
