"""The transport-free data plane: the served models, their state and their calls.

Requests reach it through ``inference/pipeline.py`` (checked and decoded by ``oip.codec`` against each model's
``Signature``); the engine queues them on the model's scheduler and checks what the model returns.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from inferencehub.errors import ModelError, ModelLoadFailed, ModelNotFound, ModelNotReady
from inferencehub.inference.metrics import InferenceMetrics
from inferencehub.inference.scheduler import ModelScheduler
from inferencehub.inference.statistics import ModelStats, Timing
from inferencehub.inference.workers import Workers
from inferencehub.model import Model, ModelConfig, TensorSpec
from inferencehub.oip.signature import Signature, shape_matches
from inferencehub.tensors import DATATYPES

log = logging.getLogger(__name__)


class State(enum.Enum):
    LOADING = "loading"
    SERVING = "serving"
    DRAINING = "draining"


@dataclass
class ServedModel:
    config: ModelConfig
    model: Model | None = None  # None for process models (loaded in the workers)
    scheduler: ModelScheduler | None = None
    ready: bool = False
    stats: ModelStats | None = None  # Triton's statistics extension; set by the engine
    retired: bool = False  # replaced or unloaded: takes no new call, finishes those it holds
    signature: Signature = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.signature = Signature.of_config(self.config)  # the request checks, built once per instance


ASYNC_CONCURRENCY = 256  # default for models whose predict is a coroutine (they wait without a pool)


# A model's state in the repository index (Triton's words).
READY, LOADING, UNLOADING, UNAVAILABLE = "READY", "LOADING", "UNLOADING", "UNAVAILABLE"

Listener = Callable[[str, "ServedModel | None"], Awaitable[None]]


class Engine:
    """The models being served, loaded and unloaded at start and at run time.

    ``models`` holds only models that take traffic. Loading a model (or a new instance of a loaded one) builds
    it fully first, then swaps it in with one dict assignment: calls already queued or running on the old
    instance finish there (for up to ``drain_seconds``), new calls go to the new one. Unloading takes the model
    out of ``models`` at once (new calls get NOT_FOUND naming it), lets the old instance finish its calls, then
    closes its scheduler and drops every reference to the model, so its memory can be freed. Loads and unloads
    of one model are serialised; other models are never touched.

    A model may serve several versions at once (its version folders, per its ``version_policy``): ``versions``
    holds each, ``models`` the default one (the highest), which calls that name no version get. The versions of a
    model are loaded, replaced and unloaded together.
    """

    def __init__(self, workers: Workers, metrics: InferenceMetrics, drain_seconds: float = 10.0) -> None:
        self.models: dict[str, ServedModel] = {}  # name -> its default version's instance
        self.versions: dict[str, dict[str, ServedModel]] = {}  # name -> version -> instance
        self.states: dict[str, tuple[str, str]] = {}  # models not READY: name -> (state, reason)
        self.workers = workers
        self.metrics = metrics
        self.drain_seconds = drain_seconds
        self.state = State.LOADING
        self.listener: Listener | None = None  # told of each model that starts or stops taking traffic
        self._locks: dict[str, asyncio.Lock] = {}

    @property
    def ready(self) -> bool:
        return self.state is State.SERVING

    async def load(self, configs: list[ModelConfig]) -> None:
        """Start-up: load every model given (process models in every worker). Errors propagate: start-up fails."""
        self.states.update({c.name: (LOADING, "") for c in configs})
        await self.workers.start([c for c in configs if c.execution == "process"])
        for config in configs:
            served = await self._build(config)
            self.versions.setdefault(config.name, {})[config.version] = served
            self.models[config.name] = served  # the configs of a model's versions come in ascending order
            self.states.pop(config.name, None)
        for name, served in self.models.items():
            await self._tell(name, served)
        self.state = State.SERVING

    async def _build(self, config: ModelConfig) -> ServedModel:
        served = ServedModel(config, stats=ModelStats(config.name, config.version))
        served.model = await self.workers.load(config)
        served.scheduler = ModelScheduler(
            config, self._runner(served), self._concurrency(served), self.metrics, served.stats
        )
        served.ready = True
        log.info("model %s (version %s, %s) loaded", config.name, config.version, config.runtime)
        return served

    def _lock(self, name: str) -> asyncio.Lock:
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        return lock

    def _process_configs(self, name: str, configs: list[ModelConfig]) -> list[ModelConfig]:
        """The process models to serve once ``name``'s versions are ``configs`` (empty: unloaded)."""
        kept = [
            s.config
            for n, versions in self.versions.items()
            if n != name
            for s in versions.values()
            if s.config.execution == "process"
        ]
        return kept + [c for c in configs if c.execution == "process"]

    async def load_model(self, configs: ModelConfig | list[ModelConfig]) -> None:
        """Load a model (all its versions to serve, ascending) at run time, or replace the loaded instances of it:
        the new ones are ready first, then swapped in together."""
        configs = [configs] if isinstance(configs, ModelConfig) else list(configs)
        name = configs[0].name
        async with self._lock(name):
            old = self.versions.get(name, {})
            if not old:
                self.states[name] = (LOADING, "")
            built: dict[str, ServedModel] = {}
            try:
                if any(c.execution == "process" for c in configs) or any(
                    s.config.execution == "process" for s in old.values()
                ):
                    await self.workers.set_process_configs(self._process_configs(name, configs))
                for config in configs:
                    built[config.version] = await self._build(config)
            except Exception as exc:
                for served in built.values():
                    if served.scheduler is not None:
                        await served.scheduler.close()
                reason = f"failed to load: {exc}"
                if not old:
                    self.states[name] = (UNAVAILABLE, reason)
                log.error("model %s %s", name, reason)
                raise ModelLoadFailed(f"model '{name}' {reason}") from None
            self.versions[name] = built  # the swap: new calls go to the new instances from here
            self.models[name] = built[configs[-1].version]
            self.states.pop(name, None)
            await self._tell(name, self.models[name])
            for served in old.values():
                await self._retire(served)
            if old:
                log.info("model %s replaced (versions %s -> %s)", name, ", ".join(old), ", ".join(built))

    async def unload_model(self, name: str) -> bool:
        """Unload a model (False if it was not loaded): no new calls, in-flight ones finish, memory is freed."""
        async with self._lock(name):
            old = self.versions.pop(name, {})
            if self.models.pop(name, None) is None:
                return False
            self.states[name] = (UNLOADING, "")
            await self._tell(name, None)
            for served in old.values():
                await self._retire(served)
            if any(s.config.execution == "process" for s in old.values()):
                await self.workers.set_process_configs(self._process_configs(name, []))
            self.states[name] = (UNAVAILABLE, "unloaded")
            log.info("model %s unloaded", name)
            return True

    async def _retire(self, old: ServedModel) -> None:
        old.retired, old.ready = True, False
        scheduler = old.scheduler
        if scheduler is not None:
            await scheduler.drained(self.drain_seconds)
            await scheduler.close()
        old.model, old.scheduler = None, None
        if self.models.get(old.config.name) is None:
            self.workers.forget(old.config.name)

    async def _tell(self, name: str, served: ServedModel | None) -> None:
        if self.listener is not None:
            await self.listener(name, served)

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
        for served in [s for versions in list(self.versions.values()) for s in versions.values()]:
            if served.scheduler is not None:
                await served.scheduler.close()

    def get(self, name: str, version: str = "") -> ServedModel:
        served = self.models.get(name)
        if served is None:
            state, reason = self.states.get(name, ("", ""))
            if state == LOADING:
                raise ModelNotReady(f"model '{name}' is loading; retry shortly")
            if state:
                raise ModelNotFound(f"model '{name}' is not loaded ({reason or state.lower()})")
            raise ModelNotFound(f"model '{name}' not found (served: {', '.join(sorted(self.models))})")
        if version and version != served.config.version:
            other = self.versions.get(name, {}).get(version)
            if other is None:
                known = ", ".join(self.versions.get(name, {})) or served.config.version
                raise ModelNotFound(f"model '{name}' has no version '{version}' (served: {known})")
            return other
        return served

    def statistics(self, name: str = "", version: str = "") -> list[ModelStats]:
        """The statistics of the model and version named (each empty: all of them)."""
        names = [self.get(name, version).config.name] if name else list(self.versions)
        served = [s for n in names for s in self.versions.get(n, {}).values()]
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
        if served.retired:
            served = self._successor(served)
        if not served.ready or served.scheduler is None or self.state is State.LOADING:
            raise ModelNotReady(f"model '{served.config.name}' is not ready")
        results = await served.scheduler.submit(inputs, deadline, timing)
        return [self._checked_output(served.config, results, spec) for spec in outputs]

    def _successor(self, served: ServedModel) -> ServedModel:
        """The instance that replaced ``served`` (a call that looked it up before a swap); NOT_FOUND if unloaded."""
        name = served.config.name
        current = self.versions.get(name, {}).get(served.config.version) or self.models.get(name)
        if current is None:
            raise ModelNotFound(f"model '{name}' was unloaded")
        old, new = served.config, current.config
        if (old.inputs, old.outputs) != (new.inputs, new.outputs):
            raise ModelNotReady(f"model '{name}' was replaced (new tensors) while this request was decoded; retry")
        return current

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
