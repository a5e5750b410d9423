"""Tracing: what OpenTelemetry costs, off (the default) and on (every request traced and exported).

The same gateway and replica (the small `iris` model, HTTP through the gateway) are started three times:
without an OTLP endpoint; with one (`--otlp-endpoint` on both processes, every span exported over OTLP/HTTP to a
sink process on loopback that accepts and discards); and with one but sampling a tenth of the traces
(`OTEL_TRACES_SAMPLER=parentbased_traceidratio`, `OTEL_TRACES_SAMPLER_ARG=0.1`), the usual production setting.
Off, no span is created and nothing of OpenTelemetry is imported; on, each sampled request makes seven spans
(three in the gateway, four in the replica) and the batch exporter ships them in the background.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from common import PYTHON, SHIPPED, Process, bench, cpu_per_request, figure, gateway, replica, repository, table, write

NAME = "tracing"
TITLE = "Tracing: the cost of OpenTelemetry spans, off and on"

SINK = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
    def log_message(self, *a): pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
print(f"sink listening: http://127.0.0.1:{s.server_address[1]}", flush=True)
s.serve_forever()
"""


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """Env vars for the servers started inside (they inherit this process's environment)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def measure(
    models: Path, concurrencies: list[int], duration: float, extra: list[str], env: dict[str, str] | None = None
) -> tuple[dict, dict]:
    with environment(env or {}):
        server, target = replica(models, *extra)
    front = None
    try:
        with environment(env or {}):
            front, url = gateway(f"ipv4:{target}", *extra)
        bench("iris", url=url, concurrency=4, duration=0.5)
        results = {c: bench("iris", url=url, concurrency=c, duration=duration) for c in concurrencies[:-1]}
        top = concurrencies[-1]
        results[top], cpu = cpu_per_request(
            {"gateway": front, "replica": server},
            lambda: bench("iris", url=url, concurrency=top, duration=duration),
        )
        return results, cpu
    finally:
        if front is not None:
            front.stop()
        server.stop()


def run(out: Path, quick: bool) -> str:
    concurrencies = [1, 8]
    duration = 1.0 if quick else 6.0
    sink = Process([PYTHON, "-c", SINK], r"sink listening: (\S+)")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            models = repository(Path(tmp), iris=SHIPPED / "iris")
            traced = ["--otlp-endpoint", sink.match.group(1)]
            sampled = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}
            runs = {
                "tracing off": measure(models, concurrencies, duration, []),
                "tracing on, every request exported": measure(models, concurrencies, duration, traced),
                "tracing on, 10% sampled": measure(models, concurrencies, duration, traced, sampled),
            }
    finally:
        sink.stop()

    rows = []
    for name, (results, cpu) in runs.items():
        for c, s in results.items():
            cpu_cell = (
                f"{sum(v for k, v in cpu.items() if k != 'load generator'):.3f}" if c == concurrencies[-1] else "-"
            )
            rows.append(
                [
                    name,
                    c,
                    s["throughput_rps"],
                    s["latency_ms"]["p50"],
                    s["latency_ms"]["p99"],
                    cpu_cell,
                    sum(s["errors"].values()),
                ]
            )
    off, on, sampled_run = (runs[k][0] for k in runs)
    top = concurrencies[-1]

    def server_cpu(name: str) -> float:
        return sum(v for k, v in runs[name][1].items() if k != "load generator")

    cpu_off = server_cpu("tracing off")
    cpu_on = server_cpu("tracing on, every request exported")
    cpu_sampled = server_cpu("tracing on, 10% sampled")
    verdict = (
        f"Tracing every request costs {cpu_on - cpu_off:.3f} ms of server CPU per request "
        f"({100 * (cpu_on / max(cpu_off, 1e-9) - 1):.0f}% more); at concurrency {top} throughput is "
        f"{100 * on[top]['throughput_rps'] / max(off[top]['throughput_rps'], 1e-9):.0f}% of tracing off, and at "
        f"concurrency 1 p50 moves by {on[1]['latency_ms']['p50'] - off[1]['latency_ms']['p50']:+.2f} ms. "
        f"Sampling 10% costs {cpu_sampled - cpu_off:.3f} ms per request "
        f"({100 * sampled_run[top]['throughput_rps'] / max(off[top]['throughput_rps'], 1e-9):.0f}% of the "
        "throughput). Off, the cost is a None check per hook."
    )
    body = table(["configuration", "concurrency", "req/s", "p50 ms", "p99 ms", "server CPU ms/request", "errors"], rows)
    write(out, NAME, TITLE, __doc__.split("\n\n", 1)[1].strip(), f"{body}\n\n{verdict}\n\n![plot]({NAME}.png)", quick)

    plt = figure()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = list(runs)
    width = 0.35
    for i, c in enumerate(concurrencies):
        xs = [j + (i - 0.5) * width for j in range(len(names))]
        left.bar(xs, [runs[n][0][c]["throughput_rps"] for n in names], width, label=f"concurrency {c}")
        right.bar(xs, [runs[n][0][c]["latency_ms"]["p50"] for n in names], width, label=f"concurrency {c}")
    for axis, title, unit in ((left, "throughput", "requests/s"), (right, "p50 latency", "ms")):
        axis.set_xticks(range(len(names)), ["off", "on, all", "on, 10%"])
        axis.set(ylabel=unit, title=title)
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"{NAME}.png", dpi=100)
    plt.close(fig)
    return verdict
