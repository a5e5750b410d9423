"""Triton's statistics extension: per-model counts and cumulative durations, kept as plain integers.

Each request carries a ``Timing`` through the scheduler, which stamps it (``time.perf_counter_ns``)
when the request is queued, taken into a batch, dispatched, and when its model call starts and ends.
The servicer adds the request's own decode and encode times and, when the request is answered,
folds it into its model's ``ModelStats``: success or failure, and, for successes, queue,
compute-input, compute-infer and compute-output durations. The scheduler counts executions, rows
and per-batch-size durations. Everything is a few integer additions on the event loop's thread:
no locks, no allocation beyond the ``Timing`` itself.

The same timestamps give the replica's trace spans (see ``inferencehub.tracing``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from inferencehub.protocol.inference import grpc_predict_v2_pb2 as pb


@dataclass(slots=True)
class Timing:
    """One request's moments (``time.perf_counter_ns``) on its way through a replica; 0: not reached."""

    received: int = 0
    decoded: int = 0  # inputs decoded from protobuf
    enqueued: int = 0  # in the model's queue
    taken: int = 0  # out of the queue, into a batch
    dispatched: int = 0  # its batch complete, handed to an execution slot
    started: int = 0  # model call started (after stacking the batch)
    finished: int = 0  # model call returned
    encoded: int = 0  # outputs encoded into the response
    batch_size: int = 0  # requests in its batch


class Duration:
    __slots__ = ("count", "ns")

    def __init__(self) -> None:
        self.count = 0
        self.ns = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def message(self) -> pb.StatisticDuration:
        return pb.StatisticDuration(count=self.count, ns=self.ns)


class BatchStats:
    __slots__ = ("compute_infer", "compute_input", "compute_output")

    def __init__(self) -> None:
        self.compute_input = Duration()
        self.compute_infer = Duration()
        self.compute_output = Duration()


class ModelStats:
    """Cumulative statistics of one version of one model since the replica started."""

    def __init__(self, name: str, version: str) -> None:
        self.name = name
        self.version = version
        self.last_inference_ms = 0
        self.inference_count = 0
        self.execution_count = 0
        self.success = Duration()
        self.fail = Duration()
        self.queue = Duration()
        self.compute_input = Duration()
        self.compute_infer = Duration()
        self.compute_output = Duration()
        self.batches: dict[int, BatchStats] = {}

    # --- recording -------------------------------------------------------------------------

    def executed(self, size: int, inferences: int, stacked: int, started: int, finished: int, split: int) -> None:
        """One model call on a batch of ``size`` requests (``inferences`` rows, or requests when not batching).

        ``stacked``..``started`` is the batch's input preparation, ``started``..``finished`` the model
        call, ``finished``..``split`` the split of its outputs (all ``perf_counter_ns``).
        """
        self.execution_count += 1
        self.inference_count += inferences
        batch = self.batches.get(size)
        if batch is None:
            batch = self.batches[size] = BatchStats()
        batch.compute_input.add(started - stacked)
        batch.compute_infer.add(finished - started)
        batch.compute_output.add(split - finished)

    def succeeded(self, timing: Timing, done: int) -> None:
        self.success.add(done - timing.received)
        self.queue.add(timing.taken - timing.enqueued)
        # Decoding the request, plus stacking its batch (shared by the batch's requests).
        self.compute_input.add(timing.decoded - timing.received + timing.started - timing.dispatched)
        self.compute_infer.add(timing.finished - timing.started)
        self.compute_output.add(done - timing.finished)
        self.last_inference_ms = time.time_ns() // 1_000_000

    def failed(self, timing: Timing, done: int) -> None:
        self.fail.add(done - timing.received)
        self.last_inference_ms = time.time_ns() // 1_000_000

    # --- reading ---------------------------------------------------------------------------

    def message(self) -> pb.ModelStatistics:
        return pb.ModelStatistics(
            name=self.name,
            version=self.version,
            last_inference=self.last_inference_ms,
            inference_count=self.inference_count,
            execution_count=self.execution_count,
            inference_stats=pb.InferStatistics(
                success=self.success.message(),
                fail=self.fail.message(),
                queue=self.queue.message(),
                compute_input=self.compute_input.message(),
                compute_infer=self.compute_infer.message(),
                compute_output=self.compute_output.message(),
                cache_hit=pb.StatisticDuration(),
                cache_miss=pb.StatisticDuration(),
            ),
            batch_stats=[
                pb.InferBatchStatistics(
                    batch_size=size,
                    compute_input=b.compute_input.message(),
                    compute_infer=b.compute_infer.message(),
                    compute_output=b.compute_output.message(),
                )
                for size, b in sorted(self.batches.items())
            ],
        )
