"""The `iris` MLP as an MLServer custom runtime, for the MLServer peer rows of the overhead benchmark.

It loads the weights InferenceHub ships (``parameters.uri`` names the ``weights.npz``) and computes exactly what
InferenceHub's ``mlp`` runtime computes, with numpy, so both servers get the same body and do the same model work.
It runs in MLServer's own environment (scripts/tool-requirements/mlserver.txt), never in the project's.
"""

from __future__ import annotations

import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class IrisMLP(MLModel):
    async def load(self) -> bool:
        with np.load(self.settings.parameters.uri) as data:
            self.mean = data["mean"].astype(np.float32)
            self.scale = data["scale"].astype(np.float32)
            self.layers = []
            while f"w{len(self.layers)}" in data:
                i = len(self.layers)
                self.layers.append((data[f"w{i}"].astype(np.float32), data[f"b{i}"].astype(np.float32)))
        self.ready = True
        return self.ready

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        features = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32, copy=False)
        x = (features.reshape(-1, self.mean.shape[0]) - self.mean) / self.scale
        for i, (w, b) in enumerate(self.layers):
            x = x @ w + b
            if i < len(self.layers) - 1:
                np.maximum(x, 0.0, out=x)
        x = x - x.max(axis=1, keepdims=True)
        np.exp(x, out=x)
        x /= x.sum(axis=1, keepdims=True)
        label = x.argmax(axis=1).astype(np.int64)
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            id=payload.id,
            outputs=[NumpyCodec.encode_output("probabilities", x), NumpyCodec.encode_output("label", label)],
        )
