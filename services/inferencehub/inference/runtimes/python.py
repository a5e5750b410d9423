"""Users' own models: a ``Model`` subclass named by import path.

Parameters::

    "class": "module:ClassName"   imported with the model's folder first on the import path;
                                  any other parameters are the model's own (``self.config.parameters``)
"""

from __future__ import annotations

import importlib
import sys

from inferencehub.inference.runtimes import params
from inferencehub.model import Model, ModelConfig


def resolve(config: ModelConfig) -> type[Model]:
    target = config.parameters.get("class")
    if not isinstance(target, str) or target.count(":") != 1:
        raise params.error(config, "class", f"expected 'module:ClassName', got {target!r}")
    module_name, class_name = target.split(":")
    folder = str(config.directory)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module may raise anything while importing
        raise params.error(config, "class", f"cannot import module '{module_name}': {exc!r}") from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Model)):
        raise params.error(config, "class", f"'{target}' is not a subclass of inferencehub.model.Model")
    return cls
