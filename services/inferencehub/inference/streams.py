"""The replica's long-lived streams (health ``Watch``, reflection) end cleanly when it stops.

grpc.aio cancels streaming handlers that are still open when the server stops, and logs each with a
traceback; an open stream would also hold the shutdown for the whole grace period. These servicers end
their streams with OK as soon as the replica stops taking calls, so clients see an orderly end.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable

from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection


async def _until(stopping: asyncio.Event, work: Awaitable):
    """Await ``work`` unless ``stopping`` is set first; returns (finished, result)."""
    task = asyncio.ensure_future(work)
    stop = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait((task, stop), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        return False, None
    return True, task.result()


class HealthServicer(health_aio.HealthServicer):
    def __init__(self, stopping: asyncio.Event) -> None:
        super().__init__()
        self.stopping = stopping

    async def Watch(self, request, context) -> None:
        await _until(self.stopping, super().Watch(request, context))


class ReflectionServicer(reflection.aio.ReflectionServicer):
    def __init__(self, service_names, stopping: asyncio.Event) -> None:
        super().__init__(service_names)
        self.stopping = stopping

    async def ServerReflectionInfo(self, request_iterator, context) -> AsyncIterator:
        answers = super().ServerReflectionInfo(request_iterator, context)
        try:
            while True:
                finished, answer = await _until(self.stopping, _next(answers))
                if not finished or answer is _END:
                    return
                yield answer
        finally:
            await answers.aclose()


_END = object()


async def _next(stream: AsyncIterator):
    return await anext(stream, _END)
