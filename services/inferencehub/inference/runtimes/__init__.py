"""Runtimes: how a model config's ``runtime`` becomes a ``Model`` class.

- ``mock``: the mock inference engine (simulated latency, sleep or busy, error injection);
- ``mlp``: a numpy multi-layer perceptron classifier whose weights ship with the model;
- ``python``: a user's own ``Model`` subclass, named by import path;
- ``onnx``: an ONNX file run by onnxruntime;
- ``sklearn``: a scikit-learn estimator saved with joblib.

``onnx`` and ``sklearn`` read their inputs and outputs from the model file (``describe``), so their configs
may leave them out. Their libraries (the ``runtimes`` extra) are imported only when a config names them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from inferencehub.errors import ConfigError
from inferencehub.inference.runtimes import mlp, mock, onnx, python, sklearn
from inferencehub.model import Model, ModelConfig


@dataclass(frozen=True)
class Runtime:
    platform: str
    resolve: Callable[[ModelConfig], type[Model]]  # validates the parameters, returns the class
    default_execution: Callable[[dict[str, Any]], str]
    # Reads the inputs and outputs from the model file: returns the config with them, the declared ones
    # checked against the model (None: the config must declare them).
    describe: Callable[[ModelConfig], ModelConfig] | None = None


RUNTIMES: dict[str, Runtime] = {
    "mock": Runtime("inferencehub_mock", mock.resolve, mock.default_execution),
    "mlp": Runtime("numpy_mlp", mlp.resolve, lambda _: "thread"),
    "python": Runtime("python", python.resolve, lambda _: "process"),
    "onnx": Runtime("onnxruntime_onnx", onnx.resolve, lambda _: "thread", onnx.describe),
    "sklearn": Runtime("sklearn", sklearn.resolve, lambda _: "thread", sklearn.describe),
}


def build(config: ModelConfig) -> Model:
    """A loaded model instance for ``config``."""
    model = RUNTIMES[config.runtime].resolve(config)(config)
    try:
        model.load()
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"{config.source}: model '{config.name}' failed to load: {exc!r}") from exc
    return model
