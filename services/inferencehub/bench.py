"""``inferencehub bench``: a load generator for the gateway (HTTP) or an inference replica (gRPC).

Closed loop (``--concurrency N``: N requests always in flight) or open loop (``--rate R``: R requests
a second whatever the latency, up to ``--max-in-flight``), for a bounded ``--duration``. A live
progress line goes to stderr; the summary (requests, errors by status, throughput, latency
percentiles, the share each replica served) to stdout, as a table or ``--json``.
"""

from __future__ import annotations

import asyncio
import collections
import json
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from inferencehub.client import Outcome, synthetic_inputs, transport


@dataclass(frozen=True)
class BenchConfig:
    model: str = "mock"
    url: str = "http://127.0.0.1:8080"
    grpc: str | None = None
    concurrency: int = 8
    rate: float | None = None
    max_in_flight: int = 512
    duration: float = 10.0
    batch: int = 1
    size: int = 16
    binary: bool = True
    timeout: float = 30.0
    api_key: str | None = field(default=None, repr=False)  # never printed


@dataclass
class Recorder:
    started: float = field(default_factory=time.perf_counter)
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    replicas: collections.Counter[str] = field(default_factory=collections.Counter)
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    dropped: int = 0

    def add(self, outcome: Outcome) -> None:
        self.statuses[outcome.status] += 1
        if outcome.ok:
            self.latencies.append(outcome.latency)
            self.replicas[outcome.replica or "unknown"] += 1
        else:
            self.errors.setdefault(outcome.status, outcome.error)

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    def summary(self, config: BenchConfig, elapsed: float) -> dict:
        ok = len(self.latencies)
        lat = np.array(self.latencies) * 1000 if self.latencies else np.zeros(1)
        return {
            "target": (config.grpc and f"grpc {config.grpc}") or f"http {config.url}",
            "model": config.model,
            "mode": f"rate {config.rate}/s" if config.rate else f"concurrency {config.concurrency}",
            "duration_s": round(elapsed, 3),
            "requests": self.requests,
            "ok": ok,
            "errors": {s: n for s, n in sorted(self.statuses.items()) if s not in ("200", "OK")},
            "error_examples": self.errors,
            "dropped": self.dropped,
            "offered_rps": round((self.requests + self.dropped) / config.duration, 2) if config.rate else None,
            "throughput_rps": round(ok / elapsed, 2) if elapsed else 0.0,
            "latency_ms": {
                "p50": round(float(np.percentile(lat, 50)), 3),
                "p90": round(float(np.percentile(lat, 90)), 3),
                "p99": round(float(np.percentile(lat, 99)), 3),
                "max": round(float(lat.max()), 3),
            },
            "replicas": {name: {"requests": n, "share": round(n / ok, 4)} for name, n in self.replicas.most_common()}
            if ok
            else {},
        }


async def _progress(recorder: Recorder, duration: float) -> None:
    tty = sys.stderr.isatty()
    while True:
        await asyncio.sleep(1.0)
        elapsed = time.perf_counter() - recorder.started
        ok = len(recorder.latencies)
        recent = recorder.latencies[-500:]
        p50 = f"{np.percentile(recent, 50) * 1000:.1f} ms" if recent else "-"
        line = (
            f"[{min(elapsed, duration):5.1f}s/{duration:.0f}s] {recorder.requests} requests, "
            f"{ok / elapsed:.1f} ok/s, p50 {p50}, errors {recorder.requests - ok}"
        )
        print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)


async def run(config: BenchConfig) -> dict:
    async with transport(config.url, config.grpc, config.timeout, config.api_key) as client:
        metadata = await client.metadata(config.model)
        prepared = client.prepare(config.model, synthetic_inputs(metadata, config.batch, config.size), config.binary)
        recorder = Recorder()
        progress = asyncio.create_task(_progress(recorder, config.duration))
        end = recorder.started + config.duration

        async def one() -> None:
            recorder.add(await client.send(prepared))

        if config.rate:
            in_flight: set[asyncio.Task] = set()
            interval, due = 1.0 / config.rate, recorder.started
            while due < end:
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                if len(in_flight) >= config.max_in_flight:
                    recorder.dropped += 1
                else:
                    task = asyncio.create_task(one())
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                due += interval
            if in_flight:
                await asyncio.wait(in_flight)
        else:

            async def worker() -> None:
                while time.perf_counter() < end:
                    await one()

            await asyncio.gather(*(worker() for _ in range(config.concurrency)))
        progress.cancel()
        if sys.stderr.isatty():
            print(file=sys.stderr)
        return recorder.summary(config, time.perf_counter() - recorder.started)


def format_summary(s: dict) -> str:
    lat = s["latency_ms"]
    lines = [
        f"target      {s['target']}  model {s['model']}  {s['mode']}  {s['duration_s']:.1f}s",
        f"requests    {s['requests']}  ok {s['ok']}  errors {sum(s['errors'].values())}"
        + (f"  dropped {s['dropped']}" if s["dropped"] else ""),
        f"throughput  {s['throughput_rps']:.1f} req/s"
        + (f"  (offered {s['offered_rps']:.1f} req/s)" if s["offered_rps"] is not None else ""),
        f"latency ms  p50 {lat['p50']:.2f}  p90 {lat['p90']:.2f}  p99 {lat['p99']:.2f}  max {lat['max']:.2f}",
    ]
    for status, count in s["errors"].items():
        lines.append(f"error       {status}: {count}  e.g. {s['error_examples'].get(status, '')[:100]}")
    for name, served in s["replicas"].items():
        lines.append(f"replica     {name}: {served['requests']} ({served['share'] * 100:.1f}%)")
    return "\n".join(lines)


def print_summary(summary: dict, as_json: bool) -> None:
    print(json.dumps(summary, indent=2) if as_json else format_summary(summary), flush=True)
