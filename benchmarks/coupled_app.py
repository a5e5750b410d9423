"""The coupled baseline: one aiohttp process that runs the model inline in its request handlers.

It speaks just enough of the OIP REST API for `inferencehub bench` (model metadata, infer) and has a
/healthz, like the gateway. Its model burns CPU for `--model-ms` inside the handler, as an inline call
to a CPU-bound model does: while it runs, the event loop answers nothing else.

    python benchmarks/coupled_app.py --port 0
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

from aiohttp import web

from inferencehub.processes import LISTEN_FILE_ENV, announce

METADATA = {
    "name": "heavy",
    "versions": ["1"],
    "platform": "inline",
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, -1]}],
    "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, -1]}],
}


def create_app(model_seconds: float) -> web.Application:
    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def metadata(request: web.Request) -> web.Response:
        return web.json_response(METADATA)

    async def infer(request: web.Request) -> web.Response:
        body = await request.read()
        end = time.perf_counter() + model_seconds
        while time.perf_counter() < end:  # the model, inline: blocks the event loop
            pass
        header = int(request.headers.get("Inference-Header-Content-Length", len(body)))
        return web.Response(body=body, headers={"Inference-Header-Content-Length": str(header)})

    app = web.Application()
    app.add_routes(
        [web.get("/healthz", healthz), web.get("/v2/models/heavy", metadata), web.post("/v2/models/heavy/infer", infer)]
    )
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--model-ms", type=float, default=500.0)
    args = parser.parse_args()

    async def serve() -> None:
        runner = web.AppRunner(create_app(args.model_ms / 1000), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", args.port).start()
        host, port = runner.addresses[0][:2]
        announce(os.environ.get(LISTEN_FILE_ENV), "coupled", http=f"{host}:{port}")
        await asyncio.Event().wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
