"""``inferencehub generate MODEL PROMPT``: a generative model's tokens printed as they arrive, through the gateway's
``generate_stream`` (server-sent events); then, on stderr, why it ended, the token counts and the time to the first
token. A failure before the first token is the HTTP error; one after it is the stream's last event."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from typing import Any

from inferencehub.errors import InferenceHubError
from inferencehub.metadata import DEADLINE_HEADER


def event_data(line: bytes) -> Any | None:
    """The JSON of one ``data:`` line of an event stream (None for blank lines, comments and other fields)."""
    if not line.startswith(b"data:"):
        return None
    return json.loads(line[5:].strip())


def summary(event: dict[str, Any], tokens: int, first_token: float | None) -> str:
    """The line written to stderr after the last token."""
    usage = event.get("usage") or {}
    words = [f"finish_reason={event.get('finish_reason', '?')}"]
    words += [f"{key}={usage[key]}" for key in ("prompt_tokens", "completion_tokens") if key in usage]
    words.append(f"tokens_received={tokens}")
    if first_token is not None:
        words.append(f"first_token_ms={first_token * 1000:.1f}")
    return " ".join(words)


async def generate(
    url: str,
    model: str,
    prompt: str,
    max_tokens: int | None,
    stop: list[str],
    timeout: float,
    api_key: str | None,
) -> int:
    import aiohttp

    body: dict[str, Any] = {"text_input": prompt}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if stop:
        body["stop"] = stop
    headers = {DEADLINE_HEADER: str(max(1, int(timeout * 1000)))}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    address = f"{url.rstrip('/')}/v2/models/{model}/generate_stream"
    start = time.perf_counter()
    first_token: float | None = None
    tokens = 0
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout + 5)) as session,
            session.post(address, json=body, headers=headers) as response,
        ):
            if response.status != 200:
                text = await response.text()
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    text = json.loads(text)["error"]
                print(f"inferencehub generate: {response.status}: {text}", file=sys.stderr)
                return 1
            last: dict[str, Any] = {}
            async for line in response.content:
                event = event_data(line)
                if not isinstance(event, dict):
                    continue
                if "error" in event:
                    print(f"\ninferencehub generate: the stream failed: {event['error']}", file=sys.stderr)
                    return 1
                token = event.get("text_output")
                if isinstance(token, str):
                    if first_token is None:
                        first_token = time.perf_counter() - start
                    tokens += 1
                    sys.stdout.write(token)
                    sys.stdout.flush()
                last = event
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise InferenceHubError(f"cannot stream from the gateway at {address}: {exc or type(exc).__name__}") from None
    sys.stdout.write("\n")
    print(summary(last, tokens, first_token), file=sys.stderr)
    return 0
