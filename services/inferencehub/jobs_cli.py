"""``inferencehub infer --async`` and ``inferencehub jobs get|cancel ID``: async inference from the command line."""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from inferencehub.client import _decode_http, _error_text
from inferencehub.errors import InferenceHubError
from inferencehub.jobqueue import FINAL
from inferencehub.metadata import HEADER_LENGTH, PREFER_HEADER, PREFERENCE_APPLIED_HEADER


def split_job(payload: bytes, header_length: str | None) -> tuple[dict, bytes]:
    """A job document and the binary outputs that follow it (binary tensor data extension)."""
    size = int(header_length) if header_length else len(payload)
    return json.loads(payload[:size]), payload[size:]


def result_outputs(doc: dict, blobs: bytes) -> dict[str, np.ndarray]:
    header = json.dumps(doc["result"]).encode()
    return _decode_http(header + blobs, str(len(header)))


async def _request(session, method: str, url: str, **kwargs) -> tuple[int, bytes, dict]:
    import aiohttp

    try:
        async with session.request(method, url, **kwargs) as response:
            return response.status, await response.read(), dict(response.headers)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise InferenceHubError(f"cannot reach the gateway at {url}: {exc or type(exc).__name__}") from None


async def submit_and_poll(transport, model: str, arrays: dict[str, np.ndarray], timeout: float) -> int:
    """Submit with ``Prefer: respond-async``, show progress while polling, print the result."""
    url, body, headers = transport.prepare(model, arrays)
    status, payload, answer = await _request(
        transport.session, "POST", url, data=body, headers={**headers, PREFER_HEADER: "respond-async"}
    )
    if status == 200 and PREFERENCE_APPLIED_HEADER not in answer:
        raise InferenceHubError(f"{transport.url} has no job queue (start the gateway with --nats URL)")
    if status != 202:
        print(f"inferencehub infer: {status}: {_error_text(payload)}", file=sys.stderr)
        return 1
    job_id = json.loads(payload)["id"]
    location = transport.url + answer.get("Location", f"/v2/jobs/{job_id}")
    print(f"job {job_id} submitted ({location})", file=sys.stderr, flush=True)
    start = time.monotonic()
    shown, interval = "", 0.05
    while True:
        status, payload, answer = await _request(transport.session, "GET", location)
        if status != 200:
            print(f"inferencehub infer: job {job_id}: {status}: {_error_text(payload)}", file=sys.stderr)
            return 1
        doc, blobs = split_job(payload, answer.get(HEADER_LENGTH))
        elapsed = time.monotonic() - start
        if doc["status"] != shown:
            print(f"  {elapsed:6.1f}s  {doc['status']}", file=sys.stderr, flush=True)
            shown = doc["status"]
        if doc["status"] in FINAL:
            break
        if elapsed > timeout:
            print(
                f"inferencehub infer: job {job_id} still {doc['status']} after {timeout:.0f}s; "
                f"see `inferencehub jobs get {job_id}`",
                file=sys.stderr,
            )
            return 1
        await _sleep(interval)
        interval = min(interval * 1.5, 1.0)
    if doc["status"] != "succeeded":
        print(f"inferencehub infer: job {job_id} {doc['status']}: {doc.get('error', '')}", file=sys.stderr)
        return 1
    outputs = result_outputs(doc, blobs)
    print(f"{model}: {len(outputs)} output(s), job {job_id} finished in {elapsed:.1f} s")
    print_outputs(outputs)
    return 0


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


def print_outputs(outputs: dict[str, np.ndarray]) -> None:
    with np.printoptions(precision=4, suppress=True, threshold=50):
        for name, array in outputs.items():
            print(f"  {name} {array.dtype} {list(array.shape)}:")
            print("    " + str(array).replace("\n", "\n    "))


async def jobs_command(action: str, job_id: str, url: str, timeout: float) -> int:
    import aiohttp

    base = url.rstrip("/")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        method = "GET" if action == "get" else "DELETE"
        status, payload, headers = await _request(session, method, f"{base}/v2/jobs/{job_id}")
    if status != 200:
        print(f"inferencehub jobs {action}: {status}: {_error_text(payload)}", file=sys.stderr)
        return 1
    doc, blobs = split_job(payload, headers.get(HEADER_LENGTH))
    if blobs:  # binary outputs (asked for at submit): shown as JSON data here
        outputs = result_outputs(doc, blobs)
        for out in doc["result"]["outputs"]:
            out.pop("parameters", None)
            out["data"] = outputs[out["name"]].ravel().tolist()
    print(json.dumps(doc, indent=2))
    return 0
