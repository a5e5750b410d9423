"""Reading a runtime's ``parameters`` with errors that name the file and the field."""

from __future__ import annotations

from typing import Any

from inferencehub.errors import ConfigError
from inferencehub.model import ModelConfig


def error(config: ModelConfig, field: str, problem: str) -> ConfigError:
    return ConfigError(f"{config.source}: parameters.{field}: {problem}")


def number(
    config: ModelConfig,
    params: dict[str, Any],
    key: str,
    field: str,
    *,
    minimum: float = 0.0,
    maximum: float | None = None,
    default: float | None = None,
) -> float:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error(config, field, f"expected a number, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise error(config, field, f"expected a number {bounds}, got {value}")
    return float(value)


def choice(config: ModelConfig, params: dict[str, Any], key: str, options: tuple[str, ...], default: str) -> str:
    value = params.get(key, default)
    if value not in options:
        raise error(config, key, f"expected one of {', '.join(options)}, got {value!r}")
    return value
