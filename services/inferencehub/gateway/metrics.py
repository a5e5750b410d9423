"""The gateway's Prometheus metrics, served at /metrics on the gateway's own port.

With several workers (``gateway.workers``), prometheus_client's multiprocess mode: every worker's values live in
files of the run's ``PROMETHEUS_MULTIPROC_DIR`` and a scrape at any worker sums them (gauges of live workers;
what a worker counted before it was restarted stays counted). Gauges read from a function here are set from it
each second instead, as a file cannot call a function.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)

from inferencehub.buckets import BATCH_BUCKETS, LATENCY_BUCKETS
from inferencehub.gateway.replica_labels import ReplicaLabels

MAX_CHILDREN = 4096
MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))  # read at import by prometheus_client too


disable_created_metrics()  # the *_created series only add noise to every scrape


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "inferencehub_gateway_requests",
            'HTTP requests by route template, method and status (route "(unparsed)": refused before routing).',
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "inferencehub_gateway_request_duration_seconds",
            "HTTP request duration by route template and method.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.connections = Gauge(
            "inferencehub_gateway_open_connections",
            "Client connections open now (bounded by --max-connections).",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.decoding_bytes = Gauge(
            "inferencehub_gateway_decoding_bytes",
            "Request body bytes held now by requests being read, decoded or sent upstream "
            "(bounded by --max-decoding-bytes).",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.upstream_calls = Counter(
            "inferencehub_gateway_upstream_requests",
            "gRPC calls to the inference service by method, replica that served them and gRPC status code.",
            ["method", "replica", "code"],
            registry=self.registry,
        )
        # Bounded as pods come and go (the Upstream sets the limits from the gateway's settings).
        self.replicas = ReplicaLabels(self.upstream_calls, ("method", "replica", "code"))

        self.coalesced = Histogram(
            "inferencehub_gateway_coalesced_requests",
            "Requests carried by each upstream ModelInfer call of a batching model (1: it went alone).",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.coalesce_retried = Counter(
            "inferencehub_gateway_coalesce_retried_requests",
            "Requests sent again alone after the coalesced call they travelled in failed.",
            registry=self.registry,
        )
        # Label children looked up once (a labels() call costs more than the increment); bounded all the same.
        self._children: dict[tuple, tuple] = {}
        self._functions: list[tuple[Gauge, Callable[[], float]]] = []

    def watch(self, gauge: Gauge, function: Callable[[], float]) -> None:
        """``gauge`` reads ``function`` when scraped (with several workers: each second, see ``refresh``)."""
        if MULTIPROCESS:
            self._functions.append((gauge, function))
        else:
            gauge.set_function(function)

    def refresh(self) -> None:
        """Set the function-read gauges from their functions (several workers: called each second)."""
        for gauge, function in self._functions:
            gauge.set(function())

    def scrape(self) -> bytes:
        """The text of /metrics: this process's registry, or every worker's files."""
        if not MULTIPROCESS:
            return generate_latest(self.registry)
        self.refresh()
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)

    def _child(self, key: tuple, make) -> tuple:
        child = self._children.get(key)
        if child is None:
            if len(self._children) >= MAX_CHILDREN:
                self._children.clear()
            child = self._children[key] = make()
        return child

    def upstream(self, method: str, replica: str, code: str) -> None:
        self.upstream_calls.labels(method, self.replicas.label(replica or "none"), code).inc()

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        """One HTTP request answered: counted by route template, method and status, and timed."""
        count, duration = self._child(
            ("r", route, method, status),
            lambda: (self.requests.labels(route, method, str(status)), self.duration.labels(route, method)),
        )
        count.inc()
        duration.observe(seconds)
