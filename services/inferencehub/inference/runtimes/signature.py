"""Inputs and outputs read from a model file, and a config's declared ones checked against them.

The ``onnx`` and ``sklearn`` runtimes know their tensors from the model itself, so a config may leave
``inputs`` and ``outputs`` out. When it declares them, each declared tensor must be one the model has, of a
compatible datatype and shape; anything else stops start-up with an error naming the config file, the field
and the model file, instead of failing on the first request.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import ModuleType

from inferencehub.errors import ConfigError
from inferencehub.model import ModelConfig, TensorSpec

EXTRA = "runtimes"


def require(config: ModelConfig, module: str, package: str) -> ModuleType:
    """Import a runtime's library, or a config error naming the runtime and the package to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"{config.source}: runtime: the '{config.runtime}' runtime needs the {package} package, which is not "
            f"installed: pip install 'inferencehub[{EXTRA}]'"
        ) from None


def model_file(config: ModelConfig, default: str) -> Path:
    """The model file named by ``parameters.model`` (a file in the model's folder)."""
    name = config.parameters.get("model", default)
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise ConfigError(f"{config.source}: parameters.model: expected a file name in the model's folder")
    path = config.directory / name
    if not path.is_file():
        raise ConfigError(f"{config.source}: parameters.model: no model file {name!r} in {config.directory}")
    return path


def fits(declared: tuple[int, ...], found: tuple[int, ...]) -> bool:
    """A declared shape fits the model's when the ranks agree and each dimension the model fixes is kept."""
    return len(declared) == len(found) and all(f == -1 or d == f for d, f in zip(declared, found, strict=True))


def reconcile(
    config: ModelConfig,
    key: str,
    found: tuple[TensorSpec, ...],
    path: Path,
    *,
    all_required: bool,
    datatype_ok: Callable[[str, str], bool] = lambda declared, found: declared == found,
) -> tuple[TensorSpec, ...]:
    """The tensors to serve: the declared ones when checked against the model's, else the model's own.

    ``all_required``: every tensor of the model must be declared (a model's inputs); otherwise a subset
    may be (the outputs to serve).
    """
    declared: tuple[TensorSpec, ...] = getattr(config, key)
    if not declared:
        return found
    by_name = {spec.name: spec for spec in found}
    names = ", ".join(by_name)
    for i, spec in enumerate(declared):
        where = f"{config.source}: {key}[{i}]"
        model = by_name.get(spec.name)
        if model is None:
            raise ConfigError(f"{where}.name: {path.name} has no {key[:-1]} '{spec.name}' (it has {names})")
        if not datatype_ok(spec.datatype, model.datatype):
            raise ConfigError(
                f"{where}.datatype: {spec.datatype} does not fit {key[:-1]} '{spec.name}' of {path.name}, "
                f"which is {model.datatype}"
            )
        if not fits(spec.shape, model.shape):
            raise ConfigError(
                f"{where}.shape: {list(spec.shape)} does not fit {key[:-1]} '{spec.name}' of {path.name}, "
                f"which is {list(model.shape)} (-1: any size)"
            )
    if all_required:
        missing = [spec.name for spec in found if spec.name not in {d.name for d in declared}]
        if missing:
            raise ConfigError(f"{config.source}: {key}: {path.name} also needs {', '.join(repr(m) for m in missing)}")
    return declared


def complete(config: ModelConfig, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]) -> ModelConfig:
    return replace(config, inputs=inputs, outputs=outputs)
