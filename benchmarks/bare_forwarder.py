"""The bare forwarding ceiling: the least an HTTP-to-gRPC hop can cost in Python.

    python benchmarks/bare_forwarder.py echo --port 0                 a grpc.aio server that returns its request
    python benchmarks/bare_forwarder.py forward --upstream HOST:PORT  an aiohttp app forwarding each body to it

The forwarder speaks just enough OIP REST for `inferencehub bench` and `wrk` (model metadata, infer, under any
model name) and passes the body through as opaque bytes over one shared channel: no parsing, no validation, no
tensors. InferenceHub's gateway does all of those, so the ratio of the two is the price of its work. Both run on
the event loop InferenceHub's processes run on (uvloop).
"""

from __future__ import annotations

import argparse
import asyncio
import os

import grpc
from aiohttp import web

from inferencehub import eventloop
from inferencehub.processes import LISTEN_FILE_ENV, announce

METHOD = "/bench.Echo/Echo"
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

    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler("bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(handle)})
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    announce(os.environ.get(LISTEN_FILE_ENV), "echo", grpc=f"127.0.0.1:{bound}")
    await server.wait_for_termination()


async def forward(port: int, upstream: str) -> None:
    channel = grpc.aio.insecure_channel(upstream)
    call = channel.unary_unary(METHOD)

    async def metadata(request: web.Request) -> web.Response:
        return web.json_response(METADATA)

    async def infer(request: web.Request) -> web.Response:
        body = await call(await request.read(), timeout=30)
        return web.Response(body=body, headers={"Inference-Header-Content-Length": str(len(body))})

    app = web.Application()
    app.add_routes([web.get("/v2/models/{model}", metadata), web.post("/v2/models/{model}/infer", infer)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    host, bound = runner.addresses[0][:2]
    announce(os.environ.get(LISTEN_FILE_ENV), "forwarder", http=f"{host}:{bound}")
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["echo", "forward"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--upstream", default="127.0.0.1:8081")
    args = parser.parse_args()
    eventloop.run(echo(args.port) if args.mode == "echo" else forward(args.port, args.upstream), "uvloop")


if __name__ == "__main__":
    main()
