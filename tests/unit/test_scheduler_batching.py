"""The replica's per-model scheduler (``inference/scheduler.py``) on an event loop in this process: dynamic
batching, each caller's own rows, admission control, deadlines, and a failed batch retried member by member."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from inferencehub.errors import DeadlineExpired, InvalidInput, ModelError, ModelNotReady, Overloaded
from inferencehub.inference.metrics import InferenceMetrics
from inferencehub.inference.scheduler import ModelScheduler
from inferencehub.inference.statistics import ModelStats
from inferencehub.model import Batching, ModelConfig, Scheduling, TensorSpec

SPEC = (TensorSpec("x", "INT32", (-1, -1)),)


class Doubler:
    """A model that doubles its input; refuses negative values; waits at ``gate`` while it is closed."""

    def __init__(self) -> None:
        self.calls: list[np.ndarray] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self, inputs):
        self.calls.append(inputs["x"])
        await self.gate.wait()
        if (inputs["x"] < 0).any():
            raise ModelError("negative input")
        return {"y": inputs["x"] * 2}


def scheduler(model, *, max_batch=8, preferred=(), delay_ms=0.0, concurrency=1, queue=16, stats=None):
    batching = Batching(max_batch, delay_ms, preferred) if max_batch else None
    config = ModelConfig("m", "1", "mock", "mock", SPEC, SPEC, batching=batching, scheduling=Scheduling(None, queue))
    return ModelScheduler(config, model, concurrency, InferenceMetrics(), stats)


def rows(n: int, start: int = 0, width: int = 2) -> dict[str, np.ndarray]:
    return {"x": np.arange(start, start + n * width, dtype=np.int32).reshape(n, width)}


async def until(condition, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not condition():
        assert loop.time() < end, "timed out waiting for the scheduler"
        await asyncio.sleep(0.001)


def test_requests_queued_together_run_as_one_batch_and_each_gets_its_rows(run):
    async def scenario():
        model, stats = Doubler(), ModelStats("m", "1")
        s = scheduler(model, preferred=(5,), stats=stats)
        model.gate.clear()
        first = asyncio.create_task(s.submit(rows(1), None))
        await until(lambda: s.busy == 1)  # running alone: nothing else was under way
        b = asyncio.create_task(s.submit(rows(2, start=100), None))
        c = asyncio.create_task(s.submit(rows(3, start=200), None))
        other = asyncio.create_task(s.submit(rows(1, width=3), None))  # another size beyond the first dimension
        await until(lambda: len(s.queue) == 3)
        model.gate.set()
        results = await asyncio.gather(first, b, c, other)
        await s.close()
        return model.calls, results, stats.message()

    calls, results, stats = run(scenario())
    assert [c.shape for c in calls] == [(1, 2), (5, 2), (1, 3)]
    np.testing.assert_array_equal(calls[1], np.concatenate([rows(2, 100)["x"], rows(3, 200)["x"]]))
    for result, sent in zip(results, [rows(1), rows(2, 100), rows(3, 200), rows(1, width=3)], strict=True):
        np.testing.assert_array_equal(result["y"], sent["x"] * 2)
    assert (stats.execution_count, stats.inference_count) == (3, 7)
    assert sorted(b.batch_size for b in stats.batch_stats) == [1, 2]


def test_a_batch_never_exceeds_max_batch_size(run):
    async def scenario():
        model = Doubler()
        s = scheduler(model, max_batch=4, preferred=(4,))
        model.gate.clear()
        first = asyncio.create_task(s.submit(rows(1), None))
        await until(lambda: s.busy == 1)
        waiting = [asyncio.create_task(s.submit(rows(3, start=10 * i), None)) for i in range(3)]
        await until(lambda: len(s.queue) == 3)
        model.gate.set()
        await asyncio.gather(first, *waiting)
        await s.close()
        return [c.shape[0] for c in model.calls]

    assert run(scenario()) == [1, 3, 3, 3]


def test_a_request_over_max_batch_size_is_refused(run):
    async def scenario():
        s = scheduler(Doubler(), max_batch=4)
        try:
            with pytest.raises(InvalidInput, match=r"a request of 5 rows is over its max_batch_size \(4\); split it"):
                await s.submit(rows(5), None)
        finally:
            await s.close()

    run(scenario())


def test_beyond_the_queue_and_the_free_slots_requests_are_refused_at_once(run):
    async def scenario():
        model = Doubler()
        s = scheduler(model, max_batch=0, queue=1)
        model.gate.clear()
        running = asyncio.create_task(s.submit(rows(1), None))
        await until(lambda: s.busy == 1)
        queued = asyncio.create_task(s.submit(rows(1), None))
        await until(lambda: len(s.queue) == 1)
        with pytest.raises(Overloaded, match=r"1 requests waiting \(max_queue_size 1\)"):
            await s.submit(rows(1), None)
        model.gate.set()
        await asyncio.gather(running, queued)
        await s.close()
        return len(model.calls)

    assert run(scenario()) == 2


def test_a_request_whose_deadline_passed_in_the_queue_is_dropped_uncomputed(run):
    async def scenario():
        model = Doubler()
        s = scheduler(model, max_batch=0)
        model.gate.clear()
        running = asyncio.create_task(s.submit(rows(1), None))
        await until(lambda: s.busy == 1)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 0.01
        late = asyncio.create_task(s.submit(rows(1, start=50), deadline))
        await until(lambda: loop.time() > deadline and len(s.queue) == 1)
        model.gate.set()
        await running
        with pytest.raises(DeadlineExpired, match="deadline passed in the queue"):
            await late
        await s.close()
        return len(model.calls)

    assert run(scenario()) == 1


def test_a_failed_batch_is_retried_member_by_member(run):
    async def scenario():
        model = Doubler()
        s = scheduler(model, preferred=(2,))
        model.gate.clear()
        first = asyncio.create_task(s.submit(rows(1), None))
        await until(lambda: s.busy == 1)
        good = asyncio.create_task(s.submit(rows(1, start=7), None))
        bad = asyncio.create_task(s.submit({"x": -np.ones((1, 2), dtype=np.int32)}, None))
        await until(lambda: len(s.queue) == 2)
        model.gate.set()
        await first
        np.testing.assert_array_equal((await good)["y"], rows(1, start=7)["x"] * 2)
        with pytest.raises(ModelError, match="negative input"):
            await bad
        await s.close()
        return [c.shape[0] for c in model.calls]

    assert run(scenario()) == [1, 2, 1, 1]


def test_outputs_without_the_batch_rows_are_a_model_error_for_each_member(run):
    async def scenario():
        async def summing(inputs):
            await gate.wait()
            return {"y": inputs["x"].sum(keepdims=True)}

        gate = asyncio.Event()
        s = scheduler(summing, preferred=(2,))
        first = asyncio.create_task(s.submit(rows(1), None))
        await until(lambda: s.busy == 1)
        pair = [asyncio.create_task(s.submit(rows(1, start=i), None)) for i in (3, 5)]
        await until(lambda: len(s.queue) == 2)
        gate.set()
        results = await asyncio.gather(first, *pair)
        await s.close()
        return [r["y"].tolist() for r in results]

    # Split fails (1 output row for a batch of 2): each member is run alone and gets its own answer.
    assert run(scenario()) == [[[1]], [[3 + 4]], [[5 + 6]]]


def test_closing_refuses_what_is_still_queued(run):
    async def scenario():
        model = Doubler()
        s = scheduler(model, max_batch=0)
        model.gate.clear()
        running = asyncio.create_task(s.submit(rows(1), None))
        await until(lambda: s.busy == 1)
        queued = asyncio.create_task(s.submit(rows(1), None))
        await until(lambda: len(s.queue) == 1)
        await s.close()
        for task in (running, queued):
            with pytest.raises(ModelNotReady, match="model 'm' is shutting down"):
                await task

    run(scenario())
