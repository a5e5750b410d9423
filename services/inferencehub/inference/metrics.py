"""The inference service's Prometheus metrics, served on their own port."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, start_http_server

from inferencehub.buckets import BATCH_BUCKETS, LATENCY_BUCKETS

UNKNOWN_MODEL = "_unknown"  # label for names that are not served, so clients cannot grow the label set


disable_created_metrics()  # the *_created series only add noise to every scrape


class InferenceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "inferencehub_inference_requests",
            "Requests by model and gRPC status code: ModelInfer calls, and ModelStreamInfer requests (a generation is "
            "one, counted when it ends).",
            ["model", "code"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "inferencehub_inference_request_duration_seconds",
            "ModelInfer call duration, from receipt to response, by model (not streams: their length is the "
            "reader's; the gateway times their tokens).",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "inferencehub_inference_in_flight_requests",
            "ModelInfer calls, and generations streaming (ModelStreamInfer), being handled now, by model.",
            ["model"],
            registry=self.registry,
        )
        self.model_ready = Gauge(
            "inferencehub_model_ready",
            "1 when the model is loaded and ready, else 0.",
            ["model", "version"],
            registry=self.registry,
        )

        self.queue_depth = Gauge(
            "inferencehub_inference_queue_depth",
            "Requests waiting in the model's queue.",
            ["model"],
            registry=self.registry,
        )
        self.queue_duration = Histogram(
            "inferencehub_inference_queue_duration_seconds",
            "Time requests waited in the model's queue before their model call started.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "inferencehub_inference_batch_size",
            "Requests stacked into one model call.",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.model_calls = Counter(
            "inferencehub_inference_model_calls",
            "Calls of the model itself (one per batch).",
            ["model"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "inferencehub_inference_rejected_requests",
            "Requests refused with RESOURCE_EXHAUSTED because the model's queue was full.",
            ["model"],
            registry=self.registry,
        )
        self.expired = Counter(
            "inferencehub_inference_expired_requests",
            "Queued requests dropped before computing: their deadline passed, or their caller cancelled.",
            ["model", "reason"],
            registry=self.registry,
        )

        # Streams: a decoupled model's generations (ModelStreamInfer requests).
        self.open_streams = Gauge(
            "inferencehub_inference_open_streams",
            "Generations streaming now (ModelStreamInfer requests on decoupled models), by model.",
            ["model"],
            registry=self.registry,
        )
        self.stream_tokens = Counter(
            "inferencehub_inference_stream_tokens",
            "Streamed responses that carried outputs (tokens), by model.",
            ["model"],
            registry=self.registry,
        )
        self.streams_cancelled = Counter(
            "inferencehub_inference_streams_cancelled",
            "Generations stopped before their end because their call ended (caller cancelled or hung up, "
            "deadline passed, replica stopped), by model.",
            ["model"],
            registry=self.registry,
        )

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics from a background thread; returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        return server.server_port

    def close(self) -> None:
        server = getattr(self, "_server", None)
        if server is not None:
            server.shutdown()
            server.server_close()
