"""The mock inference engine: echoes its inputs after a simulated latency.

Parameters (all optional)::

    "mode": "sleep" | "busy"      sleep costs no CPU; busy burns a CPU core for the latency
    "latency": {"distribution": "fixed", "ms": 20}
               {"distribution": "uniform", "min_ms": 10, "max_ms": 30}
               {"distribution": "normal", "mean_ms": 20, "stddev_ms": 5}
               {"distribution": "lognormal", "median_ms": 20, "sigma": 0.5}
    "error_rate": 0.0             share of calls that fail on purpose (INTERNAL), for drills
    "seed": 0                     seed of the latency and error draws

Output i echoes input i, so the config lists as many outputs as inputs, with the
same datatypes. With ``"decoupled": true`` the mock is generative instead: see ``mock_llm``.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from inferencehub.errors import ModelError
from inferencehub.inference.runtimes import params
from inferencehub.model import Model, ModelConfig

DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "fixed": ("ms",),
    "uniform": ("min_ms", "max_ms"),
    "normal": ("mean_ms", "stddev_ms"),
    "lognormal": ("median_ms", "sigma"),
}
MODES = ("sleep", "busy")


@dataclass(frozen=True)
class Latency:
    distribution: str
    args: tuple[float, ...]

    def sample(self, rng: random.Random) -> float:
        """One latency draw, in seconds."""
        a = self.args
        if self.distribution == "fixed":
            ms = a[0]
        elif self.distribution == "uniform":
            ms = rng.uniform(a[0], a[1])
        elif self.distribution == "normal":
            ms = rng.gauss(a[0], a[1])
        else:
            ms = a[0] * math.exp(a[1] * rng.gauss(0.0, 1.0))
        return max(0.0, ms) / 1000.0


def parse_latency(config: ModelConfig, key: str = "latency") -> Latency:
    raw = config.parameters.get(key, {"distribution": "fixed", "ms": 0})
    if not isinstance(raw, dict):
        raise params.error(config, key, 'expected an object such as {"distribution": "fixed", "ms": 20}')
    dist = raw.get("distribution", "fixed")
    if dist not in DISTRIBUTIONS:
        raise params.error(config, f"{key}.distribution", f"expected one of {', '.join(DISTRIBUTIONS)}, got {dist!r}")
    keys = DISTRIBUTIONS[dist]
    unknown = sorted(set(raw) - {"distribution", *keys})
    if unknown:
        raise params.error(config, f"{key}.{unknown[0]}", f"unknown field for {dist} (expected {', '.join(keys)})")
    args = tuple(params.number(config, raw, k, f"{key}.{k}") for k in keys)
    if dist == "uniform" and args[0] > args[1]:
        raise params.error(config, f"{key}.min_ms", f"must not exceed {key}.max_ms")
    return Latency(dist, args)


def default_execution(parameters: dict[str, Any]) -> str:
    return "process" if parameters.get("mode") == "busy" else "thread"


def resolve(config: ModelConfig) -> type[Model]:
    unknown = sorted(set(config.parameters) - {"mode", "latency", "error_rate", "seed"})
    if unknown:
        raise params.error(config, unknown[0], "unknown parameter (expected mode, latency, error_rate, seed)")
    mode = params.choice(config, config.parameters, "mode", MODES, "sleep")
    parse_latency(config)
    params.number(config, config.parameters, "error_rate", "error_rate", maximum=1.0, default=0.0)
    params.number(config, config.parameters, "seed", "seed", default=0)
    if len(config.inputs) != len(config.outputs):
        raise params.error(config, "mode", "the mock echoes input i as output i: list as many outputs as inputs")
    for i, (inp, out) in enumerate(zip(config.inputs, config.outputs, strict=True)):
        if inp.datatype != out.datatype:
            raise params.error(config, "mode", f"outputs[{i}] must have the datatype of inputs[{i}] ({inp.datatype})")
    return BusyMock if mode == "busy" else SleepMock


class _Mock(Model):
    def load(self) -> None:
        self.latency = parse_latency(self.config)
        self.error_rate = float(self.config.parameters.get("error_rate", 0.0))
        self.rng = random.Random(self.config.parameters.get("seed", 0))

    def _echo(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.error_rate and self.rng.random() < self.error_rate:
            raise ModelError(f"mock model '{self.config.name}': injected failure (error_rate={self.error_rate})")
        return {out.name: inputs[inp.name] for inp, out in zip(self.config.inputs, self.config.outputs, strict=True)}


class SleepMock(_Mock):
    """Waits without using CPU: runs on the event loop, any number at once."""

    # Model.predict may be async (the engine awaits it, on the event loop), which its sync signature cannot say.
    async def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:  # type: ignore[override]
        await asyncio.sleep(self.latency.sample(self.rng))
        return self._echo(inputs)


class BusyMock(_Mock):
    """Burns the latency in CPU time, like a real CPU-bound model: it takes longer when cores are shared."""

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        end = time.thread_time() + self.latency.sample(self.rng)
        while time.thread_time() < end:
            pass
        return self._echo(inputs)
