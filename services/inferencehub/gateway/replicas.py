"""The gateway's view of each replica: every address the upstream target resolves to, one at a time.

The load-balanced channel in ``upstream`` hides which addresses exist. Two things need each one:
the statistics route (Triton's counts summed over every replica) and the status page (each
replica's health and queue depth). ``ReplicaSet`` resolves the target itself (``ipv4:``/``ipv6:``
address lists, ``dns:`` names and bare ``host:port``, as gRPC does), keeps one small channel per
address, and on demand calls every address at once.

While someone watches the status page (and for the first ``WATCH_SECONDS`` after start, to learn
each address's replica name early), a poller asks each address once a second, with a short
deadline, for its ``grpc.health.v1`` status and (from ``ServerLive``'s trailing metadata) its name
and queue depth. It stops by itself a little after the last status request, so an unwatched
gateway spends nothing on it. At most ``MAX_ADDRESSES`` addresses are addressed. A replica name
once learned for an address is kept while the address stays, so a replica that dies is still
shown by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any, cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inferencehub.gateway.upstream import SERVICE, UpstreamError
from inferencehub.metadata import QUEUE_DEPTH_KEY, REPLICA_KEY
from inferencehub.protocol.inference import grpc_predict_v2_pb2 as pb
from inferencehub.protocol.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from inferencehub.tls import ClientTls

log = logging.getLogger(__name__)

MAX_ADDRESSES = 64
POLL_SECONDS = 1.0
POLL_TIMEOUT = 0.5
WATCH_SECONDS = 30.0  # the poller runs this long after the last status request
RESOLVE_SECONDS = 1.0


def split_target(target: str) -> tuple[list[str], str | None]:
    """``(addresses, None)`` for literal address lists; ``([], "host:port")`` for a name to resolve."""
    if target.startswith(("ipv4:", "ipv6:")):
        return [a for a in target.split(":", 1)[1].split(",") if a], None
    if target.startswith("unix:") or target.startswith("unix-abstract:"):
        return [target], None
    if target.startswith("dns:"):
        rest = target[4:]
        if rest.startswith("//"):
            rest = rest[2:].split("/", 1)[1] if "/" in rest[2:] else ""
        return [], rest
    return [], target


def host_port(name: str) -> tuple[str, str]:
    if name.startswith("["):
        host, _, port = name[1:].partition("]:")
        return host, port or "443"
    host, _, port = name.rpartition(":")
    return (host, port) if host else (name, "443")


@dataclass
class ReplicaView:
    address: str
    channel: grpc.aio.Channel
    name: str = ""
    health: str = "UNKNOWN"  # SERVING, NOT_SERVING, UNREACHABLE, UNKNOWN
    queue_depth: int | None = None
    checked: float = 0.0  # time.time() of the last poll

    def json(self) -> dict:
        return {
            "address": self.address,
            "name": self.name,
            "health": self.health,
            "queue_depth": self.queue_depth,
            "checked": self.checked,
        }


class ReplicaSet:
    def __init__(self, target: str, options: list, tls: ClientTls | None = None) -> None:
        self.target = target
        self.options = [o for o in options if o[0] != "grpc.service_config"]
        self.tls = tls  # with mutual TLS, each address is called with the gateway's certificate
        if tls is not None and not any(key == "grpc.ssl_target_name_override" for key, _ in tls.options):
            _, name = split_target(target)  # addresses are IPs: check the certificate against the target's name
            if name is not None:
                self.options.append(("grpc.ssl_target_name_override", host_port(name)[0]))
        self.views: dict[str, ReplicaView] = {}
        self.resolved_at = 0.0
        self.wanted_until = 0.0
        self.poller: asyncio.Task | None = None
        self._resolving: asyncio.Lock | None = None

    # --- addresses -------------------------------------------------------------------------

    async def _resolve(self) -> list[str]:
        addresses, name = split_target(self.target)
        if name is None:
            return addresses[:MAX_ADDRESSES]
        host, port = host_port(name)
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        found: list[str] = []
        for family, _, _, _, sockaddr in infos:
            # (host, port, ...); typeshed also allows (int, bytes), an IPv6 address on a Python built without IPv6
            ip, tcp_port = cast("tuple[str, int]", sockaddr[:2])
            address = f"[{ip}]:{tcp_port}" if family == socket.AF_INET6 else f"{ip}:{tcp_port}"
            if address not in found:
                found.append(address)
        return found[:MAX_ADDRESSES]

    async def refresh(self) -> list[ReplicaView]:
        """Re-resolve (at most once a second) and return a view per address."""
        if self._resolving is None:
            self._resolving = asyncio.Lock()
        async with self._resolving:
            if time.monotonic() - self.resolved_at >= RESOLVE_SECONDS:
                try:
                    addresses = await self._resolve()
                except OSError as exc:
                    log.warning("cannot resolve %s: %s", self.target, exc)
                    addresses = list(self.views)
                self.resolved_at = time.monotonic()
                for gone in set(self.views) - set(addresses):
                    await self.views.pop(gone).channel.close()
                for address in addresses:
                    if address not in self.views:
                        channel = self._channel(address)
                        self.views[address] = ReplicaView(address, channel)
        return list(self.views.values())

    def _channel(self, address: str) -> grpc.aio.Channel:
        if self.tls is None:
            return grpc.aio.insecure_channel(address, options=self.options)
        return grpc.aio.secure_channel(address, self.tls.credentials, self.options + self.tls.options)

    # --- calling each ----------------------------------------------------------------------

    async def each(self, method: str, request, timeout: float) -> list[tuple[ReplicaView, Any]]:
        """Call ``method`` on every address at once: ``(view, response or UpstreamError)`` for each (the response's
        message type is the method's)."""
        views = await self.refresh()

        async def one(view: ReplicaView):
            call = getattr(pb_grpc.GRPCInferenceServiceStub(view.channel), method)(request, timeout=timeout)
            try:
                response = await call
            except grpc.aio.AioRpcError as exc:
                _learn_name(view, exc.trailing_metadata())
                return view, UpstreamError(exc.code(), exc.details() or exc.code().name)
            _learn_name(view, await call.trailing_metadata())
            return view, response

        return list(await asyncio.gather(*(one(v) for v in views)))

    # --- the status poller -----------------------------------------------------------------

    def watch(self) -> None:
        """Someone looks at the status: keep polling for a while."""
        self.wanted_until = time.monotonic() + WATCH_SECONDS
        if self.poller is None or self.poller.done():
            self.poller = asyncio.create_task(self._poll_while_watched(), name="replica poller")

    async def poll_once(self) -> list[ReplicaView]:
        views = await self.refresh()
        await asyncio.gather(*(self._check(v) for v in views))
        return views

    async def _poll_while_watched(self) -> None:
        while time.monotonic() < self.wanted_until:
            started = time.monotonic()
            try:
                await self.poll_once()
            except Exception:
                log.exception("polling the replicas failed")
            await asyncio.sleep(max(0.0, POLL_SECONDS - (time.monotonic() - started)))

    async def _check(self, view: ReplicaView) -> None:
        try:
            health = await health_pb2_grpc.HealthStub(view.channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE), timeout=POLL_TIMEOUT
            )
            view.health = health_pb2.HealthCheckResponse.ServingStatus.Name(health.status)
            call = pb_grpc.GRPCInferenceServiceStub(view.channel).ServerLive(
                pb.ServerLiveRequest(), timeout=POLL_TIMEOUT
            )
            await call
            metadata = await call.trailing_metadata()
            _learn_name(view, metadata)
            depth = dict(metadata or ()).get(QUEUE_DEPTH_KEY)
            view.queue_depth = int(depth) if depth is not None and depth.isdigit() else None
        except grpc.aio.AioRpcError:
            view.health, view.queue_depth = "UNREACHABLE", None
        view.checked = time.time()

    async def close(self) -> None:
        if self.poller is not None:
            self.poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.poller
        for view in self.views.values():
            await view.channel.close()
        self.views.clear()


def _learn_name(view: ReplicaView, metadata) -> None:
    for key, value in metadata or ():
        if key == REPLICA_KEY:
            view.name = value
