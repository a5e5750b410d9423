"""Users' own models: a ``Model`` subclass named by import path.

Parameters::

    "class": "module:ClassName"   the module is a file (``module.py``) or a package in the model's folder;
                                  any other parameters are the model's own (``self.config.parameters``)

Each model's folder is a package of its own (``inferencehub_models.<model name>``), so two models whose
modules share a name each get their own code; a model's module imports its neighbours relatively
(``from . import helpers``).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
import types

from inferencehub.inference.runtimes import params
from inferencehub.model import Model, ModelConfig

NAMESPACE = "inferencehub_models"


def package_name(config: ModelConfig) -> str:
    """The import name of the model's folder: unique per model, a valid identifier."""
    return f"{NAMESPACE}.{re.sub(r'[^0-9A-Za-z_]', '_', config.name)}_{config.version}"


def _model_package(config: ModelConfig) -> str:
    if NAMESPACE not in sys.modules:
        root = types.ModuleType(NAMESPACE)
        root.__path__ = []
        sys.modules[NAMESPACE] = root
    name = package_name(config)
    package = sys.modules.get(name)
    if package is None or list(getattr(package, "__path__", [])) != [str(config.directory)]:
        spec = importlib.util.spec_from_loader(name, loader=None, is_package=True)
        assert spec is not None  # None only when a loader is given and cannot say whether it makes a package
        package = importlib.util.module_from_spec(spec)
        package.__path__ = [str(config.directory)]
        sys.modules[name] = package
    return name


def resolve(config: ModelConfig) -> type[Model]:
    target = config.parameters.get("class")
    if not isinstance(target, str) or not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", target):
        raise params.error(config, "class", f"expected 'module:ClassName', got {target!r}")
    module_name, class_name = target.split(":")
    try:
        module = importlib.import_module(f"{_model_package(config)}.{module_name}")
    except Exception as exc:  # the user's module may raise anything while importing
        raise params.error(config, "class", f"cannot import module '{module_name}': {exc!r}") from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Model)):
        raise params.error(config, "class", f"'{target}' is not a subclass of inferencehub.model.Model")
    return cls
