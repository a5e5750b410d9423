"""The replica's one infer pipeline (``inference/pipeline.py``), in process: a real engine and scheduler serving the
mock model on the event loop, no server. What ``ModelInfer`` and a job both go through."""

from __future__ import annotations

import numpy as np
import pytest

from inferencehub.errors import InvalidInput, ModelNotFound
from inferencehub.inference import pipeline
from inferencehub.inference.engine import Engine
from inferencehub.inference.metrics import InferenceMetrics
from inferencehub.inference.statistics import Timing
from inferencehub.inference.workers import Workers
from inferencehub.model import Batching, ModelConfig, TensorSpec
from inferencehub.protocol.inference import grpc_predict_v2_pb2 as pb

ECHO = ModelConfig(
    "echo",
    "1",
    "mock",
    "mock",
    (TensorSpec("x", "FP32", (-1, 2)),),
    (TensorSpec("y", "FP32", (-1, 2)),),
    batching=Batching(4, 1.0),
)


async def served(call):
    workers = Workers(threads=1, processes=1)
    engine = Engine(workers, InferenceMetrics())
    await engine.load([ECHO])
    try:
        return await call(engine)
    finally:
        await engine.close()
        workers.close()


def raw_request(rows: int, request_id: str = "r1") -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name="echo", id=request_id)
    message.inputs.add(name="x", datatype="FP32", shape=[rows, 2])
    message.raw_input_contents.append(np.arange(rows * 2, dtype="<f4").tobytes())
    return message


def test_a_raw_request_gets_a_raw_answer_with_its_id_and_timing(run):
    timing = Timing(received=1)
    response = run(served(lambda engine: pipeline.infer(engine, raw_request(3), None, timing)))
    assert (response.model_name, response.model_version, response.id) == ("echo", "1", "r1")
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [("y", "FP32", [3, 2])]
    assert response.raw_output_contents[0] == np.arange(6, dtype="<f4").tobytes()
    assert timing.decoded and timing.started and timing.finished >= timing.started


def test_a_typed_request_gets_a_typed_answer(run):
    message = pb.ModelInferRequest(model_name="echo", model_version="1")
    message.inputs.add(name="x", datatype="FP32", shape=[1, 2]).contents.fp32_contents.extend([1.5, 2.5])
    response = run(served(lambda engine: pipeline.infer(engine, message, wait_when_full=True)))
    assert list(response.outputs[0].contents.fp32_contents) == [1.5, 2.5] and not response.raw_output_contents


@pytest.mark.parametrize(
    ("message", "error", "text"),
    [
        (pb.ModelInferRequest(model_name="nope"), ModelNotFound, "model 'nope' not found (served: echo)"),
        (pb.ModelInferRequest(model_name="echo", model_version="7"), ModelNotFound, "has no version '7'"),
        (raw_request(5), InvalidInput, "a request of 5 rows is over its max_batch_size (4); split it"),
        (pb.ModelInferRequest(model_name="echo"), InvalidInput, "model 'echo': missing input 'x' (FP32 [-1, 2])"),
    ],
)
def test_what_the_pipeline_refuses(run, message, error, text):
    with pytest.raises(error) as caught:
        run(served(lambda engine: pipeline.infer(engine, message)))
    assert text in str(caught.value)
