"""Where a ``thread`` model's calls run (``inference/workers.py``): on the event loop while they are fast, in the
thread pool while they hold their thread, judged by what each call did (waited, or used the CPU)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from inferencehub.inference.workers import INLINE_BELOW, Workers
from inferencehub.model import ModelConfig, TensorSpec

CONFIG = ModelConfig("m", "1", "custom", "custom", (TensorSpec("x", "FP32", (-1,)),), (TensorSpec("y", "FP32", (-1,)),))


class Recorder:
    """A model recording the thread each call ran on; ``work`` is what a call does."""

    def __init__(self, work) -> None:
        self.work = work
        self.threads: list[int] = []

    def predict(self, inputs):
        self.threads.append(threading.get_ident())
        self.work()
        return {"y": inputs["x"]}


def burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


async def calls(model: Recorder, count: int) -> list[bool]:
    """Make ``count`` calls; return, for each, whether it ran on the loop's thread."""
    workers = Workers(threads=2, processes=1)
    try:
        for _ in range(count):
            await workers.predict(CONFIG, model, {"x": np.zeros(1, np.float32)})
    finally:
        workers.close()
    loop_thread = threading.get_ident()
    return [t == loop_thread for t in model.threads]


def test_a_fast_model_moves_to_the_loop(run):
    on_loop = run(calls(Recorder(lambda: None), 30))
    assert not on_loop[0]  # of unknown cost: the pool, where it is timed
    assert all(on_loop[-10:])


@pytest.mark.parametrize(
    "work",
    [
        pytest.param(lambda: time.sleep(INLINE_BELOW * 5), id="waits (sleep, I/O): counted by the time it took"),
        pytest.param(lambda: burn(INLINE_BELOW * 5), id="uses the CPU: counted by the CPU time it used"),
    ],
)
def test_a_model_that_holds_its_thread_stays_in_the_pool(run, work):
    assert not any(run(calls(Recorder(work), 10)))
