"""Triton's statistics extension at the gateway: ``GET /v2/models[/{m}[/versions/{v}]]/stats``.

The gateway load-balances, so one replica's statistics would describe a random share of the
traffic. Instead it asks every replica address it can resolve (``ReplicaSet.each``) and sums:
counts and durations add up, ``last_inference`` is the latest. The response names the replicas
summed in ``X-InferenceHub-Replicas`` and any that did not answer in
``X-InferenceHub-Replicas-Missing``. If no address answers, one load-balanced call answers
and the header names that one replica.

The JSON is Triton's: the protobuf fields with their names, 64-bit numbers as JSON numbers
(which tritonclient.http and perf_analyzer read).
"""

from __future__ import annotations

import grpc

from inferencehub.gateway.replicas import ReplicaSet
from inferencehub.gateway.upstream import Upstream, UpstreamError
from inferencehub.protocol.inference import grpc_predict_v2_pb2 as pb

REPLICAS_HEADER = "X-InferenceHub-Replicas"
MISSING_HEADER = "X-InferenceHub-Replicas-Missing"
DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit", "cache_miss")
BATCH_DURATIONS = ("compute_input", "compute_infer", "compute_output")
NOT_THERE = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)


def _duration(d: pb.StatisticDuration) -> dict[str, int]:
    return {"count": d.count, "ns": d.ns}


def _add(into: dict[str, int], d: pb.StatisticDuration) -> None:
    into["count"] += d.count
    into["ns"] += d.ns


def summed(responses: list[pb.ModelStatisticsResponse]) -> dict:
    """Triton's JSON for the sum of several replicas' statistics (model and version by model and version)."""
    models: dict[tuple[str, str], dict] = {}
    for response in responses:
        for s in response.model_stats:
            key = (s.name, s.version)
            entry = models.get(key)
            if entry is None:
                models[key] = {
                    "name": s.name,
                    "version": s.version,
                    "last_inference": s.last_inference,
                    "inference_count": s.inference_count,
                    "execution_count": s.execution_count,
                    "inference_stats": {k: _duration(getattr(s.inference_stats, k)) for k in DURATIONS},
                    "batch_stats": [
                        {"batch_size": b.batch_size, **{k: _duration(getattr(b, k)) for k in BATCH_DURATIONS}}
                        for b in s.batch_stats
                    ],
                    "memory_usage": [],
                }
                continue
            entry["last_inference"] = max(entry["last_inference"], s.last_inference)
            entry["inference_count"] += s.inference_count
            entry["execution_count"] += s.execution_count
            for k in DURATIONS:
                _add(entry["inference_stats"][k], getattr(s.inference_stats, k))
            batches = {b["batch_size"]: b for b in entry["batch_stats"]}
            for b in s.batch_stats:
                if b.batch_size not in batches:
                    batches[b.batch_size] = {
                        "batch_size": b.batch_size,
                        **{k: {"count": 0, "ns": 0} for k in BATCH_DURATIONS},
                    }
                for k in BATCH_DURATIONS:
                    _add(batches[b.batch_size][k], getattr(b, k))
            entry["batch_stats"] = sorted(batches.values(), key=lambda b: b["batch_size"])
    return {"model_stats": [models[k] for k in sorted(models)]}


async def gather(
    replicas: ReplicaSet, upstream: Upstream, name: str, version: str, *, request_id: str, timeout: float
) -> tuple[dict, dict[str, str]]:
    """The summed statistics and the headers naming the replicas they come from."""
    request = pb.ModelStatisticsRequest(name=name, version=version)
    answers = await replicas.each("ModelStatistics", request, timeout)
    responses = [(view.name or view.address, r) for view, r in answers if not isinstance(r, UpstreamError)]
    failures = [(view.name or view.address, r) for view, r in answers if isinstance(r, UpstreamError)]
    not_there = [e for _, e in failures if e.code in NOT_THERE]
    if not responses:
        if not_there:
            raise not_there[0]
        response, replica = await upstream.call("ModelStatistics", request, request_id=request_id, timeout=timeout)
        responses = [(replica, response)]
    headers = {REPLICAS_HEADER: ",".join(sorted(n for n, _ in responses))}
    missing = sorted(n for n, e in failures if e.code not in NOT_THERE)
    if missing:
        headers[MISSING_HEADER] = ",".join(missing)
    return summed([r for _, r in responses]), headers
