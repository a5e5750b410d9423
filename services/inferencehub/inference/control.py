"""Model control: which models a replica serves, and Triton's model repository extension (index, load, unload).

Modes (``--model-control-mode``, as Triton's):

- ``none`` (the default): every model in the repository is loaded at start; load and unload are refused
  (FAILED_PRECONDITION, HTTP 400), as Triton refuses them in this mode.
- ``explicit``: only the models named by ``--load`` are loaded at start (``--load '*'``: all of them; none given:
  none); load (which also reloads a loaded model, from its files or a config given with the call) and unload are
  allowed.
- ``poll``: every model is loaded at start, and the repository folder is checked every
  ``--repository-poll-seconds``: a model whose files changed is loaded again (the new instance takes traffic once
  it is loaded; if it fails, the old one keeps serving and the error is logged), a new model folder is loaded, a
  removed one unloaded. Load and unload are refused (the folder is the source of truth), as in Triton.

Load reads the model's config from the repository again (or takes the JSON ``config`` parameter, a whole
``config.json`` document, instead: Triton's config override; its files are still looked for in the model's folder).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from inferencehub.errors import (
    ConfigError,
    InferenceHubError,
    InvalidInput,
    ModelControlRefused,
    ModelLoadFailed,
    ModelNotFound,
)
from inferencehub.inference.engine import READY, UNAVAILABLE, Engine
from inferencehub.inference.repository import CONFIG_FILE, expand, load_config, load_repository, parse_config
from inferencehub.model import ModelConfig
from inferencehub.model_state import Desired
from inferencehub.settings import MODEL_CONTROL_MODES

log = logging.getLogger(__name__)

CONFIG_PARAMETER = "config"
INDEX_SCAN_SECONDS = 1.0
IGNORED_PARAMETERS = frozenset({"unload_dependents"})  # tritonclient always sends it; there are no ensembles here


@dataclass
class Scan:
    """What the repository folder holds now."""

    configs: dict[str, ModelConfig] = field(default_factory=dict)  # by model name
    folders: dict[str, str] = field(default_factory=dict)  # model name -> its folder's name
    errors: dict[str, str] = field(default_factory=dict)  # folder name -> why its config cannot be used


def scan(directory: Path) -> Scan:
    """Read every model config under ``directory``, keeping going past bad ones (blocking: run in a thread)."""
    found = Scan()
    for source in sorted(directory.glob(f"*/{CONFIG_FILE}")):
        folder = source.parent.name
        try:
            config = load_config(source)
        except ConfigError as exc:
            found.errors[folder] = str(exc)
            continue
        if config.name in found.configs:
            other = found.folders[config.name]
            found.errors[folder] = f"{source}: name: model '{config.name}' is also defined in folder {other}"
            continue
        found.configs[config.name] = config
        found.folders[config.name] = folder
    return found


def fingerprint(folder: Path) -> tuple:
    """Each file's path, size and modification time under ``folder``: changes when any file does."""
    entries = []
    for root, _, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            with contextlib.suppress(OSError):
                info = path.stat()
                entries.append((str(path.relative_to(folder)), info.st_size, info.st_mtime_ns))
    return tuple(sorted(entries))


def fingerprints(directory: Path) -> dict[str, tuple]:
    return {p.parent.name: fingerprint(p.parent) for p in directory.glob(f"*/{CONFIG_FILE}")}


def load_names(value: str) -> list[str]:
    """``--load`` given as a comma-separated list (the flag may also be repeated)."""
    return [n.strip() for n in value.split(",") if n.strip()]


