"""Run the benchmarks, write their tables and plots into benchmarks/results/.

    python benchmarks/run.py                 # all of them (about 10 minutes on 2 cores)
    python benchmarks/run.py --only batching overload
    python benchmarks/run.py --quick --out /tmp/bench   # seconds per benchmark: checks the scripts, not the numbers

Every server runs on loopback; every load is bounded in time.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

BENCHMARKS = [
    "batching",
    "overload",
    "blocking",
    "serialization",
    "overhead",
    "grpc_servers",
    "scaling",
    "tls",
    "tracing",
    "balancing",
    "async_jobs",
    "model_churn",
    "streaming",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run only these")
    parser.add_argument("--quick", action="store_true", help="short runs, to check the scripts")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="where results go (default %(default)s)")
    args = parser.parse_args()
    if args.quick:  # checking the scripts: one gateway process each (fewer processes to start), not the default
        os.environ["INFERENCEHUB_GATEWAY_WORKERS"] = "1"
    for name in args.only or BENCHMARKS:
        started = time.monotonic()
        print(f"== {name} ...", flush=True)
        verdict = importlib.import_module(name).run(args.out, args.quick)
        print(f"   {verdict}\n   ({time.monotonic() - started:.0f} s; {args.out / (name + '.md')})", flush=True)


if __name__ == "__main__":
    main()
