"""What every benchmark shares: servers as subprocesses on loopback, the load generator, tables, plots,
and a description of the machine the numbers came from."""

from __future__ import annotations

import asyncio
import os
import platform
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from inferencehub.processes import Child, ChildError, gateway_command, inference_command

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


class Process(Child):
    """A server subprocess started by the project's harness; ``address`` is what it announced."""

    def __init__(self, args: list[str], key: str, env: dict[str, str] | None = None) -> None:
        super().__init__(Path(args[2] if args[1] == "-m" else args[1]).name, args, env=env)
        try:
            self.address = self.wait_listening(120)[key]
        except ChildError as exc:
            self.kill()
            raise RuntimeError(str(exc)) from None

    def peak_rss_mib(self) -> float:
        try:
            return self.rss_mib(peak=True)
        except OSError:
            return float("nan")


def replica(models: Path, *args: str, host: str = "127.0.0.1") -> tuple[Process, str]:
    """An inference replica on a free port; returns it and its gRPC target, once it is ready."""
    process = Process(inference_command("--models", str(models), "--drain-seconds", "0", *args, host=host), "grpc")
    process.wait_log(" ready: ")
    return process, process.address


def gateway(upstream: str, *args: str) -> tuple[Process, str]:
    process = Process(gateway_command(upstream, "--drain-seconds", "0", *args), "http")
    return process, f"http://{process.address}"


def system(*args: str, env: dict[str, str] | None = None) -> tuple[Process, str]:
    """``inferencehub up`` on free ports; returns it and the gateway's URL, once everything is ready."""
    command = [PYTHON, "-m", "inferencehub", "up", "--port", "0", "--inference-port", "0"]
    process = Process([*command, "--inference-metrics-port", "0", *args], "http", env)
    return process, f"http://{process.address}"


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
