"""A bound on the request body bytes the gateway holds at once, across all requests.

A body is read, decoded (a JSON body into Python objects, several times its size) and copied into a gRPC
message that lives until the upstream call ends. ``--max-body-bytes`` bounds one request; this bounds their sum,
so a few concurrent maximum-size bodies cannot take the pod past its memory limit. A request takes its share
before its body is read (its ``Content-Length``; a chunked body chunk by chunk as it arrives) and gives it back
when its answer is made. One that would go over the limit gets 503 with ``Retry-After`` at once: the client
retries a moment later, and the gateway keeps answering everyone else.

The gateway serves from one event loop, so the count needs no lock; taking and giving back are an addition each.
"""

from __future__ import annotations

from aiohttp import web

from inferencehub.gateway.http_errors import RETRY_AFTER_SECONDS

MIB = 1024 * 1024


class BodyBudget:
    __slots__ = ("in_use", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit  # 0: no limit
        self.in_use = 0

    def take(self, size: int) -> bool:
        """Hold ``size`` more bytes, unless that would go over the limit."""
        if self.limit and self.in_use + size > self.limit:
            return False
        self.in_use += size
        return True

    def fits(self, size: int) -> bool:
        return not self.limit or self.in_use + size <= self.limit

    def give_back(self, size: int) -> None:
        self.in_use -= size

    def refusal(self, size: int) -> web.HTTPServiceUnavailable:
        """The 503 for ``size`` more bytes that do not fit now (the errors middleware makes it a JSON answer)."""
        return web.HTTPServiceUnavailable(
            text=f"the gateway is busy decoding other requests' bodies ({_size(self.in_use)} held); this one's "
            f"{_size(size)} would go over its limit of {_size(self.limit)} (--max-decoding-bytes); retry later",
            headers={"Retry-After": RETRY_AFTER_SECONDS},
        )


def _size(count: int) -> str:
    return f"{count / MIB:.1f} MiB" if count >= MIB else f"{count} bytes"


async def read_body(request: web.Request, budget: BodyBudget, max_size: int) -> tuple[bytes, int]:
    """The body, and the bytes taken from ``budget`` for it: give them back when the request is done.

    Raises the 503 of ``BodyBudget.refusal`` when the body does not fit now (nothing is then held), and 413 for
    a body over ``max_size`` (announced by its Content-Length: before reading it).
    """
    length = request.content_length
    if length is not None:
        if length > max_size:
            raise web.HTTPRequestEntityTooLarge(max_size=max_size, actual_size=length)
        if not budget.take(length):
            raise budget.refusal(length)
        try:
            return await request.read(), length
        except BaseException:
            budget.give_back(length)
            raise
    chunks: list[bytes] = []  # chunked: held as it arrives
    taken = 0
    try:
        async for chunk in request.content.iter_any():
            if taken + len(chunk) > max_size:
                raise web.HTTPRequestEntityTooLarge(max_size=max_size, actual_size=taken + len(chunk))
            if not budget.take(len(chunk)):
                raise budget.refusal(taken + len(chunk))
            taken += len(chunk)
            chunks.append(chunk)
    except BaseException:
        budget.give_back(taken)
        raise
    return b"".join(chunks), taken
