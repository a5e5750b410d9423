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
import peers
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


PEER_INTRO = """Against Triton 2.51 and MLServer 1.7.1 on the same cores: `wrk -t1` (Debian's wrk, one thread) posts
the same JSON `iris` request (one row of 4 features) to each server, in turn, at concurrency {levels}, {rounds}
round(s) alternating, {duration:.0f} s a run; the table keeps each server's median run (by req/s) at each
concurrency and the CPU each process spent in it. Every server does the same model work on the same weights with
numpy: Triton runs `triton_iris.py` in its Python backend (a stub process beside its C++ server, dynamic batching
up to 64 rows), MLServer `mlserver_iris.py` in its best tuning (`parallel_workers: 0`, uvloop and httptools;
adaptive batching up to 64 rows) and its default one (an inference worker process behind the HTTP process).
InferenceHub is `inferencehub up --replicas 1`'s shape: a gateway (its default `--workers`: one process per CPU,
their CPU summed) and one replica. Beside them, the floor of that shape in Python: `bare_forwarder.py` (one aiohttp
process handing each body as bytes to a grpc.aio server that returns it, both on uvloop: no parsing, no model, no
work, one gRPC call per request), and the same with every request multiplexed by id on one long-lived
stream-stream call (`forward-stream`: the floor of a stream per replica instead of a call per request). At
concurrency 1 no gateway-plus-replica built on aiohttp and grpc.aio answers faster; under load, several gateway
processes and coalesced calls can serve more than its one process does. The machine is shared with other jobs: read
the ratios, measured side by side, not the absolute numbers."""

OURS = "InferenceHub (the defaults)"
TRITON = "Triton (Python backend, dynamic batching)"
MLSERVER_BEST = "MLServer, best tuning (adaptive batching)"
MLSERVER_DEFAULT = "MLServer, default tuning"
FLOOR = "aiohttp + grpc.aio, no work (the floor)"
FLOOR_STREAM = "the floor, one stream for all requests"
# The goals against the peers (issue: faster than Triton on its own ground).
GOALS = {"c64 vs Triton": 1.0, "c1 p50 vs Triton": 1.5, "vs MLServer best": 2.5}


