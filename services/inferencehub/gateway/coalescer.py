"""Cross-hop coalescing: concurrent compatible requests for a batching model travel as one ``ModelInfer``.

Every upstream call costs a fixed amount of Python on both sides of the hop (grpc.aio's per-call machinery,
metadata, a task on the replica), whatever its size. For a model that declares a batch dimension (``max_batch_size``
> 0 in the configuration its ``ModelConfig`` RPC serves, read once per model and refreshed), requests that arrive
while a call for that model is already in flight wait for the next call, together: their inputs are concatenated
along the first dimension, sent once, and the outputs split back by rows. It adapts by itself: a request goes at
once when nothing for its model is in flight (concurrency 1 pays nothing), and under load each call carries what
arrived during the previous one. A waiting group also goes when it reaches ``max_batch_size`` rows, or after
``max_delay`` at the latest.

Compatible means: same model and version, same input names, datatypes and sizes beyond the first dimension, same
requested outputs and parameters, every input in raw form (the REST codec always sends raw). Anything else goes
alone, as before. Each request keeps its own:
- deadline: a call never outlives its members' deadlines (its timeout is the earliest of them); if that call
  times out, the members that still have time are sent again alone;
- request id: the call's ``x-request-id`` metadata lists every member's id, comma-separated (ids never contain
  commas), so the replica's log names them all; each response carries its own request's ``id``;
- replica: the one that answered the call;
- error: when a coalesced call fails in a way that may be one member's fault or the group's (INVALID_ARGUMENT,
  INTERNAL, DEADLINE_EXCEEDED... anything but the codes that say the service itself refused: UNAVAILABLE,
  RESOURCE_EXHAUSTED, NOT_FOUND, CANCELLED), each member is sent again alone and gets its own outcome.

The key, the merge and the split are pure functions of the messages, in ``oip/coalescing.py``; this module decides
when groups go and what happens when a call fails.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import grpc

from inferencehub.errors import InferenceHubError
from inferencehub.gateway.metrics import GatewayMetrics
from inferencehub.gateway.upstream import Upstream, UpstreamError
from inferencehub.oip.coalescing import coalescing_key, merge, split
from inferencehub.protocol.inference import grpc_predict_v2_pb2 as pb
from inferencehub.settings import GatewaySettings

log = logging.getLogger(__name__)

# Failures that say the service refused the call as a whole: sending the members alone would fail them too.
GROUP_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
    }
)
MAX_IDS_CHARS = 4096  # the request ids of one call, comma-separated, stay well inside gRPC's 8 KiB of metadata
MAX_CACHED_MODELS = 1024


@dataclass(eq=False)
class Member:
    message: pb.ModelInferRequest
    rows: int
    request_id: str
    deadline: float  # event-loop time
    future: asyncio.Future = field(repr=False)


@dataclass(eq=False)
class Group:
    """Requests waiting to travel together."""

    key: tuple
    members: list[Member] = field(default_factory=list)
    rows: int = 0
    ids_chars: int = 0
    timer: asyncio.TimerHandle | None = None


@dataclass(eq=False)
class Lane:
    """One model version's traffic: calls in flight, and the groups waiting for the next call."""

    limit: int  # max_batch_size
    in_flight: int = 0
    waiting: dict[tuple, Group] = field(default_factory=dict)


@dataclass
class Limit:
    rows: int  # max_batch_size; 0: the model does not batch
    fetched: float  # monotonic time


