"""Peers and load tools of the overhead benchmark: Triton and MLServer serving the same `iris` model, `wrk`, and
Triton's `perf_analyzer` for gRPC.

Triton 2.51 is the server binary the ``nvidia-pytriton`` wheel ships (``scripts/install_tools.py --bench`` lays it
out with its Python backend): ``triton_iris.py`` runs in its Python-backend stub with dynamic batching.

MLServer 1.7.1 lives in an environment of its own (``scripts/install_tools.py``, pinned in
``scripts/tool-requirements/mlserver.txt``) and serves ``mlserver_iris.py``, a custom runtime computing what
InferenceHub's ``mlp`` runtime computes from the same shipped weights. Two tunings: ``best`` (``parallel_workers:
0``, the model in the server process; uvloop and httptools installed) and ``default`` (no settings: one inference
worker process behind the HTTP process). ``wrk`` (Debian's) posts the same JSON iris body to every server.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from common import ROOT, SHIPPED

from inferencehub.processes import Child

HERE = Path(__file__).resolve().parent
MLSERVER = ROOT / ".cache" / "tools" / "mlserver" / "bin" / "mlserver"
TRITON = ROOT / ".cache" / "tools" / "triton"  # scripts/install_tools.py lays the server and its backend out here
TRITON_SERVER = TRITON / "package" / "pytriton" / "tritonserver"
TRITON_CONFIG = """name: "iris"
backend: "python"
max_batch_size: 64
input [ {{ name: "features", data_type: TYPE_FP32, dims: [ 4 ] }} ]
output [
  {{ name: "probabilities", data_type: TYPE_FP32, dims: [ 3 ] }},
  {{ name: "label", data_type: TYPE_INT64, dims: [ 1 ], reshape: {{ shape: [ ] }} }}
]
dynamic_batching {{ }}
instance_group [ {{ count: 1, kind: KIND_CPU }} ]
parameters {{ key: "weights", value: {{ string_value: "{weights}" }} }}
"""
IRIS_BODY = json.dumps(
    {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 4], "data": [5.1, 3.5, 1.4, 0.2]}]}
)
TUNINGS = {"best": {"parallel_workers": 0}, "default": {}}  # settings.json
# model-settings.json: the best tuning batches adaptively, as Triton's dynamic batcher and our coalescing do.
MODEL_TUNINGS = {"best": {"max_batch_size": 64, "max_batch_time": 0.002}, "default": {}}


def tools_missing() -> str | None:
    """Why the peer rows cannot run here, or None."""
    if not MLSERVER.exists():
        return "MLServer is not installed: run `make tools` (scripts/install_tools.py)"
    if missing := triton_missing():
        return missing
    if shutil.which("wrk") is None:
        return "wrk is not installed: run `make tools` (it installs Debian's wrk) or `apt-get install wrk`"
    return None


def triton_missing() -> str | None:
    """Why Triton cannot run here, or None."""
    if not (TRITON_SERVER / "bin" / "tritonserver").exists():
        return "Triton is not installed: run `make bench` (scripts/install_tools.py --bench installs it)"
    return None


class TreeProcess(Child):
    """A peer server (its CPU time, like every Child's, includes its descendants: MLServer's inference workers)."""

    def wait_ready(self, url: str, timeout: float = 120.0) -> None:
        """Poll ``url`` (a readiness route) until it answers 200; the ports were chosen here, so none is announced."""
        import time
        import urllib.request

        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            if not self.running or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not get ready at {url}:\n{self.tail()}")
            time.sleep(0.1)


def mlserver(tuning: str, folder: Path) -> tuple[TreeProcess, str]:
    """MLServer serving `iris` over HTTP on a free port, tuned ``best`` or ``default``; returns it and its URL."""
    root = folder / f"mlserver-{tuning}"
    model = root / "iris"
    model.mkdir(parents=True)
    ports = _free_ports(3)
    settings = {"host": "127.0.0.1", "http_port": ports[0], "grpc_port": ports[1], "metrics_port": ports[2]}
    (root / "settings.json").write_text(json.dumps({**settings, **TUNINGS[tuning]}))
    (model / "model-settings.json").write_text(
        json.dumps(
            {
                "name": "iris",
                "implementation": "mlserver_iris.IrisMLP",
                "parameters": {"uri": str(SHIPPED / "iris" / "weights.npz"), "version": "1"},
                **MODEL_TUNINGS[tuning],
            }
        )
    )
    env = {"PYTHONPATH": str(HERE), "MLSERVER_METRICS_DIR": str(root / "metrics")}
    process = TreeProcess(f"mlserver-{tuning}", [str(MLSERVER), "start", str(root)], env=env)
    url = f"http://127.0.0.1:{ports[0]}"
    try:
        process.wait_ready(f"{url}/v2/models/iris/ready")
    except RuntimeError:
        process.stop()
        raise
    return process, url


def triton(folder: Path) -> tuple[TreeProcess, str, str]:
    """Triton 2.51 serving `iris` (``triton_iris.py`` in its Python backend, dynamic batching up to 64 rows) on
    free loopback ports; returns it, its HTTP URL and its gRPC target. Its CPU time includes the backend's stub
    process, a child of the server, as MLServer's includes its workers."""
    model = folder / "triton" / "iris"
    (model / "1").mkdir(parents=True)
    shutil.copy2(HERE / "triton_iris.py", model / "1" / "model.py")
    (model / "config.pbtxt").write_text(TRITON_CONFIG.format(weights=SHIPPED / "iris" / "weights.npz"))
    return triton_serving(folder / "triton", "iris")


