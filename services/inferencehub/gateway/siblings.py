"""Gateway workers (``gateway.workers``) see each other's last minute of traffic for ``/status.json``.

Each worker listens on a private unix socket in the gateway's run folder, ``worker-I.sock``, answering
``GET /part`` with its pid, readiness, ``Traffic.window()`` and its token streams' ``StreamWindow.part()``. The
worker that answers ``/status.json`` reads its siblings' parts there (a short timeout each; a sibling being
restarted is left out and counted as missing) and merges them with its own, so the page sees the whole gateway's
requests and streams whichever worker the connection reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from pathlib import Path

import aiohttp
from aiohttp import web

RUN_DIR_ENV = "INFERENCEHUB_GATEWAY_RUN_DIR"  # set by the main process in each worker's environment
WORKER_ENV = "INFERENCEHUB_GATEWAY_WORKER"  # the worker's index, 0..N-1
PART_TIMEOUT_SECONDS = 1.0
Window = tuple[dict[str, int], int, list[tuple[str, float]]]


def socket_path(run_dir: Path, index: int) -> Path:
    return run_dir / f"worker-{index}.sock"


async def serve_part(run_dir: Path, index: int, part: Callable[[], dict]) -> web.AppRunner:
    """Answer ``GET /part`` with ``part()`` on this worker's socket; the caller cleans the runner up."""

    async def handler(request: web.Request) -> web.Response:
        return web.json_response(part())

    app = web.Application()
    app.router.add_get("/part", handler)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    path = socket_path(run_dir, index)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # left by this worker's previous run
    await web.UnixSite(runner, str(path)).start()
    return runner


async def gather(run_dir: Path, index: int) -> tuple[list[dict], int]:
    """The siblings' parts (every worker's socket but ``index``'s) and how many did not answer."""
    paths = [p for p in run_dir.glob("worker-*.sock") if p != socket_path(run_dir, index)]
    answers = await asyncio.gather(*(_part(p) for p in paths))
    parts = [a for a in answers if a is not None]
    return parts, len(answers) - len(parts)


async def _part(path: Path) -> dict | None:
    timeout = aiohttp.ClientTimeout(total=PART_TIMEOUT_SECONDS)
    try:
        async with (
            aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path)), timeout=timeout) as session,
            session.get("http://worker/part") as response,
        ):
            return await response.json() if response.status == 200 else None
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None


def window_part(window: Window, streams: dict, *, ready: bool, draining: bool) -> dict:
    """This worker's part: its traffic ``window``, its ``streams`` (``StreamWindow.part()``) and its state."""
    replicas, errors, latencies = window
    return {
        "pid": os.getpid(),
        "ready": ready,
        "draining": draining,
        "replicas": replicas,
        "errors": errors,
        "latencies": latencies,
        "streams": streams,
    }


def merged(parts: list[dict]) -> Window:
    """One window from several workers' parts."""
    replicas: dict[str, int] = {}
    errors = 0
    latencies: list[tuple[str, float]] = []
    for part in parts:
        for name, count in part["replicas"].items():
            replicas[name] = replicas.get(name, 0) + count
        errors += part["errors"]
        latencies.extend((r, s) for r, s in part["latencies"])
    return replicas, errors, latencies
