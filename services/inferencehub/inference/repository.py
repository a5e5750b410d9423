"""The model repository: a folder of model folders, each with a ``config.json``.

    models/
      iris/config.json      {"name": "iris", "runtime": "mlp", "inputs": [...], ...}
      iris/weights.npz

Every config is validated at start-up; a bad one stops the server with an error
naming the file and the field (``ConfigError``). Runtimes that read a model's tensors from
its file (``onnx``, ``sklearn``) let the config leave ``inputs`` and ``outputs`` out, and
check the declared ones against the model.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeGuard

from inferencehub.errors import ConfigError
from inferencehub.inference import runtimes
from inferencehub.model import Batching, ModelConfig, Scheduling, TensorSpec, VersionPolicy
from inferencehub.tensors import DATATYPES

SHIPPED_MODELS = Path(__file__).resolve().parent.parent / "model_repository"
CONFIG_FILE = "config.json"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
TOP_LEVEL_FIELDS = {
    "name",
    "version",
    "runtime",
    "platform",
    "inputs",
    "outputs",
    "parameters",
    "execution",
    "batching",
    "scheduling",
    "version_policy",
    "decoupled",
}
EXECUTIONS = ("thread", "process")


def load_repository(directory: Path) -> list[ModelConfig]:
    """Read and validate every model config under ``directory``."""
    if not directory.is_dir():
        raise ConfigError(f"{directory}: model repository is not a folder")
    sources = sorted(directory.glob(f"*/{CONFIG_FILE}"))
    if not sources:
        raise ConfigError(f"{directory}: no model configs found (expected <model>/{CONFIG_FILE})")
    configs: list[ModelConfig] = []
    seen: dict[str, Path] = {}
    for source in sources:
        config = load_config(source)
        if config.name in seen:
            raise ConfigError(f"{source}: name: model '{config.name}' is also defined in {seen[config.name]}")
        seen[config.name] = source
        configs.append(config)
    return configs


def load_config(source: Path) -> ModelConfig:
    try:
        raw = json.loads(source.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: cannot read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    return parse_config(raw, source)


def parse_config(raw: Any, source: Path) -> ModelConfig:
    def fail(field: str, problem: str) -> ConfigError:
        return ConfigError(f"{source}: {field}: {problem}")

    if not isinstance(raw, dict):
        raise fail("(top level)", "expected a JSON object")
    unknown = sorted(set(raw) - TOP_LEVEL_FIELDS)
    if unknown:
        raise fail(unknown[0], f"unknown field (expected some of {', '.join(sorted(TOP_LEVEL_FIELDS))})")

    name = raw.get("name")
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise fail("name", "expected a model name of letters, digits, '_', '.' or '-'")
    versioned = version_folders(source.parent)
    if versioned and "version" in raw:
        raise fail("version", f"the folder has version folders ({', '.join(versioned)}/): they name the versions")
    version = raw.get("version", versioned[-1] if versioned else "1")
    if isinstance(version, int) and not isinstance(version, bool):
        version = str(version)
    if not isinstance(version, str) or not NAME_PATTERN.match(version):
        raise fail("version", 'expected a version string such as "1"')
    runtime_name = raw.get("runtime")
    if runtime_name not in runtimes.RUNTIMES:
        raise fail("runtime", f"expected one of {', '.join(sorted(runtimes.RUNTIMES))}, got {runtime_name!r}")
    runtime = runtimes.RUNTIMES[runtime_name]
    parameters = raw.get("parameters", {})
    if not isinstance(parameters, dict):
        raise fail("parameters", "expected a JSON object")
    decoupled = raw.get("decoupled", False)
    if not isinstance(decoupled, bool):
        raise fail("decoupled", "expected true (a generative model: many responses per request) or false")
    # A decoupled model's generator is stepped in the replica (see inferencehub.model): thread, not process.
    execution = raw.get("execution", "thread" if decoupled else runtime.default_execution(parameters))
    if execution not in EXECUTIONS:
        raise fail("execution", f"expected one of {', '.join(EXECUTIONS)}, got {execution!r}")
    platform = raw.get("platform", runtime.platform)
    if not isinstance(platform, str):
        raise fail("platform", "expected a string")

    # A runtime that reads the model's tensors from its file lets the config leave them out.
    optional = runtime.describe is not None
    inputs, outputs = _tensors(raw, "inputs", fail, optional), _tensors(raw, "outputs", fail, optional)
    config = ModelConfig(
        name=name,
        version=version,
        runtime=runtime_name,
        platform=platform,
        inputs=inputs,
        outputs=outputs,
        parameters=parameters,
        execution=execution,
        directory=source.parent.resolve(),
        source=source,
        scheduling=_scheduling(raw.get("scheduling"), fail),
        version_policy=_version_policy(raw.get("version_policy"), fail),
        decoupled=decoupled,
    )
    if versioned:  # each version's model file is in its own folder: described and resolved in expand()
        return replace(config, batching=_batching(raw.get("batching"), config.inputs, config.outputs, fail))
    if runtime.describe is not None:
        config = runtime.describe(config)  # inputs and outputs as the model file says them
    config = replace(config, batching=_batching(raw.get("batching"), config.inputs, config.outputs, fail))
    runtimes.resolve(config)  # validates the runtime's parameters
    return config


def version_folders(folder: Path) -> list[str]:
    """A model folder's version folders (``1/``, ``2/``...), in numeric order; none: the model has one version."""
    try:
        return sorted((d.name for d in folder.iterdir() if d.is_dir() and d.name.isdigit()), key=int)
    except OSError:
        return []


