"""ModelStreamInfer on a real replica: Triton's decoupled semantics, as tritonclient and grpc.aio see them.

The replica serves the shipped ``mock-llm`` and test models; the tests speak to it over real gRPC channels
(tritonclient's stubs: this process must not import ``inferencehub.protocol``).
"""

from __future__ import annotations

import asyncio
import json
import queue
import signal
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from conftest import (
    SHIPPED,
    TEST_MODELS,
    Replica,
    health_status,
    model_repository,
    sample_value,
    scrape,
    wait_for,
)

FINAL = "triton_final_response"


@pytest.fixture(scope="module")
def llm_replica(tmp_path_factory) -> Iterator[Replica]:
    repo = model_repository(
        tmp_path_factory.mktemp("models"),
        SHIPPED / "mock-llm",
        SHIPPED / "mock",
        TEST_MODELS / "llm-fast",
        TEST_MODELS / "countdown",
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


def test_empty_final_response_when_the_request_enables_it(stream):
    stream.send("llm-fast", llm_inputs("hello", max_tokens=3), request_id="e", enable_empty_final_response=True)
    got = stream.until_final()
    assert len(got) == 4 and [final(r) for r in got] == [False, False, False, True]
    assert all(text(r) for r in got[:3])
    last = got[-1].get_response()
    assert last.id == "e" and len(last.outputs) == 0 and last.raw_output_contents == []
    assert last.parameters["finish_reason"].string_param == "length"
    assert last.parameters["completion_tokens"].int64_param == 3


def test_stop_strings_cut_the_text_before_them(stream):
    stream.send("llm-fast", llm_inputs("a prompt", max_tokens=12), request_id="all")
    words = "".join(text(r) for r in stream.until_final()).split()
    stop = f" {words[3]} {words[4]}"  # two tokens: the matcher must hold the first back until the second
    # (The vocabulary may repeat a word earlier; then the cut is at the first match.)
    expected = " ".join(words[:3]) if words[:3].count(words[3]) == 0 else None
    stream.send("llm-fast", llm_inputs("a prompt", max_tokens=12, stop=[stop, "zzz-never"]), request_id="stop")
    got = stream.until_final()
    sent = "".join(text(r) for r in got)
    assert stop not in sent and " ".join(words).startswith(sent)
    if expected is not None:
        assert sent == expected
    parameters = got[-1].get_response().parameters
    assert parameters["finish_reason"].string_param == "stop"
    assert parameters["completion_tokens"].int64_param == 5


def requests_counted(replica: Replica) -> dict[tuple[str, str], float]:
    text = scrape(replica)
    return {
        (model, code): sample_value(text, "inferencehub_inference_requests_total", model=model, code=code)
        for model, code in (
            ("llm-fast", "OK"),
            ("llm-fast", "INVALID_ARGUMENT"),
            ("_unknown", "NOT_FOUND"),
            ("mock", "OK"),
        )
    } | {
        ("llm-fast", "timed"): sample_value(
            text, "inferencehub_inference_request_duration_seconds_count", model="llm-fast"
        )
    }


def test_bad_requests_are_error_messages_and_the_stream_stays_usable(stream, llm_replica):
    before = requests_counted(llm_replica)
    stream.send("llm-fast", llm_inputs("x", max_tokens=5000), request_id="big")
    [error] = stream.until_final()
    assert isinstance(error, InferenceServerException)
    assert "max_tokens" in str(error) and "4096" in str(error) and "llm-fast" in str(error)
    stream.send("no-such-model", llm_inputs("x"), request_id="missing")
    [error] = stream.until_final()
    assert isinstance(error, InferenceServerException) and "no-such-model" in str(error)
    wrong = triton.InferInput("text_input", [1], "INT32")
    wrong.set_data_from_numpy(np.array([1], dtype=np.int32))
    stream.send("llm-fast", [wrong], request_id="typed")
    [error] = stream.until_final()
    assert isinstance(error, InferenceServerException) and "text_input" in str(error) and "BYTES" in str(error)
    # The same stream still serves.
    stream.send("llm-fast", llm_inputs("x", max_tokens=2), request_id="ok")
    got = stream.until_final()
    assert len(got) == 2 and final(got[-1]) and got[-1].get_response().id == "ok"
    # Each request counts once, with its outcome, as a ModelInfer call does (a generation when it ends: after its
    # last response is written, hence the wait); streams stay out of the unary latency histogram.
    expected = {**before, ("llm-fast", "OK"): before["llm-fast", "OK"] + 1}
    expected["llm-fast", "INVALID_ARGUMENT"] += 2
    expected["_unknown", "NOT_FOUND"] += 1
    wait_for(lambda: requests_counted(llm_replica) == expected, timeout=5, what=f"the requests counted: {expected}")


def test_a_plain_generator_model_steps_in_the_pool_and_gets_an_empty_final_response(stream):
    start = triton.InferInput("start", [1], "INT32")
    start.set_data_from_numpy(np.array([3], dtype=np.int32))
    stream.send("countdown", [start], request_id="c")
    got = stream.until_final()
    assert [r.as_numpy("count").tolist() for r in got[:3]] == [[3], [2], [1]]
    assert [final(r) for r in got] == [False, False, False, True] and got[-1].as_numpy("count") is None
    start.set_data_from_numpy(np.array([-1], dtype=np.int32))
    stream.send("countdown", [start], request_id="bad")
    [error] = stream.until_final()
    assert isinstance(error, InferenceServerException) and "start" in str(error)


def test_a_model_that_is_not_decoupled_answers_once_on_the_stream(stream, llm_replica):
    before = requests_counted(llm_replica)["mock", "OK"]
    tensor = triton.InferInput("input", [1, 2], "FP32")
    tensor.set_data_from_numpy(np.array([[1.0, 2.0]], dtype=np.float32))
    stream.send("mock", [tensor], request_id="u")
    [result] = stream.until_final()
    assert result.as_numpy("output").tolist() == [[1.0, 2.0]] and result.get_response().id == "u"
    wait_for(lambda: requests_counted(llm_replica)["mock", "OK"] == before + 1, timeout=5, what="the request counted")


def test_unary_infer_on_a_decoupled_model_is_invalid_argument_naming_the_alternatives(llm_replica):
    with triton.InferenceServerClient(llm_replica.target) as client, pytest.raises(InferenceServerException) as err:
        client.infer("mock-llm", llm_inputs("hello"))
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "mock-llm" in str(err.value) and "ModelStreamInfer" in str(err.value) and "generate_stream" in str(err.value)


# --- grpc.aio: bidirectional calls, cancellation, deadlines ---------------------------------------------------


def request(model: str, prompt: str, max_tokens: int, request_id: str = "") -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name=model, id=request_id)
    message.inputs.add(name="text_input", datatype="BYTES", shape=[1]).contents.bytes_contents.append(prompt.encode())
    message.inputs.add(name="max_tokens", datatype="INT32", shape=[1]).contents.int_contents.append(max_tokens)
    return message


