"""Scaling out: throughput of a CPU-bound model with 1, 2 and 4 inference replicas behind the gateway.

`inferencehub up --replicas N`, each replica with one worker process, serving a mock that burns 50 ms of CPU per
call (`busy` mode); 8 requests in flight through the gateway. The machine's cores bound the gain: past one
replica per core, replicas share cores (the core count is in the machine line below).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import common
from common import bench, figure, repository, table, write

NAME = "scaling"
TITLE = "Scaling out: 1, 2 and 4 replicas of a CPU-bound model"
MODEL = {
    "runtime": "mock",
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, -1]}],
    "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, -1]}],
    "parameters": {"mode": "busy", "latency": {"distribution": "fixed", "ms": 50}},
}


def run(out: Path, quick: bool) -> str:
    duration = 0.6 if quick else 10.0
    counts = [1, 2] if quick else [1, 2, 4]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        models = repository(Path(tmp), **{"busy-50ms": dict(MODEL)})
        for replicas in counts:
            system, url = common.system(
                "--replicas", str(replicas), "--models", str(models), env={"INFERENCEHUB_PROCESSES": "1"}
            )
            try:
                bench("busy-50ms", url=url, concurrency=8, duration=0.2 if quick else 0.5)
                results[replicas] = bench("busy-50ms", url=url, concurrency=8, duration=duration)
            finally:
                system.stop()
    base = results[1]["throughput_rps"]
    rows = []
    for replicas, s in results.items():
        shares = ", ".join(f"{name} {100 * v['share']:.0f}%" for name, v in sorted(s["replicas"].items()))
        rows.append(
            [
                replicas,
                s["throughput_rps"],
                s["throughput_rps"] / base,
                s["latency_ms"]["p50"],
                s["latency_ms"]["p99"],
                sum(s["errors"].values()),
                shares,
            ]
        )
    two = results[2]["throughput_rps"] / base
    verdict = f"2 replicas serve {two:.2f}x what 1 does on this {os.cpu_count()}-core machine" + (
        f"; 4 replicas {results[4]['throughput_rps'] / base:.2f}x (cores, not replicas, bound it)."
        if 4 in results
        else "."
    )
    body = table(["replicas", "req/s", "vs 1 replica", "p50 ms", "p99 ms", "errors", "share served"], rows)
    write(out, NAME, TITLE, __doc__.split("\n\n", 1)[1].strip(), f"{body}\n\n{verdict}\n\n![plot]({NAME}.png)", quick)

    plt = figure()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(counts, [results[c]["throughput_rps"] for c in counts], marker="o", label="measured")
    ax.plot(counts, [base * min(c, os.cpu_count() or 1) for c in counts], linestyle=":", label="one core per replica")
    ax.set(xlabel="replicas", ylabel="requests/s", title="busy 50 ms model, concurrency 8", xticks=counts)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"{NAME}.png", dpi=100)
    plt.close(fig)
    return verdict
