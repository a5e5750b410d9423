"""The ``inferencehub`` command: ``inferencehub inference`` runs an inference replica."""

from __future__ import annotations

import argparse
import asyncio
import sys

from inferencehub import __version__, logs
from inferencehub.errors import InferenceHubError
from inferencehub.settings import InferenceSettings, add_arguments, from_args


def _run_inference(args: argparse.Namespace) -> int:
    from inferencehub.inference.server import serve

    settings = from_args(InferenceSettings, args)
    logs.configure(settings.log_level)
    try:
        asyncio.run(serve(settings))
    except InferenceHubError as exc:
        print(f"inferencehub inference: error: {exc}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inferencehub", description=__doc__)
    parser.add_argument("--version", action="version", version=f"inferencehub {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    inference = commands.add_parser(
        "inference",
        help="run an inference replica (gRPC, Open Inference Protocol)",
        description="Run an inference replica: the Open Inference Protocol over gRPC, with health, reflection "
        "and Prometheus metrics. Stops gracefully on SIGTERM or Ctrl-C.",
    )
    add_arguments(inference, InferenceSettings)
    inference.set_defaults(run=_run_inference)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.run(args))
