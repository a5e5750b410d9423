"""The deadline of a client's call: ``X-InferenceHub-Deadline-Ms``, else the gateway's default."""

from __future__ import annotations

import re

from aiohttp import web

from inferencehub.errors import InvalidInput
from inferencehub.gateway.keys import SETTINGS
from inferencehub.metadata import DEADLINE_HEADER

DEADLINE_PATTERN = re.compile(r"^[0-9]{1,9}$")  # ASCII digits only: str.isdigit() also takes '³' and '٣'


def deadline(request: web.Request) -> float:
    """The call's deadline in seconds: the client's ``X-InferenceHub-Deadline-Ms``, else the gateway's default.

    A deadline above ``max_deadline_seconds`` is refused, never shortened silently: the replicas keep aged
    connections open that long (their own ``max_deadline_seconds``), so a longer call could be cut mid-run.
    For a stream it covers the whole stream.
    """
    settings = request.app[SETTINGS]
    asked = request.headers.get(DEADLINE_HEADER)
    if asked is None:
        return settings.deadline_seconds
    if not DEADLINE_PATTERN.match(asked) or int(asked) == 0:
        raise InvalidInput(f"{DEADLINE_HEADER} must be a positive whole number of milliseconds (ASCII digits)")
    seconds = int(asked) / 1000
    if seconds > settings.max_deadline_seconds:
        raise InvalidInput(
            f"{DEADLINE_HEADER} is {asked} ms, above the longest deadline this gateway allows: "
            f"{settings.max_deadline_seconds * 1000:.0f} ms (--max-deadline-seconds)"
        )
    return seconds
