"""Overhead: what each hop costs, for the small `iris` model.

The model call alone (in process), direct gRPC to one inference replica, and HTTP through the gateway to that
replica, at several concurrencies; beside them, the bare forwarding ceiling (`bare_forwarder.py`: an aiohttp
handler passing bytes to a grpc.aio echo over one channel, each in its own process, no parsing). The load
generator (`inferencehub bench`, binary tensor data over HTTP, raw bytes over gRPC) runs on the same machine and
competes for the same cores.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
from common import PYTHON, SHIPPED, Process, bench, cpu_per_request, figure, gateway, replica, repository, table, write

NAME = "overhead"
TITLE = "Overhead and throughput: model alone vs direct gRPC vs through the gateway"


def model_alone(seconds: float) -> float:
    """Median time of one iris predict call on one row, in ms."""
    from inferencehub.inference import runtimes
    from inferencehub.inference.repository import load_config

    model = runtimes.build(load_config(SHIPPED / "iris" / "config.json"))
    x = {"features": np.array([[5.1, 3.5, 1.4, 0.2]], np.float32)}
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        model.predict(x)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def run(out: Path, quick: bool) -> str:
    concurrencies = [1, 8] if quick else [1, 8, 64]
    duration = 1.0 if quick else 6.0
    here = Path(__file__).resolve().parent
    results: dict[str, dict[int, dict]] = {}
    cpu: dict[str, dict[str, float]] = {}
    top = concurrencies[-1]
    alone_ms = model_alone(0.5 if quick else 2.0)
    with tempfile.TemporaryDirectory() as tmp:
        server, target = replica(repository(Path(tmp), iris=SHIPPED / "iris"))
        front, url = None, None
        try:
            front, url = gateway(f"ipv4:{target}")
            bench("iris", grpc=target, concurrency=4, duration=0.5)
            results["direct gRPC"] = {
                c: bench("iris", grpc=target, concurrency=c, duration=duration) for c in concurrencies[:-1]
            }
            results["direct gRPC"][top], cpu["direct gRPC"] = cpu_per_request(
                {"replica": server}, lambda: bench("iris", grpc=target, concurrency=top, duration=duration)
            )
            bench("iris", url=url, concurrency=4, duration=0.5)
            results["through the gateway"] = {
                c: bench("iris", url=url, concurrency=c, duration=duration) for c in concurrencies[:-1]
            }
            results["through the gateway"][top], cpu["through the gateway"] = cpu_per_request(
                {"gateway": front, "replica": server},
                lambda: bench("iris", url=url, concurrency=top, duration=duration),
            )
        finally:
            if front is not None:
                front.stop()
            server.stop()
    echo = Process([PYTHON, str(here / "bare_forwarder.py"), "echo"], "grpc")
    forwarder = Process([PYTHON, str(here / "bare_forwarder.py"), "forward", "--upstream", echo.address], "http")
    try:
        front_url = f"http://{forwarder.address}"
        bench("echo", url=front_url, concurrency=4, duration=0.5, size=4)
        results["bare forwarding ceiling"] = {
            c: bench("echo", url=front_url, concurrency=c, duration=duration, size=4) for c in concurrencies[:-1]
        }
        results["bare forwarding ceiling"][top], cpu["bare forwarding ceiling"] = cpu_per_request(
            {"forwarder": forwarder, "echo server": echo},
            lambda: bench("echo", url=front_url, concurrency=top, duration=duration, size=4),
        )
    finally:
        forwarder.stop()
        echo.stop()

    rows = [["model call alone", "-", 1000 / alone_ms, alone_ms, alone_ms, 0]]
    for path, by_c in results.items():
        for c, s in by_c.items():
            rows.append(
                [
                    path,
                    c,
                    s["throughput_rps"],
                    s["latency_ms"]["p50"],
                    s["latency_ms"]["p99"],
                    sum(s["errors"].values()),
                ]
            )
    gateway_top = results["through the gateway"][top]["throughput_rps"]
    ceiling_top = results["bare forwarding ceiling"][top]["throughput_rps"]
    hop = results["through the gateway"][1]["latency_ms"]["p50"] - results["direct gRPC"][1]["latency_ms"]["p50"]
    verdict = (
        f"At concurrency {top} the gateway serves iris at {gateway_top:.0f} req/s, "
        f"{100 * gateway_top / ceiling_top:.0f}% of the bare forwarding ceiling ({ceiling_top:.0f} req/s; "
        f"goal: 80%); at concurrency 1 the gateway hop adds {hop:.2f} ms to p50 (goal: at most 1 ms)."
    )
    body = table(["path", "concurrency", "req/s", "p50 ms", "p99 ms", "errors"], rows)
    spent_rows = [
        [path, ", ".join(f"{name} {ms:.3f}" for name, ms in parts.items()), sum(parts.values())]
        for path, parts in cpu.items()
    ]
    body += (
        f"\n\nWhere the CPU goes at concurrency {top} (ms of CPU per request, each process; the machine has "
        f"{os.cpu_count()} cores, so the sum bounds throughput):\n\n"
        + table(["path", "CPU ms per request", "total"], spent_rows)
    )
    write(out, NAME, TITLE, __doc__.split("\n\n", 1)[1].strip(), f"{body}\n\n{verdict}\n\n![plot]({NAME}.png)", quick)

    plt = figure()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for path, by_c in results.items():
        left.plot(concurrencies, [by_c[c]["throughput_rps"] for c in concurrencies], marker="o", label=path)
        right.plot(concurrencies, [by_c[c]["latency_ms"]["p50"] for c in concurrencies], marker="o", label=path)
    right.axhline(alone_ms, color="grey", linestyle=":", label="model call alone")
    left.set(xscale="log", xlabel="concurrency", ylabel="requests/s", title="throughput")
    right.set(xscale="log", yscale="log", xlabel="concurrency", ylabel="ms", title="p50 latency")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"{NAME}.png", dpi=100)
    plt.close(fig)
    return verdict
