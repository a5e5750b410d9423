"""``--workers N``: N gateway processes on one port, started and supervised by the gateway's main process.

The main process serves nothing itself. It binds the port first (``SO_REUSEPORT``, not listening: it holds the
port, so a taken one stops start-up at once and ``--port 0`` picks one port for all), then starts N workers,
each an ordinary gateway (``--workers 1``) that binds the same port with ``SO_REUSEPORT``: the kernel spreads new
connections over the workers' listeners. Workers share nothing but two things in a per-run folder:

- ``metrics/``: prometheus_client's multiprocess files (``PROMETHEUS_MULTIPROC_DIR``), so that one scrape of
  ``/metrics`` at any worker sums every worker's counters and histograms;
- ``worker-I.sock``: each worker's private unix socket, where the worker answering ``/status.json`` gathers its
  siblings' last minute of traffic (``gateway.siblings``).

Workers are tied to the main process (``inferencehub.lifeline``): whatever ends it, SIGKILL included, ends them.
A worker that exits is restarted (its metric gauges marked dead); one that exits more than ``RESTART_LIMIT``
times within ``RESTART_WINDOW_SECONDS`` stops the gateway with a message naming it and a non-zero exit. SIGTERM
or SIGINT is passed to every worker, which drains as a single gateway does; the main process exits once all
have, or kills those left after the drain, the grace and a margin.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import deque
from dataclasses import fields
from pathlib import Path

from inferencehub.errors import InferenceHubError
from inferencehub.gateway.siblings import RUN_DIR_ENV, WORKER_ENV
from inferencehub.processes import Child, ChildError, announce, describe_exit, write_line
from inferencehub.settings import GatewaySettings, env_name

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
RESTART_LIMIT = 5
RESTART_WINDOW_SECONDS = 60.0
STOP_MARGIN_SECONDS = 5.0
POLL_SECONDS = 0.1


class WorkerError(InferenceHubError):
    """A worker could not start, or kept exiting."""


def cpu_count() -> int:
    """The CPUs this process may use: its cgroup's CPU quota rounded up, else its CPU affinity."""
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            return max(1, math.ceil(int(quota) / int(period)))
    with contextlib.suppress(OSError, ValueError):  # cgroup v1
        quota = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text().strip()
        period = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text().strip()
        if int(quota) > 0:
            return max(1, math.ceil(int(quota) / int(period)))
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def worker_count(settings: GatewaySettings) -> int:
    if settings.gateway_workers < 0:
        raise WorkerError(f"--workers must be 0 (one per CPU) or more, got {settings.gateway_workers}")
    if settings.rate_limit and settings.gateway_workers > 1:
        raise WorkerError(
            f"--rate-limit needs one gateway process (its token buckets live in memory), not --workers "
            f"{settings.gateway_workers}: set --workers 1 (or 0), and run more gateway pods for more capacity"
        )
    if settings.rate_limit:
        return 1  # N workers would each allow the whole rate
    return settings.gateway_workers or cpu_count()


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound (not listening) to ``host:port`` with SO_REUSEPORT, holding the port for the workers."""
    try:
        family, _, _, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address)
        except BaseException:
            sock.close()
            raise
        return sock
    except OSError as exc:
        raise WorkerError(f"cannot listen for HTTP on {host}:{port}: {exc.strerror or exc}") from None


def worker_environment(settings: GatewaySettings, port: int, run_dir: Path) -> dict[str, str]:
    """Every setting as its env var (flags would show secrets in process lists), for one serving worker each."""
    env = {env_name(f.name): _env_value(getattr(settings, f.name)) for f in fields(settings)}
    env[env_name("port")] = str(port)
    env[env_name("gateway_workers")] = "1"
    env[RUN_DIR_ENV] = str(run_dir)
    env[MULTIPROC_ENV] = str(run_dir / "metrics")
    env.pop(env_name("listen_file"))  # each worker announces itself to its Child's listen file
    return env


def _env_value(value: object) -> str:
    return "" if value is None else str(value)


class Worker:
    def __init__(self, index: int, env: dict[str, str]) -> None:
        self.index = index
        self.env = {**env, WORKER_ENV: str(index)}
        self.exits: deque[float] = deque()
        self.child: Child | None = None

    def start(self) -> Child:
        command = [sys.executable, "-m", "inferencehub.gateway"]
        self.child = Child(f"gateway worker {self.index}", command, env=self.env, echo=write_line, keep=50, tied=True)
        return self.child


async def supervise(settings: GatewaySettings, count: int) -> int:
    """Run ``count`` workers on one port until SIGTERM or SIGINT; 1 if they kept exiting. The caller has checked
    the settings (``app.check_settings``): contradictions are reported once, not by each worker."""
    reserved = reserve_port(settings.host, settings.port)
    port = reserved.getsockname()[1]
    run_dir = Path(tempfile.mkdtemp(prefix="inferencehub-gateway-"))
    (run_dir / "metrics").mkdir()
    env = worker_environment(settings, port, run_dir)
    workers = [Worker(i, env) for i in range(count)]
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        for worker in workers:
            worker.start()
        await _wait_listening(workers, stopping)
        if stopping.is_set():
            return 0
        pids = ",".join(str(w.child.pid) for w in workers if w.child)
        log.info("gateway listening: http://%s:%d with %d workers (pids %s)", settings.host, port, count, pids)
        announce(settings.listen_file, "gateway", http=f"{settings.host}:{port}", workers=pids)
        return await _watch(workers, stopping, run_dir)
    finally:
        try:  # the handlers stay while the workers drain: a repeated SIGTERM must not end this process early
            await _stop(workers, settings.drain_seconds + settings.grace_seconds + STOP_MARGIN_SECONDS)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            reserved.close()
            shutil.rmtree(run_dir, ignore_errors=True)


async def _wait_listening(workers: list[Worker], stopping: asyncio.Event, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    waiting = list(workers)
    while waiting and not stopping.is_set():
        for worker in list(waiting):
            assert worker.child is not None
            try:
                if worker.child.poll_listening() is not None:
                    waiting.remove(worker)
            except ChildError as exc:
                raise WorkerError(f"{exc}:\n{worker.child.tail()}") from None
        if time.monotonic() > deadline:
            raise WorkerError(f"gateway worker {waiting[0].index} did not start listening within {timeout:.0f}s")
        await asyncio.sleep(POLL_SECONDS)


async def _watch(workers: list[Worker], stopping: asyncio.Event, run_dir: Path) -> int:
    """Restart workers that exit, until a signal (0) or a crash loop (1)."""
    from prometheus_client import multiprocess

    while not stopping.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), POLL_SECONDS)
        if stopping.is_set():
            break
        for worker in workers:
            child = worker.child
            if child is None or child.running:
                continue
            how = describe_exit(child.returncode)
            multiprocess.mark_process_dead(child.pid, str(run_dir / "metrics"))
            child.release()
            now = time.monotonic()
            worker.exits.append(now)
            while worker.exits and now - worker.exits[0] > RESTART_WINDOW_SECONDS:
                worker.exits.popleft()
            if len(worker.exits) > RESTART_LIMIT:
                log.error(
                    "gateway worker %d exited %d times within %.0fs (last: %s): stopping the gateway",
                    worker.index,
                    len(worker.exits),
                    RESTART_WINDOW_SECONDS,
                    how,
                )
                worker.child = None
                return 1
            log.warning("gateway worker %d (pid %d) exited (%s): restarting it", worker.index, child.pid, how)
            worker.start()
    return 0


async def _stop(workers: list[Worker], timeout: float) -> None:
    """SIGTERM to every worker (each drains), then SIGKILL to any left after ``timeout``."""
    children = [w.child for w in workers if w.child is not None]
    for child in children:
        if child.running:
            child.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(c.running for c in children) and time.monotonic() < deadline:
        await asyncio.sleep(POLL_SECONDS)
    for child in children:
        if child.running:
            log.warning("%s did not stop within %.0fs: killing it", child.name, timeout)
        child.kill()
