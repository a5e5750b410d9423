"""Dynamic batching: the digits MLP at concurrency 1, 8, 32 and 64, batching off and on, side by side.

Both models are the shipped `digits` (same weights, same replica, measured one after the other); the
unbatched one has no `batching` section. Load comes straight to the replica over gRPC, one row per request.
Goal: at least 3x the throughput at concurrency 32 with a p99 no worse than unbatched.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from common import SHIPPED, bench, figure, replica, repository, table, write

NAME = "batching"
TITLE = "Dynamic batching: digits MLP, batching off vs on"


def run(out: Path, quick: bool) -> str:
    config = json.loads((SHIPPED / "digits" / "config.json").read_text())
    config.pop("name")
    unbatched = {k: v for k, v in config.items() if k != "batching"}
    concurrencies = [1, 8, 32] if quick else [1, 8, 32, 64]
    duration = 0.4 if quick else 8.0
    results: dict[str, dict[int, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        models = repository(
            Path(tmp),
            **{
                "digits-batched": {**config, "_weights_from": SHIPPED / "digits"},
                "digits-unbatched": {**unbatched, "_weights_from": SHIPPED / "digits"},
            },
        )
        server, target = replica(models)
        try:
            for model in ("digits-unbatched", "digits-batched"):
                bench(model, grpc=target, concurrency=4, duration=0.5)  # warm up
                results[model] = {c: bench(model, grpc=target, concurrency=c, duration=duration) for c in concurrencies}
        finally:
            server.stop()

    rows = []
    for c in concurrencies:
        off, on = results["digits-unbatched"][c], results["digits-batched"][c]
        rows.append(
            [
                c,
                off["throughput_rps"],
                on["throughput_rps"],
                on["throughput_rps"] / off["throughput_rps"],
                off["latency_ms"]["p50"],
                on["latency_ms"]["p50"],
                off["latency_ms"]["p99"],
                on["latency_ms"]["p99"],
                sum(off["errors"].values()) + sum(on["errors"].values()),
            ]
        )
    at32 = next(r for r in rows if r[0] == 32)
    verdict = (
        f"At concurrency 32 batching gives {at32[3]:.1f}x the throughput (goal: 3x) with p99 "
        f"{at32[7]:.1f} ms against {at32[6]:.1f} ms unbatched (goal: no worse)."
    )
    body = table(
        [
            "concurrency",
            "req/s off",
            "req/s on",
            "speed-up",
            "p50 ms off",
            "p50 ms on",
            "p99 ms off",
            "p99 ms on",
            "errors",
        ],
        rows,
    )
    write(out, NAME, TITLE, __doc__.split("\n\n", 1)[1].strip(), f"{body}\n\n{verdict}\n\n![plot]({NAME}.png)", quick)

    plt = figure()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for model, label in (("digits-unbatched", "batching off"), ("digits-batched", "batching on")):
        left.plot(concurrencies, [results[model][c]["throughput_rps"] for c in concurrencies], marker="o", label=label)
        right.plot(
            concurrencies, [results[model][c]["latency_ms"]["p99"] for c in concurrencies], marker="o", label=label
        )
    left.set(xlabel="concurrency", ylabel="requests/s", title="throughput", xscale="log")
    right.set(xlabel="concurrency", ylabel="ms", title="p99 latency", xscale="log")
    left.legend()
    fig.tight_layout()
    fig.savefig(out / f"{NAME}.png", dpi=100)
    plt.close(fig)
    return verdict
