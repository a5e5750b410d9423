"""Model churn: 200 load/unload cycles of a large model through the gateway, with traffic to another model.

One replica in `explicit` model control mode serves `iris` from start; `digits` (an MLP behind 64 -> 4096 -> 4096
random features: about 70 MB of weights, built at load) is loaded and unloaded 200 times through the gateway's
`POST /v2/repository/models/digits/load|unload`, one after the other. Meanwhile one client sends `iris` requests
through the same gateway without pause. The replica's resident memory (RSS, from /proc) is read after every load and
every unload: start is after the first cycle (the first load imports the runtime's code and warms the allocator),
end after the last. Unloading must free what the model held: the goal is end within 10% of start.
"""

from __future__ import annotations

import http.client
import json
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from common import SHIPPED, gateway, replica, repository, table, write

NAME = "model_churn"
TITLE = "Model churn: 200 load/unload cycles of a 70 MB model, memory and traffic to another model"
IRIS = json.dumps({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]})


class Traffic(threading.Thread):
    def __init__(self, address: str) -> None:
        super().__init__(daemon=True)
        self.address = address
        self.stopping = threading.Event()
        self.ok = 0
        self.failed: list[str] = []

    def run(self) -> None:
        host, port = self.address.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        while not self.stopping.is_set():
            conn.request("POST", "/v2/models/iris/infer", body=IRIS)
            response = conn.getresponse()
            answer = response.read()
            if response.status == 200:
                self.ok += 1
            else:
                self.failed.append(f"{response.status} {answer[:100]!r}")
        conn.close()


def post(url: str, path: str) -> float:
    started = time.perf_counter()
    request = urllib.request.Request(f"{url}{path}", data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        response.read()
    return time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] if ordered else float("nan")


def run(out: Path, quick: bool) -> str:
    cycles = 4 if quick else 200
    with tempfile.TemporaryDirectory() as tmp:
        repo = repository(Path(tmp) / "models", iris=SHIPPED / "iris", digits=SHIPPED / "digits")
        server, target = replica(repo, "--model-control-mode", "explicit", "--load", "iris", "--processes", "1")
        front, url = gateway(target)
        traffic = Traffic(url.removeprefix("http://"))
        loaded_rss, unloaded_rss, load_s, unload_s = [], [], [], []
        before = server.rss_mib()
        try:
            traffic.start()
            for _ in range(cycles):
                load_s.append(post(url, "/v2/repository/models/digits/load"))
                loaded_rss.append(server.rss_mib())
                unload_s.append(post(url, "/v2/repository/models/digits/unload"))
                unloaded_rss.append(server.rss_mib())
        finally:
            traffic.stopping.set()
            traffic.join(30)
            front.stop()
            server.stop()

    start, end = unloaded_rss[0], unloaded_rss[-1]
    growth = (end - start) / start * 100
    rows = [
        ["before any load", before, "-"],
        ["after the first unload (start)", start, "-"],
        ["after the last unload (end)", end, f"{growth:+.1f}%"],
        ["while loaded: median", percentile(loaded_rss, 50), "-"],
        ["highest seen", max(loaded_rss + unloaded_rss), "-"],
    ]
    timing = table(
        ["action", "p50 ms", "p95 ms", "max ms"],
        [
            ["load digits (every replica)", *(percentile(load_s, q) * 1000 for q in (50, 95)), max(load_s) * 1000],
            [
                "unload digits (every replica)",
                *(percentile(unload_s, q) * 1000 for q in (50, 95)),
                max(unload_s) * 1000,
            ],
        ],
    )
    verdict = (
        f"{cycles} cycles: replica RSS {start:.0f} MiB at start, {end:.0f} MiB at end ({growth:+.1f}%, goal within "
        f"10%: {'met' if abs(growth) <= 10 else 'NOT met'}); iris traffic meanwhile: {traffic.ok} requests, "
        f"{len(traffic.failed)} failed."
    )
    body = "\n\n".join(
        [
            table(["replica RSS", "MiB", "vs start"], rows),
            timing,
            f"Requests to `iris` during the churn: {traffic.ok} succeeded, {len(traffic.failed)} failed"
            + (f" (first: {traffic.failed[0]})" if traffic.failed else "")
            + ".",
            verdict,
            f"![plot]({NAME}.png)",
        ]
    )
    write(out, NAME, TITLE, __doc__.split("\n\n", 1)[1].strip(), body, quick)

    from common import figure

    plt = figure()
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(range(1, cycles + 1), loaded_rss, label="after load")
    ax.plot(range(1, cycles + 1), unloaded_rss, label="after unload")
    ax.axhline(start * 1.1, linestyle=":", color="grey", label="start + 10%")
    ax.set(xlabel="cycle", ylabel="replica RSS (MiB)", title="Replica memory over load/unload cycles")
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"{NAME}.png", dpi=100)
    plt.close(fig)
    return verdict