def triton_serving(repository: Path, model: str) -> tuple[TreeProcess, str, str]:
    """Triton 2.51 on free loopback ports serving the model repository ``repository``, once ``model`` is ready;
    returns it, its HTTP URL and its gRPC target."""
    http, grpc, metrics = _free_ports(3)
    command = [
        str(TRITON_SERVER / "bin" / "tritonserver"),
        f"--model-repository={repository}",
        f"--backend-directory={TRITON / 'backends'}",
        f"--cache-directory={TRITON_SERVER / 'caches'}",
        "--http-address=127.0.0.1",
        f"--http-port={http}",
        "--grpc-address=127.0.0.1",
        f"--grpc-port={grpc}",
        "--metrics-address=127.0.0.1",
        f"--metrics-port={metrics}",
        "--log-verbose=0",
    ]
    env = {"LD_LIBRARY_PATH": str(TRITON / "package" / "nvidia_pytriton.libs")}
    process = TreeProcess("triton", command, env=env)
    url = f"http://127.0.0.1:{http}"
    try:
        process.wait_ready(f"{url}/v2/models/{model}/ready")
    except RuntimeError:
        process.stop()
        raise
    return process, url, f"127.0.0.1:{grpc}"


def mlservers(tunings, folder: Path, started: list) -> dict[str, tuple[TreeProcess, str]]:
    """Several MLServers, started at once (each takes seconds to import and load); each added to ``started``."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(tunings)) as pool:
        futures = {tuning: pool.submit(mlserver, tuning, folder) for tuning in tunings}
    result = {}
    for tuning, future in futures.items():
        if future.exception() is None:
            result[tuning] = future.result()
            started.append(result[tuning][0])
    for future in futures.values():
        if future.exception() is not None:
            raise future.exception()
    return result


def _free_ports(count: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def wrk(url: str, *, concurrency: int, duration: float, body: str = IRIS_BODY, path: str = "/v2/models/iris/infer"):
    """``wrk -t1 -cN`` posting ``body``; a summary like `inferencehub bench`'s (req/s, p50/p99 ms, errors)."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(
            f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.body = {json.dumps(body)}\n'
        )
    try:
        done = subprocess.run(
            [
                "wrk",
                "-t1",
                f"-c{concurrency}",
                f"-d{max(1, round(duration))}s",
                "--latency",
                "-s",
                script.name,
                url + path,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        os.unlink(script.name)
    return parse_wrk(done.stdout)


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def parse_wrk(out: str) -> dict:
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    latency = {f"p{p}": _ms(m) for p, m in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)$", out, re.M)}
    errors = {}
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors["http"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m and sum(map(int, m.groups())):
        errors["socket"] = sum(map(int, m.groups()))
    return {"throughput_rps": rps, "requests": total, "latency_ms": latency, "errors": errors}


def _client_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk runs as a child, waited for
    return usage.ru_utime + usage.ru_stime


def measure(processes: dict[str, Child], url: str, *, concurrency: int, duration: float) -> tuple[dict, dict]:
    """One wrk run; its summary and the CPU ms per request of each process and of wrk."""
    before = {name: p.cpu_seconds() for name, p in processes.items()}
    client = _client_cpu()
    summary = wrk(url, concurrency=concurrency, duration=duration)
    requests = max(summary["requests"], 1)
    spent = {name: (p.cpu_seconds() - before[name]) * 1000 / requests for name, p in processes.items()}
    spent["wrk"] = (_client_cpu() - client) * 1000 / requests
    return summary, spent


def compare(
    servers: dict[str, tuple[dict[str, Child], str]],
    *,
    rounds: int,
    duration: float,
    levels: tuple[int, ...],
    warm_up: bool = True,
) -> dict:
    """Every server in turn, ``rounds`` times (alternating, so a noisy neighbour hits them all alike): wrk at each
    concurrency of ``levels`` (the CPU of every process measured at each). Per server and level: the runs, and
    the median run (by req/s) with its CPU."""
    runs: dict[str, dict[int, list]] = {name: {c: [] for c in levels} for name in servers}
    for _, url in servers.values() if warm_up else ():  # warm up every server and connection path once
        wrk(url, concurrency=4, duration=1)
    for _ in range(rounds):
        for name, (processes, url) in servers.items():
            for c in levels:
                runs[name][c].append(measure(processes, url, concurrency=c, duration=duration))
    result: dict[str, dict[int, dict]] = {}
    for name in servers:
        result[name] = {}
        for c in levels:
            ordered = sorted(runs[name][c], key=lambda run: run[0]["throughput_rps"])
            median, cpu = ordered[len(ordered) // 2]
            result[name][c] = {"median": median, "cpu": cpu, "all_rps": [r[0]["throughput_rps"] for r in runs[name][c]]}
    return result


PERF_ANALYZER = ROOT / ".cache" / "tools" / "perf-analyzer"


def perf_analyzer(target: str, *, concurrency: int, seconds: float) -> dict | None:
    """Triton's perf_analyzer over gRPC (one row of iris a request) at ``concurrency``: req/s and p50/p99 ms,
    or None where perf_analyzer is not installed (``make tools``)."""
    binary = PERF_ANALYZER / "bin" / "perf_analyzer"
    cuda = next(PERF_ANALYZER.glob("lib/python*/site-packages/nvidia/cuda_runtime/lib"), None)
    if not binary.exists() or cuda is None:
        return None
    done = subprocess.run(
        [
            str(binary),
            *("-i", "grpc", "-u", target, "-m", "iris"),
            *("--concurrency-range", str(concurrency)),
            *("--measurement-interval", str(int(seconds * 1000))),
            *("--stability-percentage", "1000", "--max-trials", "3", "--percentile", "50"),
        ],
        capture_output=True,
        text=True,
        timeout=120 + 10 * seconds,
        env={"LD_LIBRARY_PATH": str(cuda)},
    )
    if done.returncode != 0:
        raise RuntimeError(f"perf_analyzer failed against {target}:\n{done.stdout[-1500:]}{done.stderr[-1500:]}")
    rps = re.search(r"Throughput: ([\d.]+) infer/sec", done.stdout)
    p50 = re.search(r"p50 latency: (\d+) usec", done.stdout)
    p99 = re.search(r"p99 latency: (\d+) usec", done.stdout)
    return {
        "throughput_rps": float(rps.group(1)) if rps else float("nan"),
        "p50_ms": int(p50.group(1)) / 1000 if p50 else float("nan"),
        "p99_ms": int(p99.group(1)) / 1000 if p99 else float("nan"),
    }
