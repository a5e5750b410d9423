"""Runtimes: how a model config's ``runtime`` becomes a ``Model`` class.

- ``mock``: the mock inference engine (simulated latency, sleep or busy, error injection); decoupled, the
  generative mock (``mock_llm``: streams words);
- ``mlp``: a numpy multi-layer perceptron classifier whose weights ship with the model;
- ``python``: a user's own ``Model`` subclass, named by import path;
- ``onnx``: an ONNX file run by onnxruntime;
- ``sklearn``: a scikit-learn estimator saved with joblib.

``onnx`` and ``sklearn`` read their inputs and outputs from the model file (``describe``), so their configs
may leave them out. Their libraries (the ``runtimes`` extra) are imported only when a config names them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from inferencehub.errors import ConfigError
from inferencehub.inference.runtimes import mlp, mock, mock_llm, onnx, python, sklearn
from inferencehub.model import Model, ModelConfig


@dataclass(frozen=True)
class Runtime:
    platform: str
    resolve: Callable[[ModelConfig], type[Model]]  # validates the parameters, returns the class
    default_execution: Callable[[dict[str, Any]], str]
    # Reads the inputs and outputs from the model file: returns the config with them, the declared ones
    # checked against the model (None: the config must declare them).
    describe: Callable[[ModelConfig], ModelConfig] | None = None


def _mock(config: ModelConfig) -> type[Model]:
    """The echo mock, or with ``"decoupled": true`` the generative one."""
    return mock_llm.resolve(config) if config.decoupled else mock.resolve(config)


RUNTIMES: dict[str, Runtime] = {
    "mock": Runtime("inferencehub_mock", _mock, mock.default_execution),
    "mlp": Runtime("numpy_mlp", mlp.resolve, lambda _: "thread"),
    "python": Runtime("python", python.resolve, lambda _: "process"),
    "onnx": Runtime("onnxruntime_onnx", onnx.resolve, lambda _: "thread", onnx.describe),
    "sklearn": Runtime("sklearn", sklearn.resolve, lambda _: "thread", sklearn.describe),
}


def resolve(config: ModelConfig) -> type[Model]:
    """The model class for ``config``, its parameters validated; a decoupled model's checked to generate."""
    cls = RUNTIMES[config.runtime].resolve(config)
    if not config.decoupled:
        if cls.generate is not Model.generate and cls.predict is Model.predict:
            raise ConfigError(
                f"{config.source}: decoupled: model '{config.name}' implements generate (many responses per "
                'request): set "decoupled": true'
            )
        return cls
    if cls.generate is Model.generate:
        raise ConfigError(
            f"{config.source}: decoupled: model '{config.name}' is decoupled but {cls.__name__} has no generate "
            "(an async generator of responses)"
        )
    if config.execution == "process":
        raise ConfigError(
            f"{config.source}: execution: a decoupled model cannot run in worker processes (its generator is stepped "
            'in the replica): use "thread" (a plain generator, each step in the thread pool) or an async generate'
        )
    if config.batching is not None:
        raise ConfigError(f"{config.source}: batching: a decoupled model's requests are not batched; remove it")
    if not (inspect.isasyncgenfunction(cls.generate) or inspect.isgeneratorfunction(cls.generate)):
        raise ConfigError(
            f"{config.source}: decoupled: {cls.__name__}.generate must be a generator (async def ... yield, "
            "or def ... yield)"
        )
    return cls


def build(config: ModelConfig) -> Model:
    """A loaded model instance for ``config``."""
    model = resolve(config)(config)
    try:
        model.load()
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"{config.source}: model '{config.name}' failed to load: {exc!r}") from exc
    return model