def is_final(response: pb.ModelStreamInferResponse) -> bool:
    parameters = response.infer_response.parameters
    return FINAL in parameters and parameters[FINAL].bool_param


def test_grpc_aio_interleaves_concurrent_requests_on_one_stream(llm_replica):
    async def run() -> dict[str, list[str]]:
        async with grpc.aio.insecure_channel(llm_replica.target) as channel:
            call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(
                iter([request("llm-fast", f"prompt {i}", 20, f"id{i}") for i in range(3)]), timeout=10
            )
            tokens: dict[str, list[str]] = {}
            order = []
            async for response in call:
                assert not response.error_message, response.error_message
                reply = response.infer_response
                order.append(reply.id)
                if reply.outputs:
                    tokens.setdefault(reply.id, []).append(reply.outputs[0].contents.bytes_contents[0].decode())
                if is_final(response):
                    tokens[reply.id].append("<final>")
            assert await call.code() == grpc.StatusCode.OK
            # Generated at once, not one after the other: the ids interleave.
            assert order[:3] != ["id0"] * 3 or order[20:23] != ["id1"] * 3
            return tokens

    tokens = asyncio.run(run())
    assert sorted(tokens) == ["id0", "id1", "id2"]
    assert all(len(t) == 21 and t[-1] == "<final>" for t in tokens.values())


def stream_tokens(replica, model: str) -> float:
    return sample_value(scrape(replica), "inferencehub_inference_stream_tokens_total", model=model)


def cancelled(replica, model: str) -> float:
    return sample_value(scrape(replica), "inferencehub_inference_streams_cancelled_total", model=model)


def open_streams(replica, model: str) -> float:
    return sample_value(scrape(replica), "inferencehub_inference_open_streams", model=model)


