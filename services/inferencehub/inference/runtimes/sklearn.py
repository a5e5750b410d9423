"""scikit-learn models saved with ``joblib.dump`` (an estimator or a ``Pipeline``).

Parameters (all optional)::

    "model": "model.joblib"        the joblib file in the model's folder

A joblib file is a pickle: loading it runs code from the file, so serve only files you trust, saved with
the scikit-learn version installed here.

Inputs and outputs come from the model:

- one input, ``input``, FP64 [-1, n_features_in_] (a config may rename it, declare another numeric
  datatype such as FP32, which is converted, or declare BYTES [-1] for a pipeline that takes text);
- ``predict``: what ``estimator.predict`` returns: for a classifier its labels, of the datatype of
  ``classes_`` (INT64, BYTES for strings...), shape [-1]; for a regressor FP64 [-1] (or [-1, k]);
- ``predict_proba`` (estimators that have it): FP64 [-1, len(classes_)], columns in the order of ``classes_``.

A config may declare a subset of the outputs (and FP32 for an FP64 one); only the declared ones are computed.
scikit-learn does most of its work in numpy and native code, so the default execution is ``thread``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from inferencehub.errors import ConfigError
from inferencehub.inference.runtimes import params, signature
from inferencehub.model import Model, ModelConfig, TensorSpec
from inferencehub.tensors import DATATYPES

PARAMETERS = ("model",)
DEFAULT_FILE = "model.joblib"
INPUT = "input"
PREDICT, PREDICT_PROBA = "predict", "predict_proba"
NUMERIC = ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64")


def _check_parameters(config: ModelConfig) -> None:
    unknown = sorted(set(config.parameters) - set(PARAMETERS))
    if unknown:
        raise params.error(config, unknown[0], f"unknown parameter (expected {', '.join(PARAMETERS)})")


def _load(config: ModelConfig) -> tuple[Any, Path]:
    signature.require(config, "sklearn", "scikit-learn")
    joblib = signature.require(config, "joblib", "joblib")
    path = signature.model_file(config, DEFAULT_FILE)
    try:
        estimator = joblib.load(path)
    except Exception as exc:  # unpickling may raise anything
        raise ConfigError(f"{config.source}: parameters.model: cannot load {path.name}: {exc!r}") from None
    if not callable(getattr(estimator, "predict", None)):
        raise ConfigError(
            f"{config.source}: parameters.model: {path.name} holds a {type(estimator).__name__}, "
            "not an estimator with predict()"
        )
    return estimator, path


def _datatype(dtype: np.dtype) -> str | None:
    if dtype.kind in "OSU":
        return "BYTES"
    for name, datatype in DATATYPES.items():
        if datatype.dtype.kind != "O" and datatype.dtype == dtype.newbyteorder("<"):
            return name
    return None


def _outputs(config: ModelConfig, estimator: Any, width: int | None, path: Path) -> tuple[TensorSpec, ...]:
    classes = getattr(estimator, "classes_", None)
    outputs = []
    if isinstance(classes, np.ndarray) and classes.ndim == 1:  # a classifier of one target
        label = _datatype(classes.dtype)
        if label is None:
            raise ConfigError(f"{config.source}: outputs: the classes of {path.name} are {classes.dtype}")
        outputs.append(TensorSpec(PREDICT, label, (-1,)))
        if hasattr(estimator, PREDICT_PROBA):
            outputs.append(TensorSpec(PREDICT_PROBA, "FP64", (-1, len(classes))))
        return tuple(outputs)
    if width is None:
        return ()  # nothing to probe with: the config must declare its outputs
    try:  # a regressor (or several targets): one row of zeros shows predict's datatype and shape
        sample = np.asarray(estimator.predict(np.zeros((1, width))))
    except Exception:
        return ()
    datatype = _datatype(sample.dtype)
    return (TensorSpec(PREDICT, datatype, (-1, *sample.shape[1:])),) if datatype else ()


def _output_datatype_ok(declared: str, found: str) -> bool:
    if declared == found:
        return True
    return declared != "BYTES" and found != "BYTES" and DATATYPES[declared].dtype.kind == DATATYPES[found].dtype.kind


def describe(config: ModelConfig) -> ModelConfig:
    """The config with the model's input and outputs (the declared ones checked against them)."""
    _check_parameters(config)
    estimator, path = _load(config)
    width = getattr(estimator, "n_features_in_", None)
    width = int(width) if isinstance(width, (int, np.integer)) else None

    if len(config.inputs) > 1:
        raise ConfigError(f"{config.source}: inputs: a scikit-learn model takes one input (a table of rows)")
    if config.inputs:
        spec = config.inputs[0]
        if spec.datatype == "BYTES":
            if spec.shape != (-1,):
                raise ConfigError(f"{config.source}: inputs[0].shape: a BYTES input (text) is [-1], one per row")
        elif spec.datatype not in NUMERIC:
            raise ConfigError(f"{config.source}: inputs[0].datatype: expected a numeric datatype or BYTES")
        elif width is not None and not signature.fits(spec.shape, (-1, width)):
            raise ConfigError(
                f"{config.source}: inputs[0].shape: {list(spec.shape)} does not fit {path.name}, "
                f"which takes [-1, {width}] (n_features_in_)"
            )
        inputs = config.inputs
    elif width is None:
        raise ConfigError(
            f"{config.source}: inputs: {path.name} does not say how many features it takes (no n_features_in_): "
            "declare the input"
        )
    else:
        inputs = (TensorSpec(INPUT, "FP64", (-1, width)),)

    found = _outputs(config, estimator, width, path)
    if not found and not config.outputs:
        raise ConfigError(f"{config.source}: outputs: cannot tell what {path.name} returns: declare the outputs")
    if found:
        outputs = signature.reconcile(
            config, "outputs", found, path, all_required=False, datatype_ok=_output_datatype_ok
        )
    else:  # the model does not say: trust the declaration, within what this runtime can compute
        for i, spec in enumerate(config.outputs):
            if spec.name not in (PREDICT, PREDICT_PROBA):
                raise ConfigError(
                    f"{config.source}: outputs[{i}].name: expected {PREDICT} or {PREDICT_PROBA}, got '{spec.name}'"
                )
        outputs = config.outputs
    return signature.complete(config, inputs, outputs)


def resolve(config: ModelConfig) -> type[Model]:
    _check_parameters(config)
    signature.require(config, "sklearn", "scikit-learn")
    signature.require(config, "joblib", "joblib")
    return SklearnModel


class SklearnModel(Model):
    def load(self) -> None:
        self.estimator, _ = _load(self.config)
        self.input = self.config.inputs[0]
        self.outputs = [spec.name for spec in self.config.outputs]

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        data = inputs[self.input.name]
        x: np.ndarray | list[str] = data
        if self.input.datatype == "BYTES":  # text rows, as a list of str for vectorisers
            x = [item.decode("utf-8", "replace") for item in data]
        return {name: np.asarray(getattr(self.estimator, name)(x)) for name in self.outputs}
