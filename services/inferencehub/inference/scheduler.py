"""Per-model scheduling: admission control, dynamic batching, and dropping work nobody waits for.

Each model has one dispatcher task and a bounded queue. Requests beyond the queue (and the free
execution slots) are refused at once with RESOURCE_EXHAUSTED, so overload costs the caller
microseconds instead of a timeout, and memory stays bounded. The dispatcher waits for a free slot,
takes the oldest live request and, for a batching model, every compatible request that fits
(same datatypes and same sizes beyond the first dimension), waiting up to ``max_queue_delay_ms``
for more, unless the largest preferred batch size is reached or nothing else for the model is
queued or running. The batch is stacked along the first dimension, run once, and split so each
caller gets exactly its own rows. A request whose deadline has passed, or whose caller has gone,
is dropped before it is computed, and counted. A request for an idle model (nothing queued, running or
gathering company) starts at once from its caller, as the dispatcher would start it, without the hop through
the dispatcher's task.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from inferencehub.errors import DeadlineExpired, ModelError, ModelNotReady, Overloaded
from inferencehub.inference.metrics import InferenceMetrics
from inferencehub.inference.statistics import ModelStats, Timing
from inferencehub.model import ModelConfig
from inferencehub.oip.signature import check_rows

Arrays = dict[str, np.ndarray]


@dataclass(eq=False)
class Pending:
    inputs: Arrays
    rows: int
    key: tuple
    deadline: float | None  # event-loop time
    enqueued: float
    future: asyncio.Future = field(repr=False)
    timing: Timing | None = field(default=None, repr=False)
    stream: bool = False  # a decoupled model's request: takes a slot for its whole generation, never batched


class ModelScheduler:
    def __init__(
        self,
        config: ModelConfig,
        run: Callable[[Arrays], Awaitable[Arrays]],
        concurrency: int,
        metrics: InferenceMetrics,
        stats: ModelStats | None = None,
    ) -> None:
        self.config = config
        self.stats = stats
        self.run = run
        self.concurrency = concurrency
        self.batching = config.batching
        self.max_queue = config.scheduling.max_queue_size
        self.queue: collections.deque[Pending] = collections.deque()
        self.busy = 0
        self.on_busy: Callable[[int], None] | None = None  # told +1 / -1 as slots fill and free (load reports)
        self.slots = asyncio.Semaphore(concurrency)
        self.arrived = asyncio.Event()
        self.waiting_for_work = False  # the dispatcher holds a slot and waits for a request, nothing in hand
        self.running: set[asyncio.Task] = set()
        self.dispatcher = asyncio.create_task(self._dispatch(), name=f"dispatch {config.name}")
        name = config.name
        self.m_depth = metrics.queue_depth.labels(name)
        self.m_queue_time = metrics.queue_duration.labels(name)
        self.m_batch = metrics.batch_size.labels(name)
        self.m_rejected = metrics.rejected.labels(name)
        self.m_calls = metrics.model_calls.labels(name)
        self.m_expired = {reason: metrics.expired.labels(name, reason) for reason in ("deadline", "cancelled")}

    async def submit(self, inputs: Arrays, deadline: float | None, timing: Timing | None = None) -> Arrays:
        """Queue one request and wait for its outputs (its own rows of the batch it ran in).

        ``timing``, when given, is stamped on the way (statistics and trace spans).
        """
        loop = asyncio.get_running_loop()
        rows = 0
        key: tuple[tuple[str, str, tuple[int, ...]], ...] = ()
        if self.batching:
            first = next(iter(inputs.values()))
            rows = first.shape[0]
            check_rows(self.config.name, rows, self.batching.max_batch_size)
            key = tuple((name, a.dtype.str, a.shape[1:]) for name, a in sorted(inputs.items()))
        free = self.concurrency - self.busy
        if len(self.queue) >= self.max_queue + max(free, 0):
            self.m_rejected.inc()
            raise Overloaded(
                f"model '{self.config.name}' is overloaded: {len(self.queue)} requests waiting "
                f"(max_queue_size {self.max_queue}); retry later"
            )
        pending = Pending(inputs, rows, key, deadline, loop.time(), loop.create_future(), timing)
        if timing is not None:
            timing.enqueued = time.perf_counter_ns()
        if self.waiting_for_work and not self.queue and self.busy == 0 and not self.slots.locked():
            # Nothing queued, running or gathering: the dispatcher would take this request alone, at once. It
            # starts here instead, sparing the hop through the dispatcher's task (same slot, same checks).
            await self.slots.acquire()  # a free slot: returns at once
            if self._alive(pending):
                self._start([pending])
            else:
                self.slots.release()
            return await pending.future
        self.queue.append(pending)
        self.m_depth.set(len(self.queue))
        self.arrived.set()
        return await pending.future  # a caller that goes away cancels this future; the dispatcher skips it

    async def hold(self, deadline: float | None, timing: Timing | None = None) -> Callable[[], None]:
        """Wait in the queue like any request, then hold one execution slot until the returned release is called.

        A decoupled model's generation holds its slot while it streams, so open streams count against
        ``max_concurrency`` and the queue (admission control) and as busy slots (the load report).
        """
        free = self.concurrency - self.busy
        if len(self.queue) >= self.max_queue + max(free, 0):
            self.m_rejected.inc()
            raise Overloaded(
                f"model '{self.config.name}' is overloaded: {self.busy} generations running, {len(self.queue)} "
                f"requests waiting (max_queue_size {self.max_queue}); retry later"
            )
        loop = asyncio.get_running_loop()
        pending = Pending({}, 0, (object(),), deadline, loop.time(), loop.create_future(), timing, stream=True)
        if timing is not None:
            timing.enqueued = time.perf_counter_ns()
        self.queue.append(pending)
        self.m_depth.set(len(self.queue))
        self.arrived.set()
        try:
            return await pending.future
        except asyncio.CancelledError:
            # The slot may have been handed over just as the caller left: give it back.
            if pending.future.done() and not pending.future.cancelled() and pending.future.exception() is None:
                pending.future.result()()
            raise

    def _lease(self, pending: Pending) -> None:
        """Hand a held slot to a waiting stream (or take it back at once if the stream left meanwhile)."""
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.busy -= 1
                if self.on_busy is not None:
                    self.on_busy(-1)
                self.slots.release()

        if pending.timing is not None:
            pending.timing.dispatched = pending.timing.started = time.perf_counter_ns()
            pending.timing.batch_size = 1
        if pending.future.done():
            release()
        else:
            pending.future.set_result(release)

    async def drained(self, timeout: float) -> bool:
        """Wait (up to ``timeout`` seconds) until nothing is queued or running; False if time ran out."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while self.queue or self.busy:
            if loop.time() >= end:
                return False
            await asyncio.sleep(0.005)
        return True

    async def close(self) -> None:
        self.dispatcher.cancel()
        for task in list(self.running):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.dispatcher
        while self.queue:
            pending = self.queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(ModelNotReady(f"model '{self.config.name}' is shutting down"))
        self.m_depth.set(0)

    # --- the dispatcher --------------------------------------------------------------------

    async def _dispatch(self) -> None:
        while True:
            await self.slots.acquire()
            try:
                batch = await self._next_batch()
            except BaseException:
                self.slots.release()
                raise
            if batch[0].stream:
                self._take_slot()
                self._lease(batch[0])
                continue
            self._start(batch)

    def _take_slot(self) -> None:
        self.busy += 1
        if self.on_busy is not None:
            self.on_busy(1)

    def _start(self, batch: list[Pending]) -> None:
        """Run ``batch`` on the slot just acquired for it."""
        self._take_slot()
        task = asyncio.create_task(self._execute(batch))
        self.running.add(task)
        task.add_done_callback(self.running.discard)

    async def _next_batch(self) -> list[Pending]:
        first = await self._pop_live()
        batch = [first]
        if not self.batching or first.stream:
            return batch
        rows = first.rows
        limit = self.batching.max_batch_size
        target = self.batching.preferred_batch_sizes[-1] if self.batching.preferred_batch_sizes else limit
        dispatch_at = first.enqueued + self.batching.max_queue_delay_ms / 1000
        loop = asyncio.get_running_loop()
        while True:
            rows = self._take_compatible(batch, rows, limit)
            remaining = dispatch_at - loop.time()
            # Waiting for company only pays when other work for this model is under way: a lone
            # caller (say, concurrency 1) is dispatched at once instead of paying the delay.
            if rows >= target or remaining <= 0 or (self.busy == 0 and not self.queue):
                return batch
            self.arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), remaining)

    async def _pop_live(self) -> Pending:
        while True:
            while not self.queue:
                self.arrived.clear()
                self.waiting_for_work = True
                try:
                    await self.arrived.wait()
                finally:
                    self.waiting_for_work = False
            pending = self.queue.popleft()
            self.m_depth.set(len(self.queue))
            if self._alive(pending):
                return pending

    def _take_compatible(self, batch: list[Pending], rows: int, limit: int) -> int:
        key = batch[0].key
        kept: collections.deque[Pending] = collections.deque()
        for pending in self.queue:
            if pending.key != key or rows + pending.rows > limit:
                kept.append(pending)
            elif self._alive(pending):
                batch.append(pending)
                rows += pending.rows
        self.queue = kept
        self.m_depth.set(len(kept))
        return rows

    def _alive(self, pending: Pending) -> bool:
        """False (and counted) for a request whose caller left or whose deadline passed."""
        now = asyncio.get_running_loop().time()
        expired = pending.deadline is not None and now >= pending.deadline
        if pending.future.done():
            self.m_expired["deadline" if expired else "cancelled"].inc()
            return False
        if expired:
            pending.future.set_exception(DeadlineExpired(f"model '{self.config.name}': deadline passed in the queue"))
            self.m_expired["deadline"].inc()
            return False
        self.m_queue_time.observe(now - pending.enqueued)
        if pending.timing is not None:
            pending.timing.taken = time.perf_counter_ns()
        return True

    async def _execute(self, batch: list[Pending]) -> None:
        stacking = time.perf_counter_ns()
        try:
            if len(batch) == 1:
                inputs = batch[0].inputs
            else:
                inputs = {name: np.concatenate([p.inputs[name] for p in batch]) for name in batch[0].inputs}
            self.m_batch.observe(len(batch))
            self.m_calls.inc()
            started = time.perf_counter_ns()
            results = await self.run(inputs)
            finished = time.perf_counter_ns()
            parts = [results] if len(batch) == 1 else self._split(results, [p.rows for p in batch])
            self._stamp(batch, stacking, started, finished)
            for pending, part in zip(batch, parts, strict=True):
                if not pending.future.done():
                    pending.future.set_result(part)
        except asyncio.CancelledError:
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(ModelNotReady(f"model '{self.config.name}' is shutting down"))
            raise
        except Exception as exc:
            if len(batch) > 1:
                # One member's rows may have failed the whole call: each gets the outcome it would have had alone.
                await self._each_alone(batch)
                return
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
        finally:
            self.busy -= 1
            if self.on_busy is not None:
                self.on_busy(-1)
            self.slots.release()

    def _stamp(self, batch: list[Pending], stacking: int, started: int, finished: int) -> None:
        for pending in batch:
            timing = pending.timing
            if timing is not None:
                timing.dispatched, timing.started, timing.finished = stacking, started, finished
                timing.batch_size = len(batch)
        if self.stats is not None:
            inferences = sum(p.rows for p in batch) if self.batching else len(batch)
            self.stats.executed(len(batch), inferences, stacking, started, finished, time.perf_counter_ns())

    async def _each_alone(self, batch: list[Pending]) -> None:
        for pending in batch:
            if pending.future.done():
                continue
            self.m_calls.inc()
            started = time.perf_counter_ns()
            try:
                result = await self.run(pending.inputs)
                self._stamp([pending], started, started, time.perf_counter_ns())
            except asyncio.CancelledError:
                for waiting in batch:
                    if not waiting.future.done():
                        waiting.future.set_exception(ModelNotReady(f"model '{self.config.name}' is shutting down"))
                raise
            except Exception as exc:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            else:
                if not pending.future.done():
                    pending.future.set_result(result)

    def _split(self, results: Arrays, rows: list[int]) -> list[Arrays]:
        total = sum(rows)
        if not isinstance(results, dict):
            raise ModelError(f"model '{self.config.name}' returned {type(results).__name__}, not a dict of outputs")
        arrays = {name: np.asarray(value) for name, value in results.items()}
        for name, array in arrays.items():
            if array.ndim == 0 or array.shape[0] != total:
                raise ModelError(
                    f"model '{self.config.name}' returned {list(array.shape)} for output '{name}' "
                    f"from a batch of {total} rows"
                )
        bounds = np.cumsum([0, *rows])
        return [{name: a[start:end] for name, a in arrays.items()} for start, end in itertools.pairwise(bounds)]