def test_a_caller_that_hangs_up_stops_the_generation_within_100ms(llm_replica):
    """The disconnect test: read a few tokens of a long generation, cancel, watch the replica's counters."""
    before = cancelled(llm_replica, "llm-fast")

    async def run() -> float:
        async with grpc.aio.insecure_channel(llm_replica.target) as channel:
            call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(
                iter([request("llm-fast", "go on", 4096)]), timeout=30
            )
            read = 0
            async for _ in call:
                read += 1
                if read == 20:
                    break
            assert open_streams(llm_replica, "llm-fast") == 1
            call.cancel()
            return time.monotonic()

    hung_up = asyncio.run(run())
    time.sleep(max(0.0, hung_up + 0.1 + 0.1 - time.monotonic()))  # 100 ms, and 100 ms of tolerance (shared CPUs)
    stopped = stream_tokens(llm_replica, "llm-fast")
    counted, still_open = cancelled(llm_replica, "llm-fast"), open_streams(llm_replica, "llm-fast")
    time.sleep(0.3)  # unstopped, 1 ms tokens would add about 200 to 300
    assert stream_tokens(llm_replica, "llm-fast") == stopped
    assert (counted, still_open) == (before + 1, 0)


def test_the_deadline_covers_the_whole_stream(llm_replica):
    before = cancelled(llm_replica, "llm-fast")

    async def run() -> tuple[int, grpc.StatusCode]:
        async with grpc.aio.insecure_channel(llm_replica.target) as channel:
            call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(
                iter([request("llm-fast", "a long answer", 4096)]), timeout=0.5
            )
            read = 0
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in call:
                    read += 1
            return read, err.value.code()

    started = time.monotonic()
    read, code = asyncio.run(run())
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 50 < read < 4096 and time.monotonic() - started < 2
    wait_for(lambda: cancelled(llm_replica, "llm-fast") == before + 1, timeout=1, what="the generation to stop")
    stopped = stream_tokens(llm_replica, "llm-fast")
    time.sleep(0.3)
    assert stream_tokens(llm_replica, "llm-fast") == stopped and open_streams(llm_replica, "llm-fast") == 0


def test_a_reader_that_stops_reading_pauses_the_generation(llm_replica):
    """Pacing: for a reader that does not read, the replica produces only what the transport takes, then waits.

    The reader grants a 16 KiB window, with BDP probing off (what the gateway's stream channel does); the replica's
    side of the transport takes gRPC's per-stream write buffer (64 KiB) on top (docs/api.md, Streaming).
    """
    window, write_buffer = 16384, 65536
    options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", window)]

    async def produced_until_paused(start: float) -> float:
        """Tokens made since ``start`` once two readings 0.3 s apart agree (bounded: 8 s)."""
        last = -1.0
        for _ in range(int(8 / 0.3)):
            await asyncio.sleep(0.3)
            now = stream_tokens(llm_replica, "llm-fast") - start
            if now == last:
                return now
            last = now
        pytest.fail(f"the generation did not pause for a reader that does not read ({last} tokens)")

    async def run() -> tuple[float, float, int, int]:
        async with grpc.aio.insecure_channel(llm_replica.target, options=options) as channel:
            call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(
                iter([request("llm-fast", "slow reader", 4096)]), timeout=30
            )
            start = stream_tokens(llm_replica, "llm-fast")
            size = (await call.read()).ByteSize() + 5  # gRPC's 5-byte message header
            held = await produced_until_paused(start)  # not reading: unpaced, 1 ms tokens would end in ~4 s
            await asyncio.sleep(0.5)
            later = stream_tokens(llm_replica, "llm-fast") - start
            read = 1
            while not is_final(await call.read()):
                read += 1
            return held, later, read + 1, size  # the final one too

    held, later, read, size = asyncio.run(run())
    assert held == later and held < 4096  # the generator waits for the reader
    assert held * size <= window + write_buffer + 4 * size, (held, size)
    assert read == 4096


async def rest_of(call) -> list:
    """The responses of a call read with ``read()`` so far, up to its end."""
    got = []
    while (response := await call.read()) is not grpc.aio.EOF:
        got.append(response)
    return got


