"""This replica's load, reported to clients as an ORCA load report on every response.

gRPC's ``weighted_round_robin`` policy weighs each backend by the ``xds.data.orca.v3.OrcaLoadReport``
it finds, serialized, in the trailing metadata key ``endpoint-load-metrics-bin``: weight =
``rps_fractional / (application_utilization + eps / rps_fractional * penalty)`` (``cpu_utilization``
stands in when ``application_utilization`` is 0). What this replica reports, averaged over the last
``window`` seconds:

- ``application_utilization``: how full the models' execution slots were: the time-averaged number of
  busy slots of each model's scheduler relative to its capacity (its concurrent calls,
  ``scheduling.max_concurrency``), summed over models. 1.0 is every slot busy all the time. A slot
  waiting on a sleep-bound model counts as much as one burning CPU. By Little's law this is
  ``rps x service time / capacity``, so the client's weight comes out as ``capacity / service time``:
  a replica 4x slower gets a quarter of the weight, one whose CPU is taken by a neighbour gets less
  as its calls take longer, whatever share it had so far.
- ``named_metrics["in_flight_utilization"]``: the same with queued calls counted too (every
  ``ModelInfer`` in the replica). Not used for the weight on purpose: a weight that also falls with
  queue length feeds back on itself (more traffic, longer queue, less weight, shorter queue, more
  weight...) and, with reports that lag a second or two, oscillates: in one experiment, at 85% load on three
  equal replicas, it made p99 10 to 25 times round robin's. Queueing still lowers a replica's weight through
  ``eps`` when it ends in refusals or expired deadlines.
- streams: a generation on a decoupled model (``ModelStreamInfer``) holds one of its model's execution slots from
  its start to its final response, so open streams count as busy slots in ``application_utilization`` and as in
  flight, like unary calls: a replica full of streams weighs less, and is not picked first.
- ``cpu_utilization``: CPU time of this process and its model worker processes, as a fraction of the
  CPUs it may run on.
- ``mem_utilization``: this process's resident memory as a fraction of the machine's (Linux).
- ``rps_fractional`` and ``eps``: ``ModelInfer`` calls completed, and calls that failed on the
  replica's side (internal errors, overload, deadlines), per second.

Cheap on the hot path: a call costs a few clock reads and float operations; the report is built and
serialized every ``interval`` seconds (0.2 s) by a background task, and every response reuses the same
bytes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
from dataclasses import dataclass

import grpc

from inferencehub.metadata import LOAD_REPORT_KEY, REPLICA_KEY
from inferencehub.protocol.xds.data.orca.v3.orca_load_report_pb2 import OrcaLoadReport

log = logging.getLogger(__name__)

# Failures that say something about this replica (not about the caller's request).
REPLICA_FAULTS = frozenset(
    {
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass
class _Tick:
    seconds: float
    busy: float  # integral of the busy-slot utilization over the tick
    in_flight: float  # integral of the in-flight (running or queued) utilization
    completed: int
    failed: int
    cpu: float  # CPU seconds used in the tick


class _Level:
    """A level that moves up and down, and its integral over time."""

    __slots__ = ("area", "last", "value")

    def __init__(self, now: float) -> None:
        self.value = 0.0
        self.area = 0.0
        self.last = now

    def add(self, delta: float) -> None:
        now = time.monotonic()
        self.area += self.value * (now - self.last)
        self.last = now
        self.value = max(0.0, self.value + delta)

    def take(self, now: float) -> float:
        """The integral up to ``now``, restarting it."""
        area = self.area + self.value * (now - self.last)
        self.area, self.last = 0.0, now
        return area


def _memory_share() -> float:
    """This process's resident memory as a fraction of physical memory (Linux); 0 where unknown."""
    try:
        with open("/proc/self/statm", "rb") as f:
            resident = int(f.read().split()[1])
        return resident / os.sysconf("SC_PHYS_PAGES")
    except (OSError, IndexError, ValueError, AttributeError):
        return 0.0


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of another process (Linux); 0 where /proc is not there."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS
    except (OSError, IndexError, ValueError):
        return 0.0


