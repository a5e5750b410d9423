"""A multi-layer perceptron classifier in numpy.

Parameters::

    "weights": "weights.npz"   a file in the model's folder holding
                               mean, scale (input standardisation), and w0, b0, w1, b1, ...
                               (ReLU between layers, softmax at the end)
    "random_features": {"seed": 0, "widths": [2048, 2048]}
                               optional: fixed random ReLU layers before the stored ones, generated
                               at load from the seed (so the repository holds only the trained readout)

The config declares one FP32 input [-1, F] and two outputs: the class
probabilities, FP32 [-1, C], and the most likely class, INT64 [-1].
"""

from __future__ import annotations

import numpy as np

from inferencehub.errors import ConfigError
from inferencehub.inference.runtimes import params
from inferencehub.model import Model, ModelConfig


def random_layers(features: int, seed: int, widths: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Fixed random ReLU layers (He-scaled normal weights), the same for a seed on every machine."""
    rng = np.random.default_rng(seed)
    layers = []
    for width in widths:
        w = rng.standard_normal((features, width), dtype=np.float32) * np.float32(np.sqrt(2.0 / features))
        b = rng.standard_normal(width, dtype=np.float32) * np.float32(0.1)
        layers.append((w, b))
        features = width
    return layers


def _random_features(config: ModelConfig) -> tuple[int, list[int]] | None:
    raw = config.parameters.get("random_features")
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) != {"seed", "widths"}:
        raise params.error(config, "random_features", 'expected {"seed": 0, "widths": [2048, ...]}')
    seed, widths = raw["seed"], raw["widths"]
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise params.error(config, "random_features.seed", "expected a non-negative integer")
    if not isinstance(widths, list) or not widths or not all(isinstance(w, int) and 0 < w <= 16384 for w in widths):
        raise params.error(config, "random_features.widths", "expected a non-empty list of widths from 1 to 16384")
    return seed, widths


def resolve(config: ModelConfig) -> type[Model]:
    unknown = sorted(set(config.parameters) - {"weights", "random_features"})
    if unknown:
        raise params.error(config, unknown[0], "unknown parameter (expected weights, random_features)")
    _random_features(config)
    weights = config.parameters.get("weights", "weights.npz")
    if not isinstance(weights, str) or not (config.directory / weights).is_file():
        raise params.error(config, "weights", f"no weights file {weights!r} in {config.directory}")
    if len(config.inputs) != 1 or config.inputs[0].datatype != "FP32" or len(config.inputs[0].shape) != 2:
        raise ConfigError(f"{config.source}: inputs: expected one FP32 input of shape [-1, features]")
    kinds = sorted((o.datatype, len(o.shape)) for o in config.outputs)
    if kinds != [("FP32", 2), ("INT64", 1)]:
        raise ConfigError(f"{config.source}: outputs: expected probabilities FP32 [-1, classes] and label INT64 [-1]")
    return MLPClassifier


class MLPClassifier(Model):
    def load(self) -> None:
        path = self.config.directory / self.config.parameters.get("weights", "weights.npz")
        with np.load(path) as data:
            self.mean = data["mean"].astype(np.float32)
            self.scale = data["scale"].astype(np.float32)
            self.layers: list[tuple[np.ndarray, np.ndarray]] = []
            while f"w{len(self.layers)}" in data:
                i = len(self.layers)
                self.layers.append((data[f"w{i}"].astype(np.float32), data[f"b{i}"].astype(np.float32)))
        self.probabilities = next(o.name for o in self.config.outputs if o.datatype == "FP32")
        self.label = next(o.name for o in self.config.outputs if o.datatype == "INT64")
        features = self.config.inputs[0].shape[1]
        classes = next(o.shape[1] for o in self.config.outputs if o.datatype == "FP32")
        random = _random_features(self.config)
        self.random = random_layers(features, *random) if random else []
        stored_inputs = self.random[-1][0].shape[1] if self.random else features
        if not self.layers or self.layers[0][0].shape[0] != stored_inputs or self.layers[-1][0].shape[1] != classes:
            raise ConfigError(
                f"{self.config.source}: parameters.weights: layers do not map {features} features to {classes} classes"
            )

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = (inputs[self.config.inputs[0].name] - self.mean) / self.scale
        for w, b in self.random:
            x = np.maximum(x @ w + b, 0.0)
        for i, (w, b) in enumerate(self.layers):
            x = x @ w + b
            if i < len(self.layers) - 1:
                np.maximum(x, 0.0, out=x)
        x = x - x.max(axis=1, keepdims=True)
        np.exp(x, out=x)
        x /= x.sum(axis=1, keepdims=True)
        return {self.probabilities: x, self.label: x.argmax(axis=1).astype(np.int64)}
