"""The replica's one infer pipeline: a ``ModelInferRequest`` in, a ``ModelInferResponse`` out.

Look the model up, decode and check the inputs (``oip.codec``), run them through the engine (its per-model queue,
batching and execution slots), encode the outputs. The gRPC servicer's ``ModelInfer`` and the job runner both call
``infer``; they differ only in what they wrap around it: the call's deadline, metrics, statistics and span for the
servicer; the lease, the record and waiting out a full queue for a job.
"""

from __future__ import annotations

import asyncio
import time

from inferencehub.errors import Overloaded
from inferencehub.inference.engine import Engine
from inferencehub.inference.statistics import Timing
from inferencehub.oip.codec import decode_inputs, encode_response
from inferencehub.protocol.inference import grpc_predict_v2_pb2 as pb

FULL_QUEUE_PAUSE = 0.05  # seconds a job waits before trying a full model queue again


async def infer(
    engine: Engine,
    request: pb.ModelInferRequest,
    deadline: float | None = None,
    timing: Timing | None = None,
    *,
    wait_when_full: bool = False,
) -> pb.ModelInferResponse:
    """Run ``request`` on the model and version it names.

    ``deadline`` is in event-loop time (None: none). ``wait_when_full``: when the model's queue is full, wait and
    try again instead of failing with RESOURCE_EXHAUSTED (a job, which holds its place in the job queue meanwhile).
    """
    served = engine.get(request.model_name, request.model_version)
    inputs, specs = decode_inputs(request, served.signature)
    if timing is not None:
        timing.decoded = time.perf_counter_ns()
    while True:
        try:
            arrays = await engine.infer(served, inputs, specs, deadline, timing)
            break
        except Overloaded:
            if not wait_when_full:
                raise
            await asyncio.sleep(FULL_QUEUE_PAUSE)
    return encode_response(request, served.config.name, served.config.version, specs, arrays)
