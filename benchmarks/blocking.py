"""Blocking: does a heavy model stall the API? A coupled baseline against InferenceHub, same load.

Coupled: one aiohttp process runs a 500 ms CPU-bound model inline in its handler (`coupled_app.py`).
InferenceHub: the gateway and two inference replicas (`inferencehub up`), model `mock-heavy` (500 ms of CPU in a
worker process). Both get the same stream of heavy requests (2 at a time) while a prober calls the health
endpoint and a cheap endpoint (model metadata) every 20 ms; the table shows the prober's latencies.
"""

from __future__ import annotations

import http.client
import re
import threading
import time
from pathlib import Path

import common
import numpy as np
from common import PYTHON, Process, bench, figure, table, write

NAME = "blocking"
TITLE = "Blocking: health and cheap calls while heavy inference runs"


class Prober:
    def __init__(self, host: str, port: int, paths: dict[str, str]) -> None:
        self.host, self.port, self.paths = host, port, paths
        self.latencies: dict[str, list[float]] = {name: [] for name in paths}
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        deadline = time.monotonic() + 300
        while not self.stopping.is_set() and time.monotonic() < deadline:
            for name, path in self.paths.items():
                start = time.perf_counter()
                conn.request("GET", path)
                conn.getresponse().read()
                self.latencies[name].append((time.perf_counter() - start) * 1000)
            time.sleep(0.02)
        conn.close()

    def stop(self) -> dict[str, list[float]]:
        self.stopping.set()
        self.thread.join(60)
        return self.latencies


def measure(url: str, model: str, cheap: str, duration: float) -> tuple[dict, dict]:
    host, port = re.match(r"http://([\d.]+):(\d+)", url).groups()
    prober = Prober(host, int(port), {"health": "/healthz", "cheap": cheap})
    load = bench(model, url=url, concurrency=2, duration=duration)
    return prober.stop(), load


def run(out: Path, quick: bool) -> str:
    duration = 1.2 if quick else 15.0
    here = Path(__file__).resolve().parent
    results = {}
    coupled = Process([PYTHON, str(here / "coupled_app.py"), "--model-ms", "500"], "http")
    try:
        results["coupled (inline model)"] = measure(f"http://{coupled.address}", "heavy", "/v2/models/heavy", duration)
    finally:
        coupled.stop()
    system, url = common.system("--replicas", "2")
    try:
        results["InferenceHub (gateway + 2 replicas)"] = measure(url, "mock-heavy", "/v2/models/iris", duration)
    finally:
        system.stop()

    rows = []
    for setup, (probes, load) in results.items():
        for name, values in probes.items():
            v = np.array(values)
            rows.append(
                [
                    setup,
                    name,
                    len(v),
                    float(np.percentile(v, 50)),
                    float(np.percentile(v, 99)),
                    float(v.max()),
                    load["throughput_rps"],
                ]
            )
    coupled_p99 = rows[0][4]
    hub_p99 = next(r[4] for r in rows if r[0].startswith("InferenceHub") and r[1] == "health")
    verdict = (
        f"Health p99: {hub_p99:.1f} ms through InferenceHub (goal: under 10 ms) against {coupled_p99:.0f} ms "
        "when the model runs inline."
    )
    body = table(["setup", "probe", "probes", "p50 ms", "p99 ms", "max ms", "heavy req/s"], rows)
    write(out, NAME, TITLE, __doc__.split("\n\n", 1)[1].strip(), f"{body}\n\n{verdict}\n\n![plot]({NAME}.png)", quick)

    plt = figure()
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{r[0].split(' (')[0]}\n{r[1]}" for r in rows]
    ax.bar(labels, [r[4] for r in rows], color=["#c44", "#c44", "#4a4", "#4a4"][: len(rows)])
    ax.set(ylabel="p99 latency, ms (log)", yscale="log", title="probe latency while heavy requests run")
    fig.tight_layout()
    fig.savefig(out / f"{NAME}.png", dpi=100)
    plt.close(fig)
    return verdict