class ModelControl:
    def __init__(self, engine: Engine, directory: Path, mode: str, load: str = "", poll_seconds: float = 5.0) -> None:
        if mode not in MODEL_CONTROL_MODES:
            raise ConfigError(f"--model-control-mode: expected one of {', '.join(MODEL_CONTROL_MODES)}, got {mode!r}")
        if load_names(load) and mode != "explicit":
            raise ConfigError(
                f"--load is for --model-control-mode explicit (the mode is {mode!r}: it loads every model)"
            )
        if poll_seconds <= 0:
            raise ConfigError("--repository-poll-seconds must be positive")
        self.engine = engine
        self.directory = directory
        self.mode = mode
        self.load_at_start = load_names(load)
        self.poll_seconds = poll_seconds
        self.prints: dict[str, tuple] = {}
        self.poller: asyncio.Task | None = None
        self._scanned: tuple[float, Scan] | None = None  # the last scan for index() and its time

    # --- start-up --------------------------------------------------------------------------

    def initial(self) -> list[ModelConfig]:
        """The configs to load at start; a bad repository (or a --load name it lacks) stops start-up here."""
        if self.mode != "explicit" or "*" in self.load_at_start:
            return load_repository(self.directory)
        if not self.directory.is_dir():
            raise ConfigError(f"{self.directory}: model repository is not a folder")
        found = scan(self.directory)
        configs = []
        for name in self.load_at_start:
            if name in found.configs:
                configs.append(found.configs[name])
                continue
            bad = next((error for folder, error in found.errors.items() if folder == name), None)
            if bad is not None:
                raise ConfigError(bad)
            known = ", ".join(sorted(found.configs)) or "none"
            raise ConfigError(f"--load: model '{name}' is not in the repository {self.directory} (it has: {known})")
        return configs

    async def start(self, configs: list[ModelConfig], shared: dict[str, Desired] | None = None) -> None:
        """Load the start-up models (errors stop start-up), then in explicit mode those the shared model state
        records as loaded (errors are logged: a model loaded earlier must not keep new replicas from starting);
        in poll mode, begin watching the folder."""
        if shared and self.mode == "explicit":
            kept = [c for c in configs if shared.get(c.name, Desired(c.name, True)).loaded]
            skipped = sorted({c.name for c in configs} - {c.name for c in kept})
            configs = kept
            if skipped:
                log.info(
                    "not loading %s: unloaded through the gateway earlier (shared model state)", ", ".join(skipped)
                )
        versions = await asyncio.to_thread(lambda: [v for c in configs for v in expand(c)])  # ConfigError: stop
        await self.engine.load(versions)
        for name, desired in sorted((shared or {}).items()):
            if self.mode != "explicit" or not desired.loaded:
                continue
            try:
                await self.load(name, {CONFIG_PARAMETER: desired.config} if desired.config else None)
                log.info("model %s loaded: loaded through the gateway earlier (shared model state)", name)
            except InferenceHubError as exc:
                log.error("model %s is recorded as loaded (shared model state) but cannot be loaded: %s", name, exc)
        if self.mode == "poll":
            self.prints = await asyncio.to_thread(fingerprints, self.directory)
            self.poller = asyncio.create_task(self._poll(), name="repository poll")

    async def stop(self) -> None:
        if self.poller is not None:
            self.poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.poller

    # --- the repository extension ----------------------------------------------------------

    async def _scan(self, fresh: bool = True) -> Scan:
        """The folder now (``fresh``), or as read less than ``INDEX_SCAN_SECONDS`` ago: calls that only look
        (index, readiness of an unknown name) cannot make the replica read the folder more than once a second."""
        loop = asyncio.get_running_loop()
        if not fresh and self._scanned is not None and loop.time() - self._scanned[0] < INDEX_SCAN_SECONDS:
            return self._scanned[1]
        found = await asyncio.to_thread(scan, self.directory) if self.directory.is_dir() else Scan()
        self._scanned = (loop.time(), found)
        return found

    async def index(self, ready_only: bool = False) -> list[tuple[str, str, str, str]]:
        """``(name, version, state, reason)`` for every model served or in the folder, by name."""
        found = await self._scan(fresh=False)
        entries: dict[str, list[tuple[str, str, str, str]]] = {}
        for folder, error in found.errors.items():
            entries[folder] = [(folder, "", UNAVAILABLE, error)]
        for name, config in found.configs.items():
            entries[name] = [(name, config.version, UNAVAILABLE, "not loaded")]
        for name, (state, reason) in self.engine.states.items():
            version = found.configs[name].version if name in found.configs else ""
            entries[name] = [(name, version, state, reason)]
        for name, versions in self.engine.versions.items():
            entries[name] = [(name, version, READY, "") for version in versions]
        rows = [row for name in sorted(entries) for row in entries[name]]
        return [row for row in rows if row[2] == READY] if ready_only else rows

    def _refuse_unless_explicit(self, action: str, name: str) -> None:
        if self.mode != "explicit":
            raise ModelControlRefused(
                f"{action} of model '{name}' refused: this replica's model control mode is '{self.mode}'"
                " (load and unload need --model-control-mode explicit)"
            )

    async def load(self, name: str, parameters: dict[str, object] | None = None) -> None:
        """Load (or reload) ``name`` from the repository, or from the JSON ``config`` parameter."""
        self._refuse_unless_explicit("load", name)
        if not name:
            raise InvalidInput("load: the model name is empty")
        parameters = {k: v for k, v in (parameters or {}).items() if k not in IGNORED_PARAMETERS}
        unknown = sorted(set(parameters) - {CONFIG_PARAMETER})
        if unknown:
            raise InvalidInput(
                f"load of model '{name}': parameter '{unknown[0]}' is not supported (only '{CONFIG_PARAMETER}', "
                "a JSON model config; model files must be in the repository)"
            )
        found = await self._scan()
        if CONFIG_PARAMETER in parameters:
            config = await asyncio.to_thread(self._override, name, parameters[CONFIG_PARAMETER], found)
        elif name in found.configs:
            config = found.configs[name]
        elif name in found.errors:
            raise ModelLoadFailed(f"model '{name}' cannot be loaded: {found.errors[name]}")
        else:
            known = ", ".join(sorted(found.configs)) or "none"
            raise ModelNotFound(f"model '{name}' is not in the model repository (it has: {known})")
        try:
            versions = await asyncio.to_thread(expand, config)
        except ConfigError as exc:
            raise ModelLoadFailed(f"model '{name}' cannot be loaded: {exc}") from None
        await self.engine.load_model(versions)

    def _override(self, name: str, text: object, found: Scan) -> ModelConfig:
        if not isinstance(text, str):
            raise InvalidInput(f"load of model '{name}': parameter '{CONFIG_PARAMETER}' must be a string of JSON")
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidInput(
                f"load of model '{name}': parameter '{CONFIG_PARAMETER}' is not valid JSON: {exc.msg} "
                f"at line {exc.lineno} column {exc.colno}"
            ) from None
        if not isinstance(raw, dict):
            raise InvalidInput(f"load of model '{name}': parameter '{CONFIG_PARAMETER}' must be a JSON object")
        raw.setdefault("name", name)
        if raw["name"] != name:
            raise InvalidInput(f"load of model '{name}': the config's name is {raw['name']!r}; they must agree")
        source = self.directory / found.folders.get(name, name) / CONFIG_FILE
        try:
            return parse_config(raw, source)
        except ConfigError as exc:
            problem = str(exc).removeprefix(f"{source}: ")
            raise InvalidInput(f"load of model '{name}': parameter '{CONFIG_PARAMETER}': {problem}") from None

    async def unload(self, name: str) -> None:
        self._refuse_unless_explicit("unload", name)
        if name in self.engine.models or name in self.engine.states:
            await self.engine.unload_model(name)
            return
        found = await self._scan()
        if name not in found.configs and name not in found.errors:
            raise ModelNotFound(f"model '{name}' is neither loaded nor in the model repository")
        # Known and not loaded: nothing to do (unload is idempotent, as in Triton).

    # --- poll mode -------------------------------------------------------------------------

    def directory_of(self, name: str) -> str:
        """The name of a loaded model's folder (a version's config points into a version folder)."""
        config = self.engine.models[name].config
        return config.source.parent.name

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_seconds)
            try:
                await self.poll_once()
            except Exception:  # a bad poll must never take the replica down
                log.exception("polling the model repository failed")

    async def poll_once(self) -> None:
        """Reload what changed in the folder, load what appeared, unload what was removed."""
        prints = await asyncio.to_thread(fingerprints, self.directory)
        changed = {f for f in prints.keys() | self.prints.keys() if prints.get(f) != self.prints.get(f)}
        if not changed:
            return
        self.prints = prints
        found = await asyncio.to_thread(scan, self.directory)
        for folder in sorted(changed & found.errors.keys()):
            log.error(
                "model folder %s changed but cannot be loaded (what was serving stays): %s",
                folder,
                found.errors[folder],
            )
        for name, config in sorted(found.configs.items()):
            if found.folders[name] in changed:
                log.info("model %s: its files changed; loading it again", name)
                try:
                    versions = await asyncio.to_thread(expand, config)
                except ConfigError as exc:
                    log.error("model %s changed but cannot be loaded (what was serving stays): %s", name, exc)
                    continue
                with contextlib.suppress(ModelLoadFailed):  # logged by the engine; the old instance stays
                    await self.engine.load_model(versions)
        removed = {f for f in changed if f not in prints}
        for name in list(self.engine.models):
            folder = self.directory_of(name)
            if name not in found.configs and folder in removed:
                log.info("model %s: its folder was removed; unloading it", name)
                await self.engine.unload_model(name)