def test_open_streams_hold_execution_slots_admission_and_in_flight(tmp_path):
    """One slot, no queue: an open stream fills the replica, a second one is refused (in the stream) until it ends."""
    config = json.loads((TEST_MODELS / "llm-steady" / "config.json").read_text())
    config["scheduling"] = {"max_concurrency": 1, "max_queue_size": 0}
    (tmp_path / "llm-steady").mkdir()
    (tmp_path / "llm-steady" / "config.json").write_text(json.dumps(config))
    replica = Replica("--models", str(tmp_path)).wait_serving()
    try:

        async def run() -> None:
            async with grpc.aio.insecure_channel(replica.target) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                first = stub.ModelStreamInfer(iter([request("llm-steady", "long", 60, "first")]), timeout=20)
                await first.read()
                text = scrape(replica)
                assert sample_value(text, "inferencehub_inference_open_streams", model="llm-steady") == 1
                assert sample_value(text, "inferencehub_inference_in_flight_requests", model="llm-steady") == 1
                second = stub.ModelStreamInfer(iter([request("llm-steady", "more", 3, "second")]), timeout=20)
                [refused] = [r async for r in second]
                assert refused.infer_response.id == "second" and is_final(refused)
                assert "overloaded" in refused.error_message and "llm-steady" in refused.error_message
                assert refused.infer_response.parameters["error_code"].string_param == "RESOURCE_EXHAUSTED"
                assert await second.code() == grpc.StatusCode.OK  # the error was for the request, not the call
                rest = await rest_of(first)
                assert len(rest) == 59 and is_final(rest[-1]) and not any(r.error_message for r in rest)
                again = stub.ModelStreamInfer(iter([request("llm-steady", "after", 2, "again")]), timeout=20)
                assert [r.error_message async for r in again] == ["", ""]
                text = scrape(replica)
                assert sample_value(text, "inferencehub_inference_in_flight_requests", model="llm-steady") == 0
                # Statistics: each stream's request is one inference and one execution; the refused one failed.
                stats = await stub.ModelStatistics(pb.ModelStatisticsRequest(name="llm-steady"), timeout=5)
                [model] = stats.model_stats
                assert (model.inference_count, model.execution_count) == (2, 2)
                assert (model.inference_stats.success.count, model.inference_stats.fail.count) == (2, 1)
                assert model.inference_stats.compute_infer.ns > 0.5e9  # 60 tokens of 10 ms, written as read

        asyncio.run(run())
    finally:
        replica.stop()


def test_sigterm_lets_an_open_stream_finish_and_refuses_new_ones(tmp_path):
    repo = model_repository(tmp_path, TEST_MODELS / "llm-steady")
    replica = Replica("--models", str(repo), "--drain-seconds", "1", "--grace-seconds", "10").wait_serving()
    try:

        async def run() -> tuple[list, grpc.StatusCode, grpc.StatusCode, grpc.StatusCode]:
            async with grpc.aio.insecure_channel(replica.target) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                sending: asyncio.Queue = asyncio.Queue()
                await sending.put(request("llm-steady", "drain me", 250, "open"))

                async def requests():
                    while (message := await sending.get()) is not None:
                        yield message

                call = stub.ModelStreamInfer(requests(), timeout=30)
                got = [await call.read()]  # ~2.5 s of tokens: longer than the drain
                replica.proc.send_signal(signal.SIGTERM)
                await asyncio.to_thread(
                    wait_for, lambda: health_status(replica.target) == "NOT_SERVING", 5, what="NOT_SERVING"
                )
                # A new request on the open call is refused in the stream; the call and its generation go on.
                await sending.put(request("llm-steady", "one more", 3, "more"))
                await sending.put(None)
                # Draining: new streams are refused with UNAVAILABLE (the caller goes elsewhere).
                refused = stub.ModelStreamInfer(iter([request("llm-steady", "new", 3)]), timeout=5)
                with pytest.raises(grpc.aio.AioRpcError) as during:
                    await refused.read()
                # After the drain, the server refuses new calls itself.
                await asyncio.to_thread(
                    wait_for, lambda: "refusing new calls" in replica.log, 5, what="the drain to end"
                )
                async with grpc.aio.insecure_channel(replica.target) as fresh:
                    late = pb_grpc.GRPCInferenceServiceStub(fresh).ModelStreamInfer(
                        iter([request("llm-steady", "late", 3)]), timeout=5
                    )
                    with pytest.raises(grpc.aio.AioRpcError) as after:
                        await late.read()
                got += await rest_of(call)
                return got, during.value.code(), after.value.code(), await call.code()

        got, during, after, code = asyncio.run(run())
        assert during == grpc.StatusCode.UNAVAILABLE and after == grpc.StatusCode.UNAVAILABLE
        [refusal] = [r for r in got if r.infer_response.id == "more"]
        assert "not starting new generations" in refusal.error_message and is_final(refusal)
        assert refusal.infer_response.parameters["error_code"].string_param == "UNAVAILABLE"
        opened = [r for r in got if r.infer_response.id == "open"]
        assert code == grpc.StatusCode.OK and len(opened) == 250 and is_final(opened[-1])
        assert not any(r.error_message for r in opened)
        assert replica.proc.wait(15) == 0
    finally:
        replica.kill()