def expand(config: ModelConfig) -> list[ModelConfig]:
    """The configs of the versions to serve: one per version folder the policy selects (its files in that folder),
    or the config itself for a folder without version folders. Blocking (reads the folder): run in a thread."""
    available = version_folders(config.directory)
    if not available:
        return [config]
    chosen = config.version_policy.select(available)
    if not chosen:
        raise ConfigError(f"{config.source}: version_policy: selects none of the versions ({', '.join(available)})")
    if config.execution == "process" and len(chosen) > 1:
        raise ConfigError(f"{config.source}: version_policy: a process-executed model serves one version at a time")
    configs = []
    for version in chosen:
        one = replace(config, version=version, directory=config.directory / version)
        runtime = runtimes.RUNTIMES[one.runtime]
        if runtime.describe is not None:
            one = runtime.describe(one)  # inputs and outputs as this version's model file says them
            _check_batch_dimension(one)
        runtimes.resolve(one)
        configs.append(one)
    return configs


def _version_policy(raw: Any, fail) -> VersionPolicy:
    example = '{"latest": {"num_versions": 2}}, {"all": {}} or {"specific": {"versions": [1, 3]}}'
    if raw is None:
        return VersionPolicy()
    if not isinstance(raw, dict) or len(raw) != 1:
        raise fail("version_policy", f"expected one of {example}")
    kind, value = next(iter(raw.items()))
    if kind == "all" and value == {}:
        return VersionPolicy("all")
    if kind == "latest" and isinstance(value, dict) and set(value) == {"num_versions"}:
        if not _integer(value["num_versions"], 1):
            raise fail("version_policy.latest.num_versions", "expected an integer >= 1")
        return VersionPolicy("latest", value["num_versions"])
    if kind == "specific" and isinstance(value, dict) and set(value) == {"versions"}:
        versions = value["versions"]
        if not isinstance(versions, list) or not versions or not all(_integer(v, 0) for v in versions):
            raise fail("version_policy.specific.versions", "expected a non-empty list of version numbers")
        return VersionPolicy("specific", versions=tuple(str(v) for v in versions))
    raise fail("version_policy", f"expected one of {example}")


def _check_batch_dimension(config: ModelConfig) -> None:
    """A batching model's tensors, as its file describes them, must batch along their first dimension."""
    if config.batching is None:
        return
    for key, specs in (("inputs", config.inputs), ("outputs", config.outputs)):
        for i, spec in enumerate(specs):
            if spec.shape[0] != -1:
                raise ConfigError(
                    f"{config.source}: {key}[{i}].shape: batching stacks requests along the first dimension: "
                    f"it must be -1 (the model file in {config.directory} says {list(spec.shape)})"
                )


