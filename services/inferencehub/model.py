"""The model API: what a model served by InferenceHub implements.

A model is a class with ``load()`` and ``predict()``::

    import numpy as np
    from inferencehub.model import Model

    class Reverse(Model):
        def load(self) -> None:
            self.scale = float(self.config.parameters.get("scale", 1.0))

        def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {"reversed": inputs["text"][..., ::-1] * self.scale}

It is referenced from a model config by import path (``"runtime": "python"``,
``"parameters": {"class": "reverse:Reverse"}``): a module in the model's folder, which is a
package of its own, so the module imports its neighbours relatively (``from . import helpers``).
``predict`` receives every declared input as a numpy array, already checked against the
config's datatype and shape, and returns a dict holding at least the outputs the caller
asked for. BYTES tensors are object arrays of ``bytes``.

Where ``predict`` runs is set by the config's ``execution``:
- ``"process"`` (the default for ``python`` models): in worker processes, so
  CPU-bound Python never holds the server's GIL; the model is loaded in each worker;
- ``"thread"``: in a thread pool, right for numpy code that releases the GIL;
- an ``async def predict`` runs on the event loop and must never block it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1 marks a variable dimension


@dataclass(frozen=True)
class Batching:
    """Dynamic batching: requests that arrive together are stacked along the first dimension."""

    max_batch_size: int  # rows in one model call
    max_queue_delay_ms: float = 0.0  # how long the first request waits for others
    preferred_batch_sizes: tuple[int, ...] = ()  # dispatch at once on reaching the largest


@dataclass(frozen=True)
class Scheduling:
    """Admission control: calls running at once, and requests allowed to wait; beyond, RESOURCE_EXHAUSTED."""

    max_concurrency: int | None = None  # None: the size of the pool the model runs in
    max_queue_size: int = 256


@dataclass(frozen=True)
class VersionPolicy:
    """Which of a model's version folders (``1/``, ``2/``...) are served: Triton's ``version_policy``."""

    kind: str = "latest"  # latest, all or specific
    num_versions: int = 1  # latest: how many of the highest
    versions: tuple[str, ...] = ()  # specific: which

    def select(self, available: list[str]) -> list[str]:
        ordered = sorted(available, key=int)
        if self.kind == "all":
            return ordered
        if self.kind == "specific":
            return [v for v in ordered if v in self.versions]
        return ordered[-self.num_versions :]


@dataclass(frozen=True)
class ModelConfig:
    name: str
    version: str
    runtime: str
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    parameters: dict[str, Any] = field(default_factory=dict)
    execution: str = "thread"  # "thread" or "process"
    directory: Path = Path(".")  # the model's folder, for files it loads
    source: Path = Path("config.json")  # the config file, for error messages
    batching: Batching | None = None
    scheduling: Scheduling = field(default_factory=Scheduling)
    version_policy: VersionPolicy = field(default_factory=VersionPolicy)


class Model:
    """Base class for models. Subclasses override ``load`` and ``predict``."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config

    def load(self) -> None:
        """Load weights or other state. Called once per process before any predict."""

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError
