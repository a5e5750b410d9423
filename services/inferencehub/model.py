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

A generative (decoupled) model answers one request with a sequence of responses: its config says
``"decoupled": true`` and it implements ``generate`` instead of ``predict``, an async generator that
yields each response's outputs (a dict, or a ``Response`` to add response parameters or mark the last
one ``final``)::

    class Countdown(Model):
        async def generate(self, inputs):
            n = int(inputs["start"][0])
            for i in range(n, 0, -1):
                await asyncio.sleep(0.01)  # never block the loop: await, or compute in small steps
                yield Response({"count": np.array([i], dtype=np.int32)}, final=i == 1)

Clients call it with ``ModelStreamInfer`` (Triton's decoupled semantics) or the gateway's ``/generate``
and ``/generate_stream``; unary ``ModelInfer`` refuses it. The generator advances only as fast as the
caller reads: each ``yield`` returns once its response is handed to the transport. When the caller goes
away, or the call's deadline passes, the generator is closed at its current ``await`` or ``yield``
(``GeneratorExit``/``CancelledError``: ``try/finally`` runs, nothing more is computed). An exception
ends the request with an error response naming it; the stream stays open for other requests.
A ``generate`` that ends without a ``final`` response gets an empty final response from the replica.

``generate`` runs on the event loop when it is an ``async def`` (``execution`` does not matter). A plain
generator function (``def generate(...): ... yield``) is allowed with ``"execution": "thread"``: each
step (up to its next ``yield``) runs in the thread pool, so it may block. ``"execution": "process"``
is refused at load time for decoupled models (a generator cannot be stepped across processes).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1 marks a variable dimension
    optional: bool = False  # an input the request may leave out (Triton's ``optional``)


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
    decoupled: bool = False  # generative: many responses per request (Triton's model_transaction_policy)


@dataclass
class Response:
    """One response of a generative model: its outputs, response parameters, and whether it is the last."""

    outputs: dict[str, np.ndarray]
    parameters: dict[str, bool | int | str] = field(default_factory=dict)
    final: bool = False


class Model:
    """Base class for models. Subclasses override ``load`` and ``predict`` (or ``generate``, when decoupled)."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config

    def load(self) -> None:
        """Load weights or other state. Called once per process before any predict."""

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def generate(
        self, inputs: dict[str, np.ndarray]
    ) -> AsyncIterator[dict[str, np.ndarray] | Response] | Iterator[dict[str, np.ndarray] | Response]:
        """A decoupled model's responses to one request (see the module's docstring)."""
        raise NotImplementedError
