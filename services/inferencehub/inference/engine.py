"""The transport-free data plane: the served models, their state, validation and calls.

The gRPC servicer only converts protobuf to numpy and back and delegates here.
"""

from __future__ import annotations

import enum
import inspect
import logging
from dataclasses import dataclass

import numpy as np

from inferencehub.errors import InvalidInput, ModelError, ModelNotFound, ModelNotReady
from inferencehub.inference.metrics import InferenceMetrics
from inferencehub.inference.scheduler import ModelScheduler
from inferencehub.inference.statistics import ModelStats, Timing
from inferencehub.inference.workers import Workers
from inferencehub.model import Model, ModelConfig, TensorSpec
from inferencehub.tensors import DATATYPES

log = logging.getLogger(__name__)


class State(enum.Enum):
    LOADING = "loading"
    SERVING = "serving"
    DRAINING = "draining"


def shape_matches(shape: tuple[int, ...], spec: TensorSpec) -> bool:
    return len(shape) == len(spec.shape) and all(s == d or d == -1 for s, d in zip(shape, spec.shape, strict=True))


def describe(spec: TensorSpec) -> str:
    return f"{spec.datatype} {list(spec.shape)}"


@dataclass
class ServedModel:
    config: ModelConfig
    model: Model | None = None  # None for process models (loaded in the workers)
    scheduler: ModelScheduler | None = None
    ready: bool = False
    stats: ModelStats | None = None  # Triton's statistics extension; set by the engine

    def input_spec(self, name: str, datatype: str, shape: tuple[int, ...]) -> TensorSpec:
        """The config's spec for an input, after checking the request's datatype and shape against it."""
        spec = next((s for s in self.config.inputs if s.name == name), None)
        if spec is None:
            known = ", ".join(s.name for s in self.config.inputs)
            raise InvalidInput(f"model '{self.config.name}' has no input '{name}' (its inputs: {known})")
        if datatype != spec.datatype:
            raise InvalidInput(f"input '{name}': datatype {datatype}, expected {spec.datatype}")
        if not shape_matches(shape, spec):
            raise InvalidInput(f"input '{name}': shape {list(shape)}, expected {list(spec.shape)} (-1: any size)")
        return spec

    def check_complete(self, names: list[str]) -> None:
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise InvalidInput(f"input '{dup}' is given more than once")
        for spec in self.config.inputs:
            if spec.name not in names:
                raise InvalidInput(f"model '{self.config.name}': missing input '{spec.name}' ({describe(spec)})")

    def output_specs(self, requested: list[str]) -> list[TensorSpec]:
        """The outputs to return: those requested, in order, or all of them."""
        if not requested:
            return list(self.config.outputs)
        by_name = {s.name: s for s in self.config.outputs}
        specs = []
        for name in requested:
            if name not in by_name:
                known = ", ".join(by_name)
                raise InvalidInput(f"model '{self.config.name}' has no output '{name}' (its outputs: {known})")
            specs.append(by_name[name])
        return specs


ASYNC_CONCURRENCY = 256  # default for models whose predict is a coroutine (they wait without a pool)


class Engine:
    def __init__(self, configs: list[ModelConfig], workers: Workers, metrics: InferenceMetrics) -> None:
        self.models = {c.name: ServedModel(c, stats=ModelStats(c.name, c.version)) for c in configs}
        self.workers = workers
        self.metrics = metrics
        self.state = State.LOADING

    @property
    def ready(self) -> bool:
        return self.state is State.SERVING

    async def load(self) -> None:
        """Load every model (process models in every worker). Errors propagate: start-up fails."""
        await self.workers.start()
        for served in self.models.values():
            served.model = await self.workers.load(served.config)
            served.scheduler = ModelScheduler(
                served.config, self._runner(served), self._concurrency(served), self.metrics, served.stats
            )
            served.ready = True
            log.info(
                "model %s (version %s, %s) loaded", served.config.name, served.config.version, served.config.runtime
            )
        self.state = State.SERVING

    def _runner(self, served: ServedModel):
        async def run(inputs):
            return await self.workers.predict(served.config, served.model, inputs)

        return run

    def _concurrency(self, served: ServedModel) -> int:
        if served.config.scheduling.max_concurrency is not None:
            return served.config.scheduling.max_concurrency
        if served.model is not None and inspect.iscoroutinefunction(served.model.predict):
            return ASYNC_CONCURRENCY
        return self.workers.process_count if served.config.execution == "process" else self.workers.thread_count

    async def close(self) -> None:
        for served in self.models.values():
            if served.scheduler is not None:
                await served.scheduler.close()

    def get(self, name: str, version: str = "") -> ServedModel:
        served = self.models.get(name)
        if served is None:
            raise ModelNotFound(f"model '{name}' not found (served: {', '.join(sorted(self.models))})")
        if version and version != served.config.version:
            raise ModelNotFound(f"model '{name}' has no version '{version}' (served: {served.config.version})")
        return served

    def statistics(self, name: str = "", version: str = "") -> list[ModelStats]:
        """The statistics of the model and version named (each empty: all of them)."""
        served = [self.get(name, version)] if name else list(self.models.values())
        return [s.stats for s in served if s.stats is not None and version in ("", s.config.version)]

    async def infer(
        self,
        served: ServedModel,
        inputs: dict[str, np.ndarray],
        outputs: list[TensorSpec],
        deadline: float | None,
        timing: Timing | None = None,
    ) -> list[np.ndarray]:
        """Run the model on validated inputs (queued, maybe batched); return the requested outputs, checked.

        ``deadline`` is in event-loop time: queued work still waiting then is dropped, not computed.
        """
        if not served.ready or served.scheduler is None or self.state is State.LOADING:
            raise ModelNotReady(f"model '{served.config.name}' is not ready")
        results = await served.scheduler.submit(inputs, deadline, timing)
        return [self._checked_output(served.config, results, spec) for spec in outputs]

    @staticmethod
    def _checked_output(config: ModelConfig, results: dict, spec: TensorSpec) -> np.ndarray:
        if not isinstance(results, dict) or spec.name not in results:
            raise ModelError(f"model '{config.name}' did not return output '{spec.name}'")
        array = np.asarray(results[spec.name])
        dtype = DATATYPES[spec.datatype].dtype
        if spec.datatype == "BYTES":
            if array.dtype.kind not in "OSU":
                raise ModelError(f"model '{config.name}' returned {array.dtype} for BYTES output '{spec.name}'")
            array = array.astype(object)
        elif array.dtype != dtype:
            if not np.can_cast(array.dtype, dtype, casting="same_kind"):
                raise ModelError(
                    f"model '{config.name}' returned {array.dtype} for {spec.datatype} output '{spec.name}'"
                )
            array = array.astype(dtype)
        if not shape_matches(array.shape, spec):
            raise ModelError(
                f"model '{config.name}' returned shape {list(array.shape)} for output '{spec.name}', "
                f"expected {list(spec.shape)}"
            )
        return array
