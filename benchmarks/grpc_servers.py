"""gRPC servers for the replica: grpc.aio (standard loop, uvloop) against the synchronous `grpc.server`.

Each server answers one unary method by returning its request (an `iris`-sized ModelInfer message, as bytes):
- `grpc.aio` on the standard asyncio loop, and on uvloop (what the replica runs);
- `grpc.server` with a pool of 4 threads, the handler answering in its thread (a plain echo);
- `grpc.server` with a pool of 4 threads, each call handed to an asyncio loop in another thread and waited for:
  the bridge the replica would need, since its scheduler, batching and deadlines live on an asyncio loop.
One client process (grpc.aio, 16 calls in flight over one channel) drives each in turn, alternating rounds; the
table keeps each server's median round and the server's CPU per call.

    python benchmarks/grpc_servers.py serve KIND     a server (prints where it listens)
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from common import PYTHON, Process, figure, table, write

from inferencehub.processes import LISTEN_FILE_ENV, announce

NAME = "grpc_servers"
TITLE = "gRPC servers for the replica: grpc.aio against the synchronous server"
KINDS = ["grpc.aio, asyncio loop", "grpc.aio, uvloop", "grpc.server, 4 threads", "grpc.server, bridged to asyncio"]
PAYLOAD = bytes(range(100)) * 2  # about the size of an iris ModelInfer request


def _handler(function):
    return grpc.method_handlers_generic_handler("bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(function)})


async def _aio(port: int) -> None:
    async def echo(request: bytes, context) -> bytes:
        return request

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_handler(echo),))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    announce(os.environ.get(LISTEN_FILE_ENV), "echo", grpc=f"127.0.0.1:{bound}")
    await server.wait_for_termination()


def _sync(port: int, bridged: bool) -> None:
    loop = asyncio.new_event_loop()
    if bridged:
        import threading

        threading.Thread(target=loop.run_forever, daemon=True).start()

    async def answer(request: bytes) -> bytes:
        return request

    def echo(request: bytes, context) -> bytes:
        if bridged:
            return asyncio.run_coroutine_threadsafe(answer(request), loop).result()
        return request

    server = grpc.server(ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers((_handler(echo),))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    announce(os.environ.get(LISTEN_FILE_ENV), "echo", grpc=f"127.0.0.1:{bound}")
    server.wait_for_termination()


async def _load(target: str, seconds: float, concurrency: int) -> int:
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary("/bench.Echo/Echo")
        await call(PAYLOAD)
        done = 0
        end = time.monotonic() + seconds

        async def worker() -> None:
            nonlocal done
            while time.monotonic() < end:
                await call(PAYLOAD, timeout=10)
                done += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done


def run(out: Path, quick: bool) -> str:
    seconds, rounds = (0.4, 1) if quick else (4.0, 3)
    here = Path(__file__).resolve()
    servers = {kind: Process([PYTHON, str(here), "serve", str(i)], "grpc") for i, kind in enumerate(KINDS)}
    results: dict[str, list[tuple[float, float]]] = {kind: [] for kind in KINDS}
    try:
        for _ in range(rounds):
            for kind, server in servers.items():
                before = server.cpu_seconds()
                calls = asyncio.run(_load(server.address, seconds, 16))
                cpu_ms = (server.cpu_seconds() - before) * 1000 / max(calls, 1)
                results[kind].append((calls / seconds, cpu_ms))
    finally:
        for server in servers.values():
            server.stop()
    rows = []
    for kind, runs in results.items():
        rate = statistics.median(r for r, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        rows.append([kind, rate, " / ".join(f"{r:,.0f}" for r, _ in runs), cpu])
    by = {row[0]: row for row in rows}
    verdict = (
        f"server CPU per call: grpc.aio on uvloop {by[KINDS[1]][3]:.3f} ms, on the standard loop "
        f"{by[KINDS[0]][3]:.3f} ms; grpc.server {by[KINDS[2]][3]:.3f} ms, and {by[KINDS[3]][3]:.3f} ms bridged to "
        f"the asyncio loop the replica's scheduler needs."
    )
    body = table(["server", "calls/s (median)", "each round", "server CPU ms per call"], rows)
    intro = __doc__.split("\n\n", 1)[1].split("\n\n    python")[0].strip()
    write(out, NAME, TITLE, intro, f"{body}\n\n{verdict}\n\n![plot]({NAME}.png)", quick)
    plt = figure()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.barh([row[0] for row in rows], [row[3] for row in rows], color="tab:blue")
    ax.set(xlabel="server CPU ms per call (lower is better)", title="echo of an iris-sized message, 16 in flight")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(out / f"{NAME}.png", dpi=100)
    plt.close(fig)
    return verdict


def main() -> None:
    kind = KINDS[int(sys.argv[2])]
    if kind == "grpc.aio, asyncio loop":
        asyncio.run(_aio(0))
    elif kind == "grpc.aio, uvloop":
        import uvloop

        uvloop.run(_aio(0))
    else:
        _sync(0, bridged="bridged" in kind)


if __name__ == "__main__":
    main()
