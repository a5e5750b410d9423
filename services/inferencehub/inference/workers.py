"""Where model compute runs: never on the event loop.

- ``async def predict`` models run on the loop (they promise not to block it);
- ``execution: thread`` models run in a thread pool (numpy releases the GIL), except while their calls are
  measured to take under ``INLINE_BELOW`` (a small numpy MLP): then the hand-off to a thread and back would cost
  more than the call, and they run on the loop; a call that takes longer sends the model back to the pool. A slow call
  that never waited (no sleep, I/O or other thread: its thread only lost the CPU to other work on a busy machine)
  counts the CPU time it used: the time it took says how busy the machine is, not how long the model holds a thread;
- ``execution: process`` models run in spawned worker processes, each of which loads
  its own copy of every process model, so CPU-bound Python never holds the
  server's GIL and health checks keep answering while every worker is busy. A worker process ends with its
  replica, however the replica ends (SIGKILL included: ``inferencehub.lifeline``); the pool starts them from the
  event loop's thread, which lives as long as the replica.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import multiprocessing
import os
import resource
import signal
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from inferencehub import lifeline
from inferencehub.errors import ModelNotReady
from inferencehub.inference import runtimes
from inferencehub.model import Model, ModelConfig

log = logging.getLogger(__name__)

# Worker-process state: the configs it may serve and the models it has loaded.
_worker_configs: dict[str, ModelConfig] = {}
_worker_models: dict[str, Model] = {}


def _init_worker(configs: list[ModelConfig], replica: int) -> None:
    lifeline.tie_to_parent(replica)  # no orphaned workers when the replica is killed
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _worker_configs.update({c.name: c for c in configs})


def _worker_model(name: str) -> Model:
    model = _worker_models.get(name)
    if model is None:
        model = _worker_models[name] = runtimes.build(_worker_configs[name])
    return model


def _worker_warm_up() -> int:
    for name in _worker_configs:
        _worker_model(name)
    time.sleep(0.05)  # hold this worker so the next warm-up task starts another one
    return os.getpid()


def _worker_predict(name: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return _worker_model(name).predict(inputs)


INLINE_BELOW = 0.0003  # seconds: a thread model whose calls take less runs on the loop


class Cost:
    """A model's recent call time: jumps up with a slow call at once, comes down slowly."""

    __slots__ = ("seconds",)

    def __init__(self) -> None:
        self.seconds = float("inf")  # unknown: the first calls run in the pool, and are timed there

    def add(self, took: float) -> None:
        self.seconds = took if took > self.seconds or self.seconds == float("inf") else 0.9 * self.seconds + 0.1 * took


if hasattr(resource, "RUSAGE_THREAD"):  # Linux

    def _timed(predict, cost: Cost, inputs):
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw
        cpu = time.thread_time()
        start = time.perf_counter()
        try:
            return predict(inputs)
        finally:
            took = time.perf_counter() - start
            if took >= INLINE_BELOW and resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw == before:
                # It never waited (no sleep, no I/O, no other thread): the rest of the time the OS or the
                # hypervisor ran something else. What the model holds a thread for is the CPU time it used.
                took = time.thread_time() - cpu
            cost.add(took)

else:

    def _timed(predict, cost: Cost, inputs):
        start = time.perf_counter()
        try:
            return predict(inputs)
        finally:
            cost.add(time.perf_counter() - start)


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class Workers:
    def __init__(self, threads: int, processes: int) -> None:
        self.thread_count = max(1, threads)
        self.threads = ThreadPoolExecutor(self.thread_count, thread_name_prefix="model")
        self.process_count = max(1, processes)
        self.process_configs: list[ModelConfig] = []
        self.processes: ProcessPoolExecutor | None = None
        self.costs: dict[str, Cost] = {}

    def _new_process_pool(self, configs: list[ModelConfig] | None = None) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            self.process_count,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(self.process_configs if configs is None else configs, os.getpid()),
        )

    async def start(self, process_configs: list[ModelConfig] | None = None) -> None:
        """Start the worker processes and load the process models in each (errors propagate)."""
        await self.set_process_configs(process_configs or [])

    async def set_process_configs(self, configs: list[ModelConfig]) -> None:
        """Serve exactly ``configs`` in the worker processes (a model loaded, replaced or unloaded at run time).

        Each worker holds a copy of every process model, and a pool cannot load into or free from each of its
        workers in turn: so a new pool is started and warmed up (a model that fails to load raises here, and
        the old pool stays), new calls go to it, and the old pool's processes exit once their calls are done,
        freeing their copies. No process model left: no pool at all.
        """
        old = self.processes
        if not configs:
            self.processes, self.process_configs = None, []
        else:
            pool = self._new_process_pool(configs)
            loop = asyncio.get_running_loop()
            try:
                pids = await asyncio.gather(
                    *(loop.run_in_executor(pool, _worker_warm_up) for _ in range(self.process_count))
                )
            except BaseException:
                await asyncio.to_thread(pool.shutdown, True, cancel_futures=True)
                raise
            self.processes, self.process_configs = pool, list(configs)
            log.info("%d worker process(es) ready for %s", len(set(pids)), ", ".join(c.name for c in configs))
        if old is not None:
            await asyncio.to_thread(old.shutdown, True)  # its queued and running calls finish first

    def forget(self, name: str) -> None:
        """Drop what was kept about a model that is unloaded."""
        self.costs.pop(name, None)

    async def load(self, config: ModelConfig) -> Model | None:
        """Load a loop or thread model here (in a thread, so the loop stays free); process models load in workers."""
        if config.execution == "process":
            return None
        return await asyncio.get_running_loop().run_in_executor(self.threads, runtimes.build, config)

    async def predict(
        self, config: ModelConfig, model: Model | None, inputs: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        loop = asyncio.get_running_loop()
        if model is None:
            if self.processes is None:
                raise ModelNotReady(f"model '{config.name}': worker processes are not running")
            try:
                return await loop.run_in_executor(self.processes, _worker_predict, config.name, inputs)
            except BrokenProcessPool:
                log.error("a worker process died; starting a new pool")
                self.processes = self._new_process_pool()
                raise ModelNotReady(f"model '{config.name}': its worker process died; retry") from None
        if inspect.iscoroutinefunction(model.predict):
            return await model.predict(inputs)
        cost = self.costs.get(config.name)
        if cost is None:
            cost = self.costs[config.name] = Cost()
        if cost.seconds < INLINE_BELOW:
            return _timed(model.predict, cost, inputs)
        return await loop.run_in_executor(self.threads, _timed, model.predict, cost, inputs)

    def close(self) -> None:
        self.threads.shutdown(wait=False, cancel_futures=True)
        if self.processes is not None:
            self.processes.shutdown(wait=True, cancel_futures=True)