def _tensors(raw: dict, key: str, fail, optional: bool = False) -> tuple[TensorSpec, ...]:
    items = raw.get(key)
    if items is None and optional:
        return ()
    if not isinstance(items, list) or not items:
        raise fail(key, "expected a non-empty list of tensors")
    specs: list[TensorSpec] = []
    for i, item in enumerate(items):
        where = f"{key}[{i}]"
        if not isinstance(item, dict):
            raise fail(where, "expected an object with name, datatype and shape")
        allowed = {"name", "datatype", "shape", "optional"} if key == "inputs" else {"name", "datatype", "shape"}
        unknown = sorted(set(item) - allowed)
        if unknown:
            raise fail(f"{where}.{unknown[0]}", f"unknown field (expected {', '.join(sorted(allowed))})")
        optional_input = item.get("optional", False)
        if not isinstance(optional_input, bool):
            raise fail(f"{where}.optional", "expected true (requests may leave the input out) or false")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise fail(f"{where}.name", "expected a non-empty string")
        dtype = item.get("datatype")
        if dtype not in DATATYPES:
            raise fail(f"{where}.datatype", f"expected one of {', '.join(DATATYPES)}, got {dtype!r}")
        shape = item.get("shape")
        if (
            not isinstance(shape, list)
            or not shape
            or not all(isinstance(d, int) and not isinstance(d, bool) and (d == -1 or d > 0) for d in shape)
        ):
            raise fail(f"{where}.shape", "expected a non-empty list of dimensions, each > 0 or -1 (variable)")
        if name in {s.name for s in specs}:
            raise fail(f"{where}.name", f"duplicate tensor name '{name}'")
        specs.append(TensorSpec(name, dtype, tuple(shape), optional_input))
    return tuple(specs)


def _integer(value: Any, minimum: int) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _batching(raw: Any, inputs, outputs, fail) -> Batching | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise fail("batching", 'expected an object such as {"max_batch_size": 32, "max_queue_delay_ms": 2}')
    unknown = sorted(set(raw) - {"max_batch_size", "max_queue_delay_ms", "preferred_batch_sizes"})
    if unknown:
        raise fail(
            f"batching.{unknown[0]}",
            "unknown field (expected max_batch_size, max_queue_delay_ms, preferred_batch_sizes)",
        )
    size = raw.get("max_batch_size")
    if not _integer(size, 1):
        raise fail("batching.max_batch_size", "expected an integer >= 1")
    delay = raw.get("max_queue_delay_ms", 0)
    if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not 0 <= delay <= 10_000:
        raise fail("batching.max_queue_delay_ms", "expected a number of milliseconds from 0 to 10000")
    preferred = raw.get("preferred_batch_sizes", [])
    if not isinstance(preferred, list) or not all(_integer(p, 1) and p <= size for p in preferred):
        raise fail("batching.preferred_batch_sizes", f"expected a list of sizes from 1 to max_batch_size ({size})")
    for key, specs in (("inputs", inputs), ("outputs", outputs)):
        for i, spec in enumerate(specs):
            if spec.shape[0] != -1:
                raise fail(f"{key}[{i}].shape", "batching stacks requests along the first dimension: it must be -1")
    return Batching(size, float(delay), tuple(sorted(set(preferred))))


def _scheduling(raw: Any, fail) -> Scheduling:
    if raw is None:
        return Scheduling()
    if not isinstance(raw, dict):
        raise fail("scheduling", 'expected an object such as {"max_concurrency": 2, "max_queue_size": 64}')
    unknown = sorted(set(raw) - {"max_concurrency", "max_queue_size"})
    if unknown:
        raise fail(f"scheduling.{unknown[0]}", "unknown field (expected max_concurrency, max_queue_size)")
    concurrency = raw.get("max_concurrency")
    if concurrency is not None and not _integer(concurrency, 1):
        raise fail("scheduling.max_concurrency", "expected an integer >= 1")
    queue = raw.get("max_queue_size", Scheduling.max_queue_size)
    if not _integer(queue, 0):
        raise fail("scheduling.max_queue_size", "expected an integer >= 0")
    return Scheduling(concurrency, queue)
