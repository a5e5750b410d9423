"""The gateway's coalescer (``gateway/coalescer.py``) against a stand-in upstream on an in-process event loop:
who travels together, who goes alone, and what each caller gets back."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from inferencehub.gateway.coalescer import Coalescer
from inferencehub.gateway.metrics import GatewayMetrics
from inferencehub.gateway.upstream import UpstreamError
from inferencehub.protocol.inference import grpc_predict_v2_pb2 as pb


class Upstream:
    """Answers ModelConfig with ``max_batch_size``; ModelInfer echoes input 0 as output 'y' once ``gate`` is open,
    failing with INVALID_ARGUMENT when an input holds a negative number, or with ``fail`` when it is set."""

    def __init__(self, max_batch_size: int = 8) -> None:
        self.max_batch_size = max_batch_size
        self.calls: list[tuple[str, pb.ModelInferRequest, str]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail: grpc.StatusCode | None = None

    def infers(self) -> list[tuple[int, str]]:
        """(rows, request ids) of each ModelInfer call, in order."""
        return [(m.inputs[0].shape[0], ids) for method, m, ids in self.calls if method == "ModelInfer"]

    async def call(self, method, message, *, request_id, timeout):
        self.calls.append((method, message, request_id))
        if method == "ModelConfig":
            return pb.ModelConfigResponse(config=pb.ModelConfig(max_batch_size=self.max_batch_size)), "r1"
        await self.gate.wait()
        if self.fail is not None:
            raise UpstreamError(self.fail, "refused")
        if (np.frombuffer(message.raw_input_contents[0], "<i4") < 0).any():
            raise UpstreamError(grpc.StatusCode.INVALID_ARGUMENT, "negative")
        response = pb.ModelInferResponse(model_name=message.model_name, id=message.id)
        response.outputs.add(name="y", datatype="INT32", shape=list(message.inputs[0].shape))
        response.raw_output_contents.append(message.raw_input_contents[0])
        return response, "r1"


def message(values: list[int], request_id: str, model: str = "m") -> pb.ModelInferRequest:
    m = pb.ModelInferRequest(model_name=model, id=request_id)
    m.inputs.add(name="x", datatype="INT32", shape=[len(values), 1])
    m.raw_input_contents.append(np.array(values, "<i4").tobytes())
    return m


async def until(condition, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not condition():
        assert loop.time() < end, "timed out waiting for the coalescer"
        await asyncio.sleep(0.001)


async def burst(upstream: Upstream, coalescer: Coalescer, *later: tuple[list[int], str]):
    """One request in flight (held at the gate), then ``later`` requests; then the gate opens. Returns each
    caller's outcome (its response or its exception), the first caller's first."""
    upstream.gate.clear()
    first = asyncio.create_task(coalescer.infer(message([0], "first"), request_id="first", timeout=30))
    await until(lambda: upstream.infers())
    tasks = [asyncio.create_task(coalescer.infer(message(v, i), request_id=i, timeout=30)) for v, i in later]

    def placed() -> int:
        waiting = sum(len(g.members) for lane in coalescer.lanes.values() for g in lane.waiting.values())
        sent = sum(len(ids.split(",")) for _, ids in upstream.infers()) - 1
        return waiting + sent

    await until(lambda: placed() == len(later))
    upstream.gate.set()
    outcomes = await asyncio.gather(first, *tasks, return_exceptions=True)
    await coalescer.close()
    return outcomes


def coalescer(upstream: Upstream, **options) -> Coalescer:
    return Coalescer(upstream, GatewayMetrics(), max_delay=30.0, **options)


def values(outcome) -> list[int]:
    response, _ = outcome
    return np.frombuffer(response.raw_output_contents[0], "<i4").tolist()


def test_requests_that_arrive_during_a_call_travel_together(run):
    upstream = Upstream()
    outcomes = run(burst(upstream, coalescer(upstream), ([1, 2], "a"), ([3], "b"), ([4, 5, 6], "c")))
    assert upstream.infers() == [(1, "first"), (6, "a,b,c")]
    assert [values(o) for o in outcomes] == [[0], [1, 2], [3], [4, 5, 6]]
    assert [o[0].id for o in outcomes] == ["first", "a", "b", "c"]
    assert all(o[1] == "r1" for o in outcomes)
    assert [method for method, _, _ in upstream.calls].count("ModelConfig") == 1


def test_a_group_goes_as_soon_as_it_reaches_max_batch_size(run):
    upstream = Upstream(max_batch_size=3)
    outcomes = run(burst(upstream, coalescer(upstream), ([1, 2], "a"), ([3], "b"), ([4], "c")))
    # a and b fill a call of 3 rows at once (while "first" is still held); c waits for the next call.
    assert sorted(upstream.infers()) == [(1, "c"), (1, "first"), (3, "a,b")]
    assert [values(o) for o in outcomes] == [[0], [1, 2], [3], [4]]


def test_when_a_coalesced_call_fails_each_member_is_sent_alone(run):
    upstream = Upstream()
    outcomes = run(burst(upstream, coalescer(upstream), ([1], "a"), ([-1], "bad"), ([2], "b")))
    assert upstream.infers() == [(1, "first"), (3, "a,bad,b"), (1, "a"), (1, "bad"), (1, "b")]
    assert values(outcomes[1]) == [1] and values(outcomes[3]) == [2]
    assert isinstance(outcomes[2], UpstreamError) and outcomes[2].code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED])
def test_a_refusal_of_the_whole_call_fails_every_member_without_retries(run, code):
    async def scenario():
        upstream = Upstream()
        c = coalescer(upstream)
        upstream.gate.clear()
        first = asyncio.create_task(c.infer(message([0], "first"), request_id="first", timeout=30))
        await until(lambda: upstream.infers())
        group = [asyncio.create_task(c.infer(message([i], f"g{i}"), request_id=f"g{i}", timeout=30)) for i in (1, 2)]
        await until(lambda: sum(len(g.members) for lane in c.lanes.values() for g in lane.waiting.values()) == 2)
        upstream.fail = code
        upstream.gate.set()
        outcomes = await asyncio.gather(first, *group, return_exceptions=True)
        await c.close()
        return upstream.infers(), outcomes

    infers, outcomes = run(scenario())
    assert infers == [(1, "first"), (2, "g1,g2")]
    assert all(isinstance(o, UpstreamError) and o.code == code for o in outcomes)


def test_a_model_that_does_not_batch_gets_every_request_alone(run):
    upstream = Upstream(max_batch_size=0)

    async def scenario():
        c = coalescer(upstream)
        upstream.gate.clear()
        calls = [asyncio.create_task(c.infer(message([i], f"r{i}"), request_id=f"r{i}", timeout=30)) for i in (1, 2)]
        await until(lambda: len(upstream.infers()) == 2)  # both in flight at once, neither waits for the other
        upstream.gate.set()
        outcomes = await asyncio.gather(*calls)
        await c.close()
        return outcomes

    outcomes = run(scenario())
    assert sorted(upstream.infers()) == [(1, "r1"), (1, "r2")]
    assert [values(o) for o in outcomes] == [[1], [2]]


def test_models_with_coalescing_off_are_never_looked_up(run):
    upstream = Upstream()

    async def scenario():
        c = coalescer(upstream, off_models=frozenset({"m"}))
        outcome = await c.infer(message([7], "a"), request_id="a", timeout=30)
        await c.close()
        return outcome

    assert values(run(scenario())) == [7]
    assert [method for method, _, _ in upstream.calls] == ["ModelInfer"]
