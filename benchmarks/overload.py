"""Overload: offered load at 2x and 5x a model's capacity, with and without admission control.

The model waits 20 ms per call (a sleeping mock, so the load generator keeps the CPU) and runs 4 calls at
once: its capacity is 200 requests/s, measured first in a closed loop. Open-loop load then arrives at 2x and
5x that for a bounded time, straight to the replica over gRPC with a 10 s client deadline. "bounded" is the
shipped behaviour: a queue of 16, then RESOURCE_EXHAUSTED at once. "unbounded" lets the queue grow, and lifts
the server-wide `--max-concurrent-rpcs` cap too (what a server without admission control does). Goodput is the
successful requests per second, until the last answer. Peak memory is the replica's resident set high-water mark.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from common import bench, figure, replica, repository, table, write

NAME = "overload"
TITLE = "Overload: goodput and latency at 2x and 5x capacity, bounded vs unbounded queue"
MODEL = {
    "runtime": "mock",
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, -1]}],
    "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, -1]}],
    "parameters": {"mode": "sleep", "latency": {"distribution": "fixed", "ms": 20}},
}


def run(out: Path, quick: bool) -> str:
    duration = 0.6 if quick else 8.0
    rows, capacity = [], None
    for queue_name, queue, rpcs in (("bounded", 16, "1000"), ("unbounded", 1_000_000, "0")):
        with tempfile.TemporaryDirectory() as tmp:
            config = {**MODEL, "scheduling": {"max_concurrency": 4, "max_queue_size": queue}}
            server, target = replica(repository(Path(tmp), **{"capacity-200": config}), "--max-concurrent-rpcs", rpcs)
            try:
                if capacity is None:
                    capacity = bench("capacity-200", grpc=target, concurrency=16, duration=duration)["throughput_rps"]
                for factor in (2, 5):
                    s = bench(
                        "capacity-200",
                        grpc=target,
                        rate=factor * capacity,
                        duration=duration,
                        max_in_flight=100_000,
                        timeout=10.0,
                    )
                    errors = s["errors"]
                    rows.append(
                        [
                            queue_name,
                            f"{factor}x",
                            s["offered_rps"],
                            s["throughput_rps"],
                            s["latency_ms"]["p50"],
                            s["latency_ms"]["p99"],
                            100 * errors.get("RESOURCE_EXHAUSTED", 0) / max(s["requests"], 1),
                            100 * errors.get("DEADLINE_EXCEEDED", 0) / max(s["requests"], 1),
                            server.peak_rss_mib(),
                        ]
                    )
            finally:
                server.stop()
    bounded5 = next(r for r in rows if r[0] == "bounded" and r[1] == "5x")
    unbounded5 = next(r for r in rows if r[0] == "unbounded" and r[1] == "5x")
    verdict = (
        f"At 5x capacity the bounded queue keeps admitted p99 at {bounded5[5]:.0f} ms with goodput "
        f"{bounded5[3]:.0f}/s, refusing {bounded5[6]:.0f}% at once; unbounded, p99 is {unbounded5[5]:.0f} ms "
        f"and {unbounded5[7]:.0f}% time out."
    )
    body = f"Measured capacity: {capacity:.0f} requests/s.\n\n" + table(
        [
            "queue",
            "offered",
            "offered req/s",
            "goodput req/s",
            "p50 ms (admitted)",
            "p99 ms (admitted)",
            "refused %",
            "timed out %",
            "peak RSS MiB",
        ],
        rows,
    )
    write(out, NAME, TITLE, __doc__.split("\n\n", 1)[1].strip(), f"{body}\n\n{verdict}\n\n![plot]({NAME}.png)", quick)

    plt = figure()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for queue_name in ("bounded", "unbounded"):
        mine = [r for r in rows if r[0] == queue_name]
        left.bar([f"{queue_name}\n{r[1]}" for r in mine], [r[3] for r in mine], label=queue_name)
        right.bar([f"{queue_name}\n{r[1]}" for r in mine], [r[5] for r in mine], label=queue_name)
    left.set(ylabel="successful requests/s", title="goodput")
    right.set(ylabel="ms", title="p99 latency of admitted requests", yscale="log")
    fig.tight_layout()
    fig.savefig(out / f"{NAME}.png", dpi=100)
    plt.close(fig)
    return verdict
