"""The gateway's gRPC client: one shared channel to every inference replica.

Tuned for replicas behind a headless Service (or any multi-address target):
- ``round_robin`` over every resolved address (the default pick_first pins one replica), or
  ``weighted_round_robin``: each replica weighed by the ORCA load report in its responses' trailing
  metadata (``inferencehub.inference.load_report``), so a slow or busy replica gets less;
- client health checking, so a replica that reports NOT_SERVING (draining) gets no new calls;
- no retry policy: a call a replica may have begun is never replayed (see ``service_config``); only gRPC's
  transparent retries resend calls that no replica saw;
- keepalive pings with a short ack timeout, so a frozen replica is dropped in seconds;
- frequent DNS re-resolution, so new replicas get traffic soon after they appear;
- message size limits matching the replicas', and a deadline on every call;
- optionally mutual TLS (``inferencehub.tls``), moving to a new channel when the certificate files change.
"""

from __future__ import annotations

import asyncio
import json

import grpc

from inferencehub import tls
from inferencehub.errors import InferenceHubError
from inferencehub.gateway.metrics import GatewayMetrics
from inferencehub.metadata import REPLICA_KEY, REQUEST_ID_KEY
from inferencehub.protocol.inference import grpc_predict_v2_pb2 as pb
from inferencehub.protocol.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from inferencehub.settings import GatewaySettings
from inferencehub.tracing import REPLICA_ATTRIBUTE, Tracing

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


class UpstreamError(InferenceHubError):
    """A gRPC call to the inference service failed with ``code``."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


# weighted_round_robin, tuned for replicas that report their load on every response:
# - blackoutPeriod 0: a replica's reports count from the first one. The blackout exists to ignore the
#   first, noisy reports of a backend; ours are already averaged over the replica's last 2 s. And gRPC
#   restarts the blackout whenever a connection becomes READY again (gRFC A58), which happens at every
#   max_connection_age (5 s): any blackout would give each replica the mean weight that share of the time
#   (one run each: 0.5 s raised a 4x slower replica's share from 13% to 16%).
# - A replica with no report yet (new, or idle) gets the mean weight of the others: an equal share at once.
# - weightExpirationPeriod: weights not refreshed for this long are dropped (back to the mean weight).
# - weightUpdatePeriod: how often the picker's weights are recomputed (gRPC's floor is 100 ms).
WEIGHTED_ROUND_ROBIN = {
    "blackoutPeriod": "0s",
    "weightExpirationPeriod": "10s",
    "weightUpdatePeriod": "0.25s",
    "errorUtilizationPenalty": 1.0,
}


def balancing_config(settings: GatewaySettings) -> dict:
    if settings.balancing == "weighted_round_robin":
        return {"weighted_round_robin": WEIGHTED_ROUND_ROBIN}
    return {"round_robin": {}}


def service_config(settings: GatewaySettings) -> dict:
    """The channel's service config: balancing, health checking, and deliberately no ``retryPolicy``.

    A retry policy on UNAVAILABLE replays calls a replica had begun: the status a client sees when a replica
    dies mid-call, or when a connection is cut under a running call, is UNAVAILABLE too, and gRPC cannot tell
    it from a refusal. A replayed inference runs twice (a model is not idempotent in cost, and may not be in
    effect). What remains is gRPC's transparent retry (gRFC A6), which needs no policy: a call is resent only
    when no server application saw it (it never left the client, its stream was refused, or it came after
    the GOAWAY a draining or aged-out replica sends). Health checking keeps new calls off replicas that report
    NOT_SERVING, so a draining replica gets no calls to refuse. Everything else reaches the client once,
    as one error (503 for UNAVAILABLE): retrying is the client's choice.
    """
    return {
        "loadBalancingConfig": [balancing_config(settings)],
        "healthCheckConfig": {"serviceName": SERVICE},
    }


def channel_options(settings: GatewaySettings) -> list[tuple[str, int | str]]:
    keepalive_ms = int(settings.keepalive_seconds * 1000)
    ack_ms = int(settings.keepalive_timeout_seconds * 1000)
    return [
        ("grpc.service_config", json.dumps(service_config(settings))),
        ("grpc.enable_retries", 1),  # transparent retries (no retry policy: see service_config)
        # A call is resent transparently only if its request fits this buffer: make every allowed message fit.
        ("grpc.per_rpc_retry_buffer_size", settings.max_message_bytes),
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", ack_ms),
        ("grpc.http2.ping_timeout_ms", ack_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.dns_min_time_between_resolutions_ms", int(settings.dns_refresh_seconds * 1000)),
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", 2000),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.enable_http_proxy", 0),
    ]


class Upstream:
    def __init__(self, settings: GatewaySettings, metrics: GatewayMetrics, tracing: Tracing | None = None) -> None:
        self.settings = settings
        self.tls = tls.ClientTls.from_settings(settings)  # None: plaintext
        self.retiring: dict[grpc.aio.Channel, asyncio.Future] = {}  # old channels closing once their calls end
        self.channel = self._open()
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        self.metrics = metrics
        self.tracing = tracing
        metrics.replicas.forget_after = settings.replica_metrics_seconds
        metrics.replicas.limit = settings.replica_metrics_limit

    def _open(self) -> grpc.aio.Channel:
        options = channel_options(self.settings)
        if self.tls is None:
            return grpc.aio.insecure_channel(self.settings.upstream, options=options)
        return grpc.aio.secure_channel(self.settings.upstream, self.tls.credentials, options + self.tls.options)

    def _reopen(self) -> None:
        """New TLS files: new calls go over a new channel; the old one closes once its calls are done."""
        old, self.channel = self.channel, self._open()
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        self.retiring[old] = asyncio.ensure_future(self._retire(old))

    def refresh_tls(self) -> None:
        """New TLS files: later calls go over a new channel."""
        if self.tls is not None and self.tls.reloaded():
            self._reopen()

    async def _retire(self, old: grpc.aio.Channel) -> None:
        try:
            await old.close(grace=self.settings.max_deadline_seconds)
        finally:
            self.retiring.pop(old, None)

    async def call(self, method: str, request, *, request_id: str, timeout: float):
        """Call ``method``; return the response and the name of the replica that served it."""
        self.refresh_tls()
        metadata = ((REQUEST_ID_KEY, request_id),)
        if self.tracing is None:
            return await self._call(method, request, metadata, timeout)
        with self.tracing.span(f"upstream {method}", kind=self.tracing.CLIENT) as span:
            try:
                response, replica = await self._call(method, request, metadata + self.tracing.inject(), timeout)
            except UpstreamError as exc:
                span.set_attribute("rpc.grpc.status_code", exc.code.value[0])
                raise
            span.set_attribute(REPLICA_ATTRIBUTE, replica)
            return response, replica

    async def _call(self, method: str, request, metadata, timeout: float):
        call = getattr(self.stub, method)(request, timeout=timeout, metadata=metadata)
        try:
            response = await call
        except grpc.aio.AioRpcError as exc:
            self.metrics.upstream(method, _replica(exc.trailing_metadata()), exc.code().name)
            raise UpstreamError(exc.code(), exc.details() or exc.code().name) from None
        replica = _replica(await call.trailing_metadata())
        self.metrics.upstream(method, replica, "OK")
        return response, replica

    async def close(self) -> None:
        await self.channel.close()
        for old in list(self.retiring):
            await old.close()


def _replica(metadata) -> str:
    for key, value in metadata or ():
        if key == REPLICA_KEY:
            return value
    return ""