class LoadReporter:
    """Counts calls in and out; keeps ``trailers`` (replica name + serialized ORCA report) up to date."""

    def __init__(
        self,
        replica: str,
        *,
        interval: float = 0.2,
        window: float = 2.0,
        cpus: int = 1,
        worker_pids=lambda: (),
    ) -> None:
        self.replica = replica
        self.interval = interval
        self.ticks: collections.deque[_Tick] = collections.deque(maxlen=max(1, round(window / interval)))
        self.cpus = max(1, cpus)
        self.worker_pids = worker_pids
        self.shares: dict[str, float] = {}  # model name -> 1 / its capacity
        self.report = OrcaLoadReport()
        self.trailers: tuple[tuple[str, str | bytes], ...] = ((REPLICA_KEY, replica),)
        now = time.monotonic()
        self._busy = _Level(now)
        self._in_flight = _Level(now)
        self._completed = 0
        self._failed = 0
        self._tick_started = now
        self._cpu = self._cpu_now()
        self._task: asyncio.Task | None = None
        self._publish()

    def watch(self, schedulers: dict) -> None:
        """Follow each model's scheduler (name -> ModelScheduler): its busy slots, relative to its capacity."""
        for name, scheduler in schedulers.items():
            share = 1.0 / max(1, scheduler.concurrency)
            self.shares[name] = share
            scheduler.on_busy = lambda delta, share=share: self._busy.add(delta * share)

    def forget(self, name: str) -> None:
        """A model was unloaded: its calls no longer count (a call still finishing ends with the share it began)."""
        self.shares.pop(name, None)

    # --- the hot path -----------------------------------------------------------------------

    def begin(self, model: str) -> float:
        """A call for ``model`` came in; returns its share, to pass to ``end``."""
        share = self.shares.get(model, 0.0)
        self._in_flight.add(share)
        return share

    def end(self, share: float, code: grpc.StatusCode | None) -> None:
        """The call is over (``code`` None: the caller went away)."""
        self._in_flight.add(-share)
        self._completed += 1
        if code in REPLICA_FAULTS:
            self._failed += 1

    # --- the background part ----------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="load report")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.tick()
            except Exception:  # a report must never take the replica down
                log.exception("load report failed")

    def _cpu_now(self) -> float:
        own = time.process_time()
        return own + sum(_cpu_seconds(pid) for pid in self.worker_pids())

    def tick(self) -> None:
        """Close the current tick, recompute the report over the window, serialize it once."""
        now = time.monotonic()
        cpu = self._cpu_now()
        self.ticks.append(
            _Tick(
                now - self._tick_started,
                self._busy.take(now),
                self._in_flight.take(now),
                self._completed,
                self._failed,
                max(0.0, cpu - self._cpu),
            )
        )
        self._completed, self._failed, self._cpu, self._tick_started = 0, 0, cpu, now
        self._publish()

    def _publish(self) -> None:
        seconds = sum(t.seconds for t in self.ticks)
        report = OrcaLoadReport(mem_utilization=_memory_share())
        if seconds > 0:
            report.application_utilization = sum(t.busy for t in self.ticks) / seconds
            report.named_metrics["in_flight_utilization"] = sum(t.in_flight for t in self.ticks) / seconds
            report.rps_fractional = sum(t.completed for t in self.ticks) / seconds
            report.eps = sum(t.failed for t in self.ticks) / seconds
            report.cpu_utilization = sum(t.cpu for t in self.ticks) / seconds / self.cpus
        self.report = report
        serialized = report.SerializeToString()
        # An all-zero report serializes to nothing, and gRPC drops empty values: then send none (same meaning).
        name = (REPLICA_KEY, self.replica)
        self.trailers = (name, (LOAD_REPORT_KEY, serialized)) if serialized else (name,)
