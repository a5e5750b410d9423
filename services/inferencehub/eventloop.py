"""Which asyncio event loop the servers run on: uvloop (libuv, a faster loop and faster sockets) by default.

``--event-loop asyncio`` (or ``INFERENCEHUB_EVENT_LOOP=asyncio``) turns it off: the standard library's loop, for
platforms without uvloop or to rule it out while debugging. Where uvloop is not installed the standard loop is
used and said so.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from inferencehub.errors import InferenceHubError

log = logging.getLogger(__name__)
CHOICES = ("uvloop", "asyncio")


def factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The loop factory for ``name`` (None: the standard loop)."""
    if name not in CHOICES:
        raise InferenceHubError(f"--event-loop must be one of {', '.join(CHOICES)}, got {name!r}")
    if name == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        log.warning("uvloop is not installed: running on the standard asyncio loop")
        return None
    return uvloop.new_event_loop


def run(coroutine: Coroutine[Any, Any, Any], name: str) -> Any:
    try:
        loop_factory = factory(name)
    except InferenceHubError:
        coroutine.close()
        raise
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(coroutine)
