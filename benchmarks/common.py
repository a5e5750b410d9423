"""What every benchmark shares: servers as subprocesses on loopback, the load generator, tables, plots,
and a description of the machine the numbers came from."""

from __future__ import annotations

import asyncio
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "services" / "inferencehub" / "model_repository"
MODELS = Path(__file__).resolve().parent / "models"
PYTHON = sys.executable


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    cpu = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    kib = re.search(r"^MemTotal:\s+(\d+) kB", meminfo, re.M)
    return (
        f"{os.cpu_count()} cores ({cpu.group(1) if cpu else 'unknown CPU'})"
        + (f", {int(kib.group(1)) / 1024 / 1024:.0f} GiB" if kib else "")
        + f", {platform.system()} {platform.release()}, Python {platform.python_version()}"
    )


class Process:
    """A server subprocess whose log is scanned for the line that says where it listens."""

    def __init__(self, args: list[str], pattern: str, env: dict[str, str] | None = None) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})}
        )
        threading.Thread(target=self._read, daemon=True).start()
        regex = re.compile(pattern)
        deadline = time.monotonic() + 120
        while True:
            match = next((m for line in list(self.lines) if (m := regex.search(line))), None)
            if match:
                self.match = match
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{' '.join(args[:4])} did not start:\n" + "\n".join(self.lines[-20:]))
            time.sleep(0.05)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())

    def wait_for(self, text: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in list(self.lines)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"never saw {text!r}:\n" + "\n".join(self.lines[-20:]))
            time.sleep(0.05)

    def cpu_seconds(self) -> float:
        """User plus system CPU time the process has used so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_rss_mib(self) -> float:
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
            return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024
        except (OSError, AttributeError):
            return float("nan")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def replica(models: Path, *args: str, host: str = "127.0.0.1") -> tuple[Process, str]:
    """An inference replica on a free port; returns it and its gRPC target, once it is ready."""
    process = Process(
        [
            PYTHON,
            "-m",
            "inferencehub",
            "inference",
            "--host",
            host,
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--models",
            str(models),
            "--drain-seconds",
            "0",
            *args,
        ],
        r"listening: gRPC on ([\d.]+):(\d+)",
    )
    process.wait_for(" ready: ")
    return process, f"{process.match.group(1)}:{process.match.group(2)}"


def gateway(upstream: str, *args: str) -> tuple[Process, str]:
    process = Process(
        [
            PYTHON,
            "-m",
            "inferencehub",
            "gateway",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--upstream",
            upstream,
            "--drain-seconds",
            "0",
            *args,
        ],
        r"listening: http://([\d.]+):(\d+)",
    )
    return process, f"http://{process.match.group(1)}:{process.match.group(2)}"


def repository(tmp: Path, **configs: dict) -> Path:
    """A model repository: shipped model folders linked by name, or new configs (dicts) written out."""
    import json

    tmp.mkdir(parents=True, exist_ok=True)
    for name, config in configs.items():
        folder = tmp / name
        if isinstance(config, Path):
            folder.symlink_to(config)
            continue
        folder.mkdir()
        source = config.pop("_weights_from", None)
        if source is not None:
            (folder / "weights.npz").symlink_to(source / "weights.npz")
        (folder / "config.json").write_text(json.dumps({"name": name, **config}))
    return tmp


def bench(
    model: str,
    *,
    url: str | None = None,
    grpc: str | None = None,
    concurrency: int = 8,
    rate: float | None = None,
    duration: float = 5.0,
    batch: int = 1,
    size: int = 16,
    max_in_flight: int = 512,
    timeout: float = 60.0,
    api_key: str | None = None,
) -> dict:
    """One `inferencehub bench` run, in this process; returns its summary."""
    from inferencehub import bench as load

    config = load.BenchConfig(
        model=model,
        url=url or "",
        grpc=grpc,
        concurrency=concurrency,
        rate=rate,
        duration=duration,
        batch=batch,
        size=size,
        max_in_flight=max_in_flight,
        timeout=timeout,
        api_key=api_key,
    )
    with quiet_stderr():
        return asyncio.run(load.run(config))


def cpu_per_request(processes: dict[str, Process], run) -> tuple[dict, dict[str, float]]:
    """Run ``run()`` (a bench); return its summary and the CPU ms per request of each process and the client."""
    import resource

    def own() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    before = {name: p.cpu_seconds() for name, p in processes.items()}
    client = own()
    summary = run()
    requests = max(summary["requests"], 1)
    spent = {name: (p.cpu_seconds() - before[name]) * 1000 / requests for name, p in processes.items()}
    spent["load generator"] = (own() - client) * 1000 / requests
    return summary, spent


@contextmanager
def quiet_stderr():
    """Hide the load generator's progress lines (the benchmark prints its own)."""
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def table(headers: list[str], rows: list[list]) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:,.2f}" if abs(value) < 1000 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write(out: Path, name: str, title: str, intro: str, body: str, quick: bool) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    mode = " (quick mode: short runs, for checking the scripts, not for reading numbers)" if quick else ""
    text = (
        f"# {title}\n\n{intro}\n\nMachine: {machine()}.{mode}\n"
        f"Run: `python benchmarks/run.py --only {name}`, {time.strftime('%Y-%m-%d')}.\n\n{body}\n"
    )
    path = out / f"{name}.md"
    path.write_text(text)
    return path


def figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
