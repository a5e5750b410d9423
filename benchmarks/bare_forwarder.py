"""The bare forwarding ceiling: the least an HTTP-to-gRPC hop can cost in Python.

    python benchmarks/bare_forwarder.py echo --port 0                 a grpc.aio server that returns its request
    python benchmarks/bare_forwarder.py forward --upstream HOST:PORT  an aiohttp app forwarding each body to it
    python benchmarks/bare_forwarder.py forward-stream --upstream HOST:PORT    the same over one bidi stream

The forwarder speaks just enough OIP REST for `inferencehub bench` and `wrk` (model metadata, infer, under any
model name) and passes the body through as opaque bytes over one shared channel: no parsing, no validation, no
tensors. InferenceHub's gateway does all of those, so the ratio of the two is the price of its work. Both run on
the event loop InferenceHub's processes run on (uvloop).

``forward`` makes one unary call per request; ``forward-stream`` sends every body, behind an 8-byte id, on one
long-lived stream-stream call that the echo server answers message by message, and a reader task hands each answer
to the request waiting for its id: the floor of multiplexing requests on a stream per replica instead.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os

import grpc
from aiohttp import web

from inferencehub import eventloop
from inferencehub.processes import LISTEN_FILE_ENV, announce

METHOD = "/bench.Echo/Echo"
STREAM_METHOD = "/bench.Echo/Stream"
METADATA = {
    "name": "echo",
    "versions": ["1"],
    "platform": "echo",
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, -1]}],
    "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, -1]}],
}


async def echo(port: int) -> None:
    async def handle(request: bytes, context) -> bytes:
        return request

    async def stream(requests, context):
        async for request in requests:
            yield request

    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(handle),
            "Stream": grpc.stream_stream_rpc_method_handler(stream),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    announce(os.environ.get(LISTEN_FILE_ENV), "echo", grpc=f"127.0.0.1:{bound}")
    await server.wait_for_termination()


async def forward(port: int, upstream: str, stream: bool) -> None:
    channel = grpc.aio.insecure_channel(upstream)
    call = channel.unary_unary(METHOD)
    send = multiplexed(channel) if stream else lambda body: call(body, timeout=30)

    async def metadata(request: web.Request) -> web.Response:
        return web.json_response(METADATA)

    async def infer(request: web.Request) -> web.Response:
        body = await send(await request.read())
        return web.Response(body=body, headers={"Inference-Header-Content-Length": str(len(body))})

    app = web.Application()
    app.add_routes([web.get("/v2/models/{model}", metadata), web.post("/v2/models/{model}/infer", infer)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    host, bound = runner.addresses[0][:2]
    announce(os.environ.get(LISTEN_FILE_ENV), "forwarder", http=f"{host}:{bound}")
    await asyncio.Event().wait()


def multiplexed(channel: grpc.aio.Channel):
    """``send(body)`` over one stream-stream call: each body is queued behind its id for the call to send (gRPC
    writes one message at a time), and a reader task resolves the future waiting for each id as its answer comes
    back. (Queueing measured a little cheaper than each request awaiting ``call.write`` behind a lock.)"""
    outgoing: asyncio.Queue[bytes] = asyncio.Queue()

    async def requests():
        while True:
            yield await outgoing.get()

    call = channel.stream_stream(STREAM_METHOD)(requests())
    waiting: dict[int, asyncio.Future] = {}
    ids = itertools.count()

    async def read() -> None:
        try:
            async for message in call:
                future = waiting.pop(int.from_bytes(message[:8], "little"), None)
                if future is not None and not future.done():
                    future.set_result(message[8:])
        finally:
            for future in waiting.values():
                if not future.done():
                    future.set_exception(ConnectionError("the stream ended"))

    reader = asyncio.get_running_loop().create_task(read())

    async def send(body: bytes) -> bytes:
        if reader.done():
            raise ConnectionError("the stream ended")
        key = next(ids)
        future = waiting[key] = asyncio.get_running_loop().create_future()
        try:
            outgoing.put_nowait(key.to_bytes(8, "little") + body)
            return await future
        finally:
            waiting.pop(key, None)

    return send


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["echo", "forward", "forward-stream"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--upstream", default="127.0.0.1:8081")
    args = parser.parse_args()
    if args.mode == "echo":
        eventloop.run(echo(args.port), "uvloop")
    else:
        eventloop.run(forward(args.port, args.upstream, stream=args.mode == "forward-stream"), "uvloop")


if __name__ == "__main__":
    main()
