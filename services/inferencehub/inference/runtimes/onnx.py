"""ONNX models, run by onnxruntime on the CPU.

Parameters (all optional)::

    "model": "model.onnx"          the ONNX file in the model's folder
    "intra_op_num_threads": 1      threads one call may use; 1 by default, so that a replica running
                                   several calls at once (``scheduling.max_concurrency``) does not put
                                   more threads than cores to work
    "inter_op_num_threads": 1      threads running independent nodes of the graph at once

Inputs and outputs come from the model (``session.get_inputs()`` / ``get_outputs()``): their names,
datatypes (``tensor(float)`` is FP32, ``tensor(int64)`` INT64, ``tensor(string)`` BYTES...) and shapes
(a named or unknown dimension is -1). A config may leave them out; declared ones are checked against the
model: every model input, any subset of its outputs. Outputs that are not tensors (the sequences of maps
skl2onnx writes for classifiers unless ``zipmap`` is off) cannot travel in the Open Inference Protocol:
declare the outputs to serve without them, or export the model without them.

onnxruntime releases the GIL while it computes, so the default execution is ``thread``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from inferencehub.errors import ConfigError
from inferencehub.inference.runtimes import params, signature
from inferencehub.model import Model, ModelConfig, TensorSpec

PARAMETERS = ("model", "intra_op_num_threads", "inter_op_num_threads")
DEFAULT_FILE = "model.onnx"
DATATYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


def _threads(config: ModelConfig, key: str) -> int:
    value = config.parameters.get(key, 1)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 256:
        raise params.error(config, key, f"expected an integer from 1 to 256, got {value!r}")
    return value


def _check_parameters(config: ModelConfig) -> None:
    unknown = sorted(set(config.parameters) - set(PARAMETERS))
    if unknown:
        raise params.error(config, unknown[0], f"unknown parameter (expected {', '.join(PARAMETERS)})")
    for key in PARAMETERS[1:]:
        _threads(config, key)


def _session(config: ModelConfig, *, reading: bool = False) -> Any:
    ort = signature.require(config, "onnxruntime", "onnxruntime")
    path = signature.model_file(config, DEFAULT_FILE)
    options = ort.SessionOptions()
    options.intra_op_num_threads = _threads(config, "intra_op_num_threads")
    options.inter_op_num_threads = _threads(config, "inter_op_num_threads")
    options.log_severity_level = 3  # errors only: warnings about unused initialisers are not the user's problem
    if reading:  # only the signature is wanted: skip the graph optimisations a serving session pays for
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable or invalid files
        raise ConfigError(f"{config.source}: parameters.model: onnxruntime cannot load {path.name}: {exc}") from None


def _specs(config: ModelConfig, key: str, args: list[Any], file: str, *, strict: bool) -> tuple[TensorSpec, ...]:
    """The model's tensors as specs; with ``strict``, a tensor the protocol cannot carry is an error."""
    specs = []
    for arg in args:
        datatype = DATATYPES.get(arg.type)
        shape = tuple(d if isinstance(d, int) and d > 0 else -1 for d in (arg.shape or ()))
        problem = None
        if datatype is None:
            problem = f"is {arg.type}, which has no Open Inference Protocol datatype"
        elif not shape:
            problem = "is a scalar (no dimensions), which a model config cannot describe"
        if problem is None:
            assert datatype is not None  # a problem otherwise
            specs.append(TensorSpec(arg.name, datatype, shape))
        elif strict:
            hint = " (declare the outputs to serve without it)" if key == "outputs" else ""
            raise ConfigError(f"{config.source}: {key}: {key[:-1]} '{arg.name}' of {file} {problem}{hint}")
    return tuple(specs)


def describe(config: ModelConfig) -> ModelConfig:
    """The config with the model's inputs and outputs (the declared ones checked against them)."""
    _check_parameters(config)
    session = _session(config, reading=True)
    file = signature.model_file(config, DEFAULT_FILE)
    inputs = _specs(config, "inputs", session.get_inputs(), file.name, strict=True)
    # Outputs the protocol cannot carry are an error only if the config relies on the model's list.
    outputs = _specs(config, "outputs", session.get_outputs(), file.name, strict=not config.outputs)
    return signature.complete(
        config,
        signature.reconcile(config, "inputs", inputs, file, all_required=True),
        signature.reconcile(config, "outputs", outputs, file, all_required=False),
    )


def resolve(config: ModelConfig) -> type[Model]:
    _check_parameters(config)
    signature.require(config, "onnxruntime", "onnxruntime")
    return OnnxModel


class OnnxModel(Model):
    def load(self) -> None:
        self.session = _session(self.config)
        self.outputs = [spec.name for spec in self.config.outputs]
        self.text_inputs = {spec.name for spec in self.config.inputs if spec.datatype == "BYTES"}

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {}
        for spec in self.config.inputs:
            array = inputs[spec.name]
            if spec.name in self.text_inputs:  # BYTES arrive as bytes; ONNX strings are str
                array = np.array([item.decode("utf-8", "replace") for item in array.ravel()], dtype=object)
                array = array.reshape(inputs[spec.name].shape)
            feed[spec.name] = array
        return dict(zip(self.outputs, self.session.run(self.outputs, feed), strict=True))
