"""Server-sent events framing (the WHATWG ``text/event-stream`` format), as the generate and OpenAI routes send it.

Each event is one ``data:`` line holding compact JSON (JSON never contains a raw newline, so one line is always
enough) and a blank line. The OpenAI stream ends with ``data: [DONE]``; Triton's ``generate_stream`` just ends.
"""

from __future__ import annotations

from typing import Any

import orjson

CONTENT_TYPE = "text/event-stream; charset=utf-8"
HEADERS = {
    "Content-Type": CONTENT_TYPE,
    "Cache-Control": "no-cache",
    # nginx (and so ingress-nginx) buffers proxied answers unless told not to: each event must go at once
    "X-Accel-Buffering": "no",
}
DONE = b"data: [DONE]\n\n"


def event(data: Any) -> bytes:
    """One ``data:`` event carrying ``data`` as compact JSON."""
    return b"data: " + orjson.dumps(data) + b"\n\n"


def parse(body: bytes) -> list[Any]:
    """The JSON of every ``data:`` event in ``body`` (``[DONE]`` as the string ``"[DONE]"``); for tests and the CLI.

    Follows the format's rules as far as these routes use them: events end at a blank line, several ``data:``
    lines of one event are joined with newlines, comment lines (``:``) and other fields are skipped.
    """
    found: list[Any] = []
    for block in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        lines = [line[5:].removeprefix(b" ") for line in block.split(b"\n") if line.startswith(b"data:")]
        if not lines:
            continue
        data = b"\n".join(lines)
        found.append("[DONE]" if data == b"[DONE]" else orjson.loads(data))
    return found
