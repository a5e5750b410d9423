"""The gateway's Prometheus metrics, served at /metrics on the gateway's own port."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics

from inferencehub.gateway.replica_labels import ReplicaLabels

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


disable_created_metrics()  # the *_created series only add noise to every scrape


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "inferencehub_gateway_requests",
            "HTTP requests by route template, method and status.",
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
        self.upstream_calls = Counter(
            "inferencehub_gateway_upstream_requests",
            "gRPC calls to the inference service by method, replica that served them and gRPC status code.",
            ["method", "replica", "code"],
            registry=self.registry,
        )
        # Bounded as pods come and go (the Upstream sets the limits from the gateway's settings).
        self.replicas = ReplicaLabels(self.upstream_calls, ("method", "replica", "code"))

    def upstream(self, method: str, replica: str, code: str) -> None:
        self.upstream_calls.labels(method, self.replicas.label(replica or "none"), code).inc()
