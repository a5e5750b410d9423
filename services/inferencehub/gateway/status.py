"""The gateway's live status: ``GET /status.json``, read by the page at ``/ui`` every second.

``Traffic`` keeps the last minute of inference requests in one-second buckets: per replica
(from the ``x-inferencehub-replica`` the gateway returns), errors, and a bounded sample of
latencies for percentiles. It costs a few dictionary operations per inference request.
``status()`` joins it with ``ReplicaSet``'s view of each replica address (health, name, queue
depth, polled once a second while someone watches) into the JSON documented in the README.
"""

from __future__ import annotations

import time

import inferencehub
from inferencehub.gateway.replicas import ReplicaSet

WINDOW_SECONDS = 60
SAMPLES_PER_SECOND = 1000  # latencies kept per second for percentiles; beyond, the rest of that second is skipped
NO_REPLICA = ""  # requests that failed before any replica answered


class Bucket:
    __slots__ = ("errors", "latencies", "replicas", "second")

    def __init__(self, second: int) -> None:
        self.reset(second)

    def reset(self, second: int) -> None:
        self.second = second
        self.replicas: dict[str, int] = {}
        self.errors = 0
        self.latencies: list[tuple[str, float]] = []  # (replica, seconds)


class Traffic:
    """The last ``WINDOW_SECONDS`` of inference requests through this gateway."""

    def __init__(self) -> None:
        self.buckets = [Bucket(-1) for _ in range(WINDOW_SECONDS)]

    def record(self, replica: str, seconds: float, error: bool) -> None:
        second = int(time.monotonic())
        bucket = self.buckets[second % WINDOW_SECONDS]
        if bucket.second != second:
            bucket.reset(second)
        bucket.replicas[replica] = bucket.replicas.get(replica, 0) + 1
        if error:
            bucket.errors += 1
        if len(bucket.latencies) < SAMPLES_PER_SECOND:
            bucket.latencies.append((replica, seconds))

    def window(self) -> tuple[dict[str, int], int, list[tuple[str, float]]]:
        """Requests per replica, errors and latency samples (replica, seconds) of the last minute."""
        now = int(time.monotonic())
        replicas: dict[str, int] = {}
        errors = 0
        latencies: list[tuple[str, float]] = []
        for bucket in self.buckets:
            if now - WINDOW_SECONDS < bucket.second <= now:
                for name, count in bucket.replicas.items():
                    replicas[name] = replicas.get(name, 0) + count
                errors += bucket.errors
                latencies.extend(bucket.latencies)
        return replicas, errors, latencies


def percentile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def percentiles_ms(samples: list[float], *quantiles: str) -> dict[str, float | None]:
    ordered = sorted(samples)
    return {
        q: (None if (v := percentile(ordered, int(q[1:]) / 100)) is None else round(v * 1000, 3)) for q in quantiles
    }


def status(
    window: tuple[dict[str, int], int, list[tuple[str, float]]],
    replicas: ReplicaSet,
    *,
    ready: bool,
    draining: bool,
    workers: list[dict] | None = None,
) -> dict:
    """The page's JSON from a window of traffic (``Traffic.window()``, or several workers' merged) and the
    replicas; ``workers``: each gateway worker's pid, readiness and requests in the window (when there are several)."""
    by_replica, errors, latencies = window
    total = sum(by_replica.values())
    served = total - by_replica.get(NO_REPLICA, 0)  # shares are of the requests a replica answered
    rows = []
    seen = set()
    for view in replicas.views.values():
        count = by_replica.get(view.name, 0) if view.name else 0
        seen.add(view.name)
        rows.append(
            {
                **view.json(),
                "requests": count,
                "share": count / served if served else 0.0,
                "latency_ms": percentiles_ms([t for r, t in latencies if r == view.name and view.name], "p50", "p99"),
            }
        )
    for name, count in sorted(by_replica.items()):
        if name not in seen and name != NO_REPLICA:  # served recently, no longer among the addresses
            rows.append(
                {
                    "address": None,
                    "name": name,
                    "health": "GONE",
                    "queue_depth": None,
                    "checked": None,
                    "requests": count,
                    "share": count / served if served else 0.0,
                    "latency_ms": percentiles_ms([t for r, t in latencies if r == name], "p50", "p99"),
                }
            )
    rows.sort(key=lambda r: (r["name"] or "~", r["address"] or ""))
    return {
        "time": time.time(),
        "gateway": {
            "version": inferencehub.__version__,
            "upstream": replicas.target,
            "ready": ready,
            "draining": draining,
        },
        "window_seconds": WINDOW_SECONDS,
        "requests": {
            "count": total,
            "errors": errors,
            "per_second": total / WINDOW_SECONDS,
            "latency_ms": percentiles_ms([t for _, t in latencies], "p50", "p90", "p99"),
        },
        "replicas": rows,
        "workers": workers or [],
        "jobs": [],  # recent async jobs, filled in by the gateway when it has a job queue
    }
