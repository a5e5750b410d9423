"""The ``inferencehub`` command.

up         the whole system on this machine: a gateway and N inference replicas on loopback
inference  one inference replica (gRPC, Open Inference Protocol)
gateway    the HTTP gateway (OIP REST in front of the replicas)
infer      call a model through the gateway or a replica, print its outputs (--async: as a queued job)
generate   stream a generative model's tokens through the gateway as they come
jobs       show or cancel an async job: jobs get ID, jobs cancel ID
bench      put load on the gateway or a replica and summarise what happened
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

import numpy as np

from inferencehub import __version__, eventloop, lifeline, logs
from inferencehub.errors import InferenceHubError
from inferencehub.settings import GatewaySettings, InferenceSettings, UpSettings, add_arguments, from_args


def _run(name: str, coroutine, event_loop: str = "asyncio") -> int:
    try:
        result = eventloop.run(coroutine, event_loop)
    except InferenceHubError as exc:
        print(f"inferencehub {name}: error: {exc}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


def _inference(args: argparse.Namespace) -> int:
    from inferencehub.inference.server import serve

    settings = from_args(InferenceSettings, args)
    logs.configure(settings.log_level)
    return _run("inference", serve(settings), settings.event_loop)


def _gateway(args: argparse.Namespace) -> int:
    from inferencehub.gateway import workers
    from inferencehub.gateway.app import check_settings, serve

    settings = from_args(GatewaySettings, args)
    logs.configure(settings.log_level)
    try:
        count = workers.worker_count(settings)
        if count > 1:
            check_settings(settings)
    except InferenceHubError as exc:
        print(f"inferencehub gateway: error: {exc}", file=sys.stderr)
        return 2
    if count > 1:
        return _run("gateway", workers.supervise(settings, count))
    return _run("gateway", serve(settings), settings.event_loop)


def _up(args: argparse.Namespace) -> int:
    from inferencehub import up

    return _run("up", up.run(from_args(UpSettings, args)))


def _value(text: str):
    """A tensor value: a .npy file, or JSON."""
    if text.endswith(".npy"):
        return np.load(Path(text), allow_pickle=False)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InferenceHubError(f"not JSON and not a .npy file: {text[:60]!r} ({exc.msg})") from None


async def _call(args: argparse.Namespace) -> int:
    from inferencehub.client import to_inputs, transport

    if args.async_ and args.grpc:
        raise InferenceHubError("--async goes through the gateway's job queue: use --url, not --grpc")
    async with transport(args.url, args.grpc, args.timeout, _api_key(args)) as client:
        metadata = await client.metadata(args.model)
        data = {}
        if args.data is not None:
            if len(metadata["inputs"]) != 1:
                names = ", ".join(t["name"] for t in metadata["inputs"])
                raise InferenceHubError(f"model '{args.model}' has several inputs ({names}): use --input NAME=VALUE")
            data[metadata["inputs"][0]["name"]] = _value(args.data)
        for item in args.input:
            name, sep, value = item.partition("=")
            if not sep:
                raise InferenceHubError(f"--input takes NAME=VALUE, got {item!r}")
            data[name] = _value(value)
        if args.async_:
            from inferencehub.jobs_cli import submit_and_poll

            return await submit_and_poll(client, args.model, to_inputs(metadata, data), args.wait)
        outcome = await client.send(client.prepare(args.model, to_inputs(metadata, data)), decode=True)
    if not outcome.ok:
        print(f"inferencehub infer: {outcome.status}: {outcome.error}", file=sys.stderr)
        return 1
    served = f" (served by {outcome.replica})" if outcome.replica else ""
    print(f"{args.model}: {len(outcome.outputs)} output(s) in {outcome.latency * 1000:.1f} ms{served}")
    with np.printoptions(precision=4, suppress=True, threshold=50):
        for name, array in outcome.outputs.items():
            print(f"  {name} {array.dtype} {list(array.shape)}:")
            print("    " + str(array).replace("\n", "\n    "))
    return 0


def _infer(args: argparse.Namespace) -> int:
    return _run("infer", _call(args))


def _generate(args: argparse.Namespace) -> int:
    from inferencehub.generate_cli import generate

    return _run(
        "generate",
        generate(args.url, args.model, args.prompt, args.max_tokens, args.stop, args.timeout, _api_key(args)),
    )


def _jobs(args: argparse.Namespace) -> int:
    from inferencehub.jobs_cli import jobs_command

    return _run("jobs", jobs_command(args.action, args.id, args.url, args.timeout))


def _bench(args: argparse.Namespace) -> int:
    from inferencehub import bench

    config = bench.BenchConfig(
        model=args.model,
        url=args.url,
        grpc=args.grpc,
        concurrency=args.concurrency,
        rate=args.rate,
        max_in_flight=args.max_in_flight,
        duration=args.duration,
        batch=args.batch,
        size=args.size,
        binary=not args.json_data,
        timeout=args.timeout,
        api_key=_api_key(args),
    )
    if config.concurrency < 1 or config.duration <= 0 or (config.rate is not None and config.rate <= 0):
        print("inferencehub bench: error: --concurrency, --duration and --rate must be positive", file=sys.stderr)
        return 2
    try:
        summary = asyncio.run(bench.run(config))
    except InferenceHubError as exc:
        print(f"inferencehub bench: error: {exc}", file=sys.stderr)
        return 2
    bench.print_summary(summary, args.json)
    return 0


def _target_arguments(parser: argparse.ArgumentParser) -> None:
    _gateway_arguments(parser, "seconds per request (default %(default)s)")
    parser.add_argument("--grpc", metavar="TARGET", help="call an inference replica directly over gRPC instead")


def _gateway_arguments(parser: argparse.ArgumentParser, timeout_help: str) -> None:
    default = os.environ.get("INFERENCEHUB_URL", "http://127.0.0.1:8080")
    parser.add_argument("--url", default=default, help="the gateway [env INFERENCEHUB_URL, default %(default)s]")
    parser.add_argument("--timeout", type=float, default=30.0, help=timeout_help)
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        help="API key for a gateway that needs one, sent as Authorization: Bearer [env INFERENCEHUB_API_KEY]",
    )


def _api_key(args: argparse.Namespace) -> str | None:
    # Read here rather than as the flag's default, so --help never prints the key.
    return args.api_key or os.environ.get("INFERENCEHUB_API_KEY") or None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inferencehub", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"inferencehub {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser(
        "up",
        help="run the whole system locally: a gateway and N inference replicas",
        description="Start N inference replicas on 127.0.0.2, 127.0.0.3, ... and the gateway on 127.0.0.1 pointed "
        "at all of them; wait until all are ready; print where to send requests. Ctrl-C stops everything.",
    )
    add_arguments(up, UpSettings)
    up.set_defaults(run=_up)

    inference = commands.add_parser(
        "inference",
        help="run an inference replica (gRPC, Open Inference Protocol)",
        description="Run an inference replica: the Open Inference Protocol over gRPC, with health, reflection "
        "and Prometheus metrics. Stops gracefully on SIGTERM or Ctrl-C.",
    )
    add_arguments(inference, InferenceSettings)
    inference.set_defaults(run=_inference)

    gateway = commands.add_parser(
        "gateway",
        help="run the HTTP gateway (OIP REST in front of the inference replicas)",
        description="Run the HTTP gateway: the Open Inference Protocol REST API (JSON and binary tensor data), "
        "proxied over one client-side load-balanced gRPC channel to the inference replicas.",
    )
    add_arguments(gateway, GatewaySettings)
    gateway.set_defaults(run=_gateway)

    infer = commands.add_parser(
        "infer",
        help="call a model and print its outputs",
        description="Call a model through the gateway (or a replica with --grpc) and print its outputs. "
        "Values are JSON (nested lists) or a .npy file; datatypes and names come from the model's metadata.",
    )
    infer.add_argument("model")
    infer.add_argument("--data", help="the value of the model's only input: JSON or a .npy file")
    infer.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="one input by name (repeat for several): JSON or a .npy file",
    )
    infer.add_argument(
        "--async",
        dest="async_",
        action="store_true",
        help="submit as a job (Prefer: respond-async), show its progress while polling, print the result",
    )
    infer.add_argument("--wait", type=float, default=3600.0, help="with --async: seconds to poll (default 3600)")
    _target_arguments(infer)
    infer.set_defaults(run=_infer)

    generate = commands.add_parser(
        "generate",
        help="stream a generative model's tokens",
        description="Send a prompt to a generative model (such as mock-llm) through the gateway's generate_stream "
        "and print its tokens as they arrive; then, on stderr, the finish reason, the token counts and the time to "
        "the first token. --timeout is the whole stream's deadline.",
    )
    generate.add_argument("model")
    generate.add_argument("prompt")
    generate.add_argument("--max-tokens", type=int, help="the model's max_tokens input (its default if left out)")
    generate.add_argument("--stop", action="append", default=[], help="a stop string (repeat for several)")
    _gateway_arguments(generate, "seconds the whole stream may take (default %(default)s)")
    generate.set_defaults(run=_generate)

    jobs = commands.add_parser(
        "jobs",
        help="show or cancel an async job",
        description="Show an async job (its status, times, and result or error) or cancel it, through the gateway.",
    )
    jobs.add_argument("action", choices=["get", "cancel"])
    jobs.add_argument("id", help="the job's id, as `infer --async` or the 202 answer gave it")
    default = os.environ.get("INFERENCEHUB_URL", "http://127.0.0.1:8080")
    jobs.add_argument("--url", default=default, help="the gateway [env INFERENCEHUB_URL, default %(default)s]")
    jobs.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default %(default)s)")
    jobs.set_defaults(run=_jobs)

    bench = commands.add_parser(
        "bench",
        help="put load on the gateway or a replica",
        description="Closed loop (--concurrency) or open loop (--rate) load for a bounded --duration, through the "
        "gateway or straight to a replica (--grpc). Prints a progress line each second, then requests, errors by "
        "status, throughput, latency percentiles and the share each replica served.",
    )
    bench.add_argument("--model", default="mock", help="model to call (default %(default)s)")
    _target_arguments(bench)
    load = bench.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, default=8, help="requests in flight (default %(default)s)")
    load.add_argument("--rate", type=float, help="requests a second, open loop, instead of a concurrency")
    bench.add_argument("--max-in-flight", type=int, default=512, help="open loop's cap (default %(default)s)")
    bench.add_argument("--duration", type=float, default=10.0, help="seconds (default %(default)s)")
    bench.add_argument("--batch", type=int, default=1, help="size of the first variable dimension (default 1)")
    bench.add_argument("--size", type=int, default=16, help="size of the other variable dimensions (default 16)")
    bench.add_argument("--json-data", action="store_true", help="send JSON tensors instead of binary data")
    bench.add_argument("--json", action="store_true", help="print the summary as JSON")
    bench.set_defaults(run=_bench)
    return parser


def main(argv: list[str] | None = None) -> None:
    lifeline.tie_from_env()  # started by `inferencehub up`: end with it
    args = build_parser().parse_args(argv)
    sys.exit(args.run(args))