class Coalescer:
    def __init__(
        self,
        upstream: Upstream,
        metrics: GatewayMetrics,
        *,
        enabled: bool = True,
        max_delay: float = 0.002,
        off_models: frozenset[str] = frozenset(),
        refresh_seconds: float = 30.0,
    ) -> None:
        self.upstream = upstream
        self.metrics = metrics
        self.enabled = enabled
        self.max_delay = max_delay
        self.off_models = off_models
        self.refresh_seconds = refresh_seconds
        self.limits: dict[tuple[str, str], Limit] = {}
        self.lookups: dict[tuple[str, str], asyncio.Task] = {}
        self.lanes: dict[tuple[str, str], Lane] = {}
        self.sending: set[asyncio.Task] = set()
        self.m_group = metrics.coalesced
        self.m_alone = metrics.coalesce_retried

    async def infer(self, message: pb.ModelInferRequest, *, request_id: str, timeout: float):
        """Send ``message`` (alone or with others); return its own response and the replica that answered."""
        model = (message.model_name, message.model_version)
        if not self.enabled or model[0] in self.off_models:
            return await self.upstream.call("ModelInfer", message, request_id=request_id, timeout=timeout)
        limit = await self._limit(model, request_id, timeout)
        if not limit:
            return await self.upstream.call("ModelInfer", message, request_id=request_id, timeout=timeout)
        lane = self.lanes.get(model)
        if lane is None:
            lane = self.lanes[model] = Lane(limit)
        lane.limit = limit
        if lane.in_flight == 0 and not lane.waiting:
            lane.in_flight += 1  # nothing under way: go at once, alone, as it is
            try:
                return await self.upstream.call("ModelInfer", message, request_id=request_id, timeout=timeout)
            finally:
                self.m_group.observe(1)
                self._done(lane)
        keyed = coalescing_key(message)
        if keyed is None or keyed[1] > limit:
            return await self.upstream.call("ModelInfer", message, request_id=request_id, timeout=timeout)
        key, rows = keyed
        loop = asyncio.get_running_loop()
        member = Member(message, rows, request_id, loop.time() + timeout, loop.create_future())
        group = lane.waiting.get(key)
        if group is not None and (
            group.rows + rows > lane.limit or group.ids_chars + len(request_id) + 1 > MAX_IDS_CHARS
        ):
            self._flush(lane, group)
            group = None
        if group is None:
            group = lane.waiting[key] = Group(key)
            group.timer = loop.call_later(self.max_delay, self._flush, lane, group)
        group.members.append(member)
        group.rows += rows
        group.ids_chars += len(request_id) + 1
        if group.rows >= lane.limit:
            self._flush(lane, group)
        return await member.future

    # --- model configurations ------------------------------------------------------------------

    async def _limit(self, model: tuple[str, str], request_id: str, timeout: float) -> int:
        """The model's max_batch_size (0: none, or unknown), from a cache refreshed in the background."""
        known = self.limits.get(model)
        if known is not None:
            if time.monotonic() - known.fetched > self.refresh_seconds and model not in self.lookups:
                self._lookup(model, request_id, timeout)
            return known.rows
        task = self.lookups.get(model) or self._lookup(model, request_id, timeout)
        return await asyncio.shield(task)

    def _lookup(self, model: tuple[str, str], request_id: str, timeout: float) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(self._fetch(model, request_id, timeout))
        self.lookups[model] = task
        task.add_done_callback(lambda _: self.lookups.pop(model, None))
        return task

    async def _fetch(self, model: tuple[str, str], request_id: str, timeout: float) -> int:
        request = pb.ModelConfigRequest(name=model[0], version=model[1])
        try:
            response, _ = await self.upstream.call("ModelConfig", request, request_id=request_id, timeout=timeout)
        except UpstreamError:
            # Unknown model or no replica yet: not cached (clients must not grow the cache); the request goes
            # alone and gets the service's own answer.
            known = self.limits.get(model)
            return known.rows if known is not None else 0
        if len(self.limits) >= MAX_CACHED_MODELS:
            self.limits.clear()
        rows = max(0, response.config.max_batch_size)
        self.limits[model] = Limit(rows, time.monotonic())
        return rows

    # --- sending groups ------------------------------------------------------------------------

    def _flush(self, lane: Lane, group: Group) -> None:
        if lane.waiting.get(group.key) is not group:
            return  # already gone
        del lane.waiting[group.key]
        if group.timer is not None:
            group.timer.cancel()
        lane.in_flight += 1
        task = asyncio.get_running_loop().create_task(self._send(lane, group.members))
        self.sending.add(task)
        task.add_done_callback(self.sending.discard)

    def _done(self, lane: Lane) -> None:
        """A call finished: what waited for it goes now."""
        lane.in_flight -= 1
        for group in list(lane.waiting.values()):
            self._flush(lane, group)

    async def _send(self, lane: Lane, members: list[Member]) -> None:
        try:
            members = [m for m in members if not m.future.done()]  # callers that went away
            now = asyncio.get_running_loop().time()
            live = []
            for member in members:
                if member.deadline <= now:
                    member.future.set_exception(UpstreamError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))
                else:
                    live.append(member)
            if not live:
                return
            self.m_group.observe(len(live))
            if len(live) == 1:
                await self._alone(live[0])
                return
            timeout = min(m.deadline for m in live) - now
            ids = ",".join(m.request_id for m in live)
            try:
                response, replica = await self.upstream.call("ModelInfer", merge(live), request_id=ids, timeout=timeout)
            except UpstreamError as exc:
                if exc.code in GROUP_CODES:
                    for member in live:
                        if not member.future.done():
                            member.future.set_exception(UpstreamError(exc.code, exc.details))
                    return
                log.info("a coalesced call of %d requests failed (%s): sending each alone", len(live), exc.code.name)
                await self._each_alone(live)
                return
            answers = split(response, live)
            if answers is None:
                log.warning("a coalesced response from %s could not be split by rows: sending each alone", replica)
                await self._each_alone(live)
                return
            for member, answer in zip(live, answers, strict=True):
                if not member.future.done():
                    member.future.set_result((answer, replica))
        except BaseException as exc:
            for member in members:
                if not member.future.done():
                    member.future.set_exception(exc if isinstance(exc, Exception) else asyncio.CancelledError())
            raise
        finally:
            self._done(lane)

    async def _each_alone(self, members: list[Member]) -> None:
        self.m_alone.inc(len(members))
        await asyncio.gather(*(self._alone(m) for m in members))

    async def _alone(self, member: Member) -> None:
        remaining = member.deadline - asyncio.get_running_loop().time()
        try:
            if remaining <= 0:
                raise UpstreamError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
            outcome = await self.upstream.call(
                "ModelInfer", member.message, request_id=member.request_id, timeout=remaining
            )
        except UpstreamError as exc:
            if not member.future.done():
                member.future.set_exception(exc)
        else:
            if not member.future.done():
                member.future.set_result(outcome)

    async def close(self) -> None:
        for task in list(self.lookups.values()) + list(self.sending):
            task.cancel()


def coalescer_for(settings: GatewaySettings, upstream: Upstream, metrics: GatewayMetrics) -> Coalescer:
    if settings.coalesce not in ("on", "off"):
        raise InferenceHubError(f"--coalesce must be on or off, got {settings.coalesce!r}")
    if not 0 <= settings.coalesce_max_delay_ms <= 1000:
        raise InferenceHubError(
            f"--coalesce-max-delay-ms must be from 0 to 1000 milliseconds, got {settings.coalesce_max_delay_ms}"
        )
    return Coalescer(
        upstream,
        metrics,
        enabled=settings.coalesce == "on",
        max_delay=settings.coalesce_max_delay_ms / 1000,
        off_models=frozenset(name.strip() for name in settings.coalesce_off_models.split(",") if name.strip()),
    )
