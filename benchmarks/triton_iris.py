"""The `iris` MLP as a Triton Python-backend model, for the Triton peer rows of the overhead benchmark.

Triton's dynamic batcher hands ``execute`` a list of requests; this model concatenates their rows, computes
exactly what InferenceHub's ``mlp`` runtime computes from the same shipped ``weights.npz`` (its path is the
model's ``weights`` parameter), and splits the answers back. It runs in Triton's Python-backend stub, on the
system's Python 3.11 and its numpy, never in the project's environment.
"""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        with np.load(config["parameters"]["weights"]["string_value"]) as data:
            self.mean = data["mean"].astype(np.float32)
            self.scale = data["scale"].astype(np.float32)
            self.layers = []
            while f"w{len(self.layers)}" in data:
                i = len(self.layers)
                self.layers.append((data[f"w{i}"].astype(np.float32), data[f"b{i}"].astype(np.float32)))

    def execute(self, requests):
        inputs = [pb_utils.get_input_tensor_by_name(r, "features").as_numpy() for r in requests]
        rows = [len(x) for x in inputs]
        x = (np.concatenate(inputs).astype(np.float32, copy=False) - self.mean) / self.scale
        for i, (w, b) in enumerate(self.layers):
            x = x @ w + b
            if i < len(self.layers) - 1:
                np.maximum(x, 0.0, out=x)
        x = x - x.max(axis=1, keepdims=True)
        np.exp(x, out=x)
        x /= x.sum(axis=1, keepdims=True)
        label = x.argmax(axis=1).astype(np.int64)
        responses, start = [], 0
        for count in rows:
            end = start + count
            outputs = [pb_utils.Tensor("probabilities", x[start:end]), pb_utils.Tensor("label", label[start:end])]
            responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
            start = end
        return responses