def peer_rows(quick: bool) -> tuple[str, str]:
    """The Triton and MLServer comparison: a Markdown section and a verdict sentence."""
    missing = peers.tools_missing()
    if missing:
        return f"No peer comparison in this run: {missing}.", f"no peer comparison ({missing})"
    levels, rounds, duration = ((16, 1), 1, 0.4) if quick else ((64, 8, 1), 3, 5.0)
    top = levels[0]
    load = os.getloadavg()
    started: list[Process] = []
    servers: dict[str, tuple[dict[str, Process], str]] = {}
    grpc_targets: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            repo = repository(Path(tmp) / "repo", iris=SHIPPED / "iris")
            server, target = replica(repo)
            started.append(server)
            front, url = gateway(f"ipv4:{target}")
            started.append(front)
            servers[OURS] = ({"gateway": front, "replica": server}, url)
            grpc_targets[OURS + ", direct to the replica"] = target
            process, url, target = peers.triton(Path(tmp))
            started.append(process)
            servers[TRITON] = ({"Triton": process}, url)
            grpc_targets[TRITON] = target
            tunings = ("best",) if quick else ("best", "default")  # quick: the script's path, one MLServer
            for tuning, (server, url) in peers.mlservers(tunings, Path(tmp), started).items():
                servers[MLSERVER_BEST if tuning == "best" else MLSERVER_DEFAULT] = ({"MLServer": server}, url)
            here = Path(__file__).resolve().parent
            for name, mode in ((FLOOR, "forward"), (FLOOR_STREAM, "forward-stream")):
                echo = Process([PYTHON, str(here / "bare_forwarder.py"), "echo"], "grpc")
                started.append(echo)
                forwarder = Process([PYTHON, str(here / "bare_forwarder.py"), mode, "--upstream", echo.address], "http")
                started.append(forwarder)
                servers[name] = ({"forwarder": forwarder, "echo server": echo}, f"http://{forwarder.address}")
            result = peers.compare(servers, rounds=rounds, duration=duration, levels=levels, warm_up=not quick)
            grpc = {
                name: {c: peers.perf_analyzer(target, concurrency=c, seconds=duration) for c in (1, top)}
                for name, target in grpc_targets.items()
            }
        finally:
            for process in reversed(started):
                process.stop()
    load_after = os.getloadavg()
    triton = result[TRITON]
    rows = []
    for name, by_level in result.items():
        m = by_level[top]["median"]
        row = [name, m["throughput_rps"], " / ".join(f"{v:,.0f}" for v in by_level[top]["all_rps"])]
        row += [m["latency_ms"].get("p50", float("nan")), m["latency_ms"].get("p99", float("nan"))]
        for c in levels[1:]:
            row += [
                by_level[c]["median"]["throughput_rps"],
                by_level[c]["median"]["latency_ms"].get("p50", float("nan")),
            ]
        row += [
            f"{m['throughput_rps'] / triton[top]['median']['throughput_rps']:.2f}x",
            ", ".join(f"{k} {v:.3f}" for k, v in by_level[top]["cpu"].items()),
            sum(
                r["median"]["errors"].get("http", 0) + r["median"]["errors"].get("socket", 0) for r in by_level.values()
            ),
        ]
        rows.append(row)
    headers = ["server", f"req/s at {top}", "each round", "p50 ms", "p99 ms"]
    for c in levels[1:]:
        headers += [f"req/s at {c}", f"p50 ms at {c}"]
    headers += ["req/s vs Triton", f"CPU ms per request at {top}", "errors"]
    body = PEER_INTRO.format(levels=", ".join(map(str, levels)), rounds=rounds, duration=duration)
    body += "\n\n" + table(headers, rows)
    grpc_rows = [
        [name, *(x for c in (1, top) for x in ((r[c]["throughput_rps"], r[c]["p50_ms"]) if r[c] else ("-", "-")))]
        for name, r in grpc.items()
    ]
    body += (
        f"\n\nOver gRPC, Triton's `perf_analyzer` (one row a request, {duration:.0f} s windows) against InferenceHub's "
        "replica and Triton's gRPC port (no gateway: the gateway speaks HTTP):\n\n"
        + table(["server", "req/s at 1", "p50 ms at 1", f"req/s at {top}", f"p50 ms at {top}"], grpc_rows)
    )
    ours = result[OURS]
    best = result[MLSERVER_BEST][top]["median"]["throughput_rps"]
    measured = {
        "c64 vs Triton": ours[top]["median"]["throughput_rps"] / triton[top]["median"]["throughput_rps"],
        "c1 p50 vs Triton": ours[1]["median"]["latency_ms"]["p50"] / triton[1]["median"]["latency_ms"]["p50"],
        "vs MLServer best": ours[top]["median"]["throughput_rps"] / best,
    }
    met = {
        "c64 vs Triton": measured["c64 vs Triton"] >= GOALS["c64 vs Triton"],
        "c1 p50 vs Triton": measured["c1 p50 vs Triton"] <= GOALS["c1 p50 vs Triton"],
        "vs MLServer best": measured["vs MLServer best"] >= GOALS["vs MLServer best"],
    }
    ours_p50, triton_p50 = ours[1]["median"]["latency_ms"]["p50"], triton[1]["median"]["latency_ms"]["p50"]

    def said(key: str) -> str:
        bound = "at most" if key == "c1 p50 vs Triton" else "at least"
        return f"goal: {bound} {GOALS[key]:.1f}x; {'met' if met[key] else 'NOT met'}"

    parts = [
        f"throughput at concurrency {top} {measured['c64 vs Triton']:.2f}x Triton's ({said('c64 vs Triton')})",
        f"p50 at concurrency 1 {measured['c1 p50 vs Triton']:.2f}x Triton's ({ours_p50:.2f} vs {triton_p50:.2f} ms; "
        f"{said('c1 p50 vs Triton')})",
        f"{measured['vs MLServer best']:.2f}x MLServer's best tuning ({said('vs MLServer best')})",
    ]
    floor = result[FLOOR]
    floor_p50 = floor[1]["median"]["latency_ms"]["p50"]
    stream = result[FLOOR_STREAM]
    stream_p50 = stream[1]["median"]["latency_ms"]["p50"]
    floor_cpu, ours_cpu = floor[top]["cpu"], ours[top]["cpu"]
    verdict = (
        f"Against its peers in one run (load average {load[0]:.1f} before, {load_after[0]:.1f} after, on "
        f"{os.cpu_count()} cores), InferenceHub through its gateway: " + "; ".join(parts) + ". The floor of its "
        f"shape (aiohttp and grpc.aio doing no work) answers at concurrency 1 in {floor_p50:.2f} ms p50, "
        f"{floor_p50 / triton_p50:.2f}x Triton's: with a call per request, no cut in InferenceHub's own work brings "
        "its p50 below that; "
        f"over one stream for all requests, {stream_p50:.2f} ms ({stream_p50 / triton_p50:.2f}x). At "
        f"concurrency {top} the floor's HTTP process spends {floor_cpu['forwarder']:.3f} ms of CPU per request and "
        f"its gRPC server {floor_cpu['echo server']:.3f} (a call each; over one stream "
        f"{stream[top]['cpu']['forwarder']:.3f} and {stream[top]['cpu']['echo server']:.3f}); InferenceHub's gateway "
        f"{ours_cpu['gateway']:.3f} and replica {ours_cpu['replica']:.3f} (calls coalesced), Triton "
        f"{triton[top]['cpu']['Triton']:.3f} in all."
    )
    return body, verdict


def run(out: Path, quick: bool) -> str:
    concurrencies = [1, 8] if quick else [1, 8, 64]
    duration = 0.5 if quick else 6.0
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
        f"goal: 80%); at concurrency 1 the gateway hop adds {hop:.2f} ms to p50 (goal: no more than before "
        f"coalescing, 0.37 ms in a quiet run)."
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
    peer_body, peer_verdict = peer_rows(quick)
    verdict = f"{peer_verdict} {verdict}"
    body += f"\n\n## Against Triton and MLServer\n\n{peer_body}"
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
