"""ModelStreamInfer on a real replica: Triton's decoupled semantics, as tritonclient and grpc.aio see them.

The replica serves the shipped ``mock-llm`` and test models; the tests speak to it over real gRPC channels
(tritonclient's stubs: this process must not import ``inferencehub.protocol``).
"""

from __future__ import annotations

import queue
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from conftest import SHIPPED, TEST_MODELS, Replica, model_repository

FINAL = "triton_final_response"


@pytest.fixture(scope="module")
def llm_replica(tmp_path_factory) -> Iterator[Replica]:
    repo = model_repository(
        tmp_path_factory.mktemp("models"), SHIPPED / "mock-llm", SHIPPED / "mock", TEST_MODELS / "llm-fast"
    )
    server = Replica("--models", str(repo), "--replica-name", "stream-replica")
    try:
        yield server.wait_serving()
    finally:
        server.terminate()
        server.kill()


def llm_inputs(prompt: str, max_tokens: int | None = None, stop: list[str] | None = None) -> list:
    inputs = [triton.InferInput("text_input", [1], "BYTES")]
    inputs[0].set_data_from_numpy(np.array([prompt.encode()], dtype=object))
    if max_tokens is not None:
        tensor = triton.InferInput("max_tokens", [1], "INT32")
        tensor.set_data_from_numpy(np.array([max_tokens], dtype=np.int32))
        inputs.append(tensor)
    if stop is not None:
        tensor = triton.InferInput("stop", [len(stop)], "BYTES")
        tensor.set_data_from_numpy(np.array([s.encode() for s in stop], dtype=object))
        inputs.append(tensor)
    return inputs


class Stream:
    """A tritonclient stream whose results (result, error) arrive in a queue."""

    def __init__(self, target: str) -> None:
        self.client = triton.InferenceServerClient(target)
        self.results: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.results.put((result, error)))

    def send(self, model: str, inputs: list, request_id: str = "", **kwargs) -> None:
        self.client.async_stream_infer(model, inputs, request_id=request_id, **kwargs)

    def until_final(self, timeout: float = 10.0) -> list:
        """Responses (or errors) up to the one with the final flag, or an error."""
        got = []
        while True:
            result, error = self.results.get(timeout=timeout)
            got.append(error if error is not None else result)
            if error is not None or final(result):
                return got

    def close(self) -> None:
        self.client.stop_stream()
        self.client.close()


def final(result) -> bool:
    parameters = result.get_response().parameters
    return FINAL in parameters and parameters[FINAL].bool_param


def text(result) -> str:
    output = result.as_numpy("text_output")
    return "" if output is None else b"".join(output.tolist()).decode()


@pytest.fixture
def stream(llm_replica) -> Iterator[Stream]:
    s = Stream(llm_replica.target)
    try:
        yield s
    finally:
        s.close()


def test_mock_llm_streams_its_tokens_with_the_final_flag_on_the_last(stream):
    stream.send("mock-llm", llm_inputs("tell me a story", max_tokens=5), request_id="r1")
    got = stream.until_final()
    assert all(not isinstance(r, InferenceServerException) for r in got), got
    assert len(got) == 5
    assert [final(r) for r in got] == [False] * 4 + [True]
    assert all(r.get_response().id == "r1" for r in got)
    tokens = [text(r) for r in got]
    assert not tokens[0].startswith(" ") and all(t.startswith(" ") for t in tokens[1:])
    assert len("".join(tokens).split()) == 5
    parameters = got[-1].get_response().parameters
    assert parameters["finish_reason"].string_param == "length"
    assert parameters["prompt_tokens"].int64_param == 4
    assert parameters["completion_tokens"].int64_param == 5
    # Deterministic: the same prompt gives the same tokens; another prompt, others.
    stream.send("mock-llm", llm_inputs("tell me a story", max_tokens=5), request_id="r2")
    assert [text(r) for r in stream.until_final()] == tokens
    stream.send("mock-llm", llm_inputs("something else entirely", max_tokens=5), request_id="r3")
    assert [text(r) for r in stream.until_final()] != tokens
