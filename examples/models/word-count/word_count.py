"""A custom model: counts the words in each text and upper-cases it.

Serve it with ``inferencehub inference --models examples/models``.
"""

from __future__ import annotations

import numpy as np

from inferencehub.model import Model


class WordCount(Model):
    def load(self) -> None:
        # Load weights, vocabularies... here; config parameters are in self.config.parameters.
        self.separator = self.config.parameters.get("separator", " ").encode()

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = inputs["text"]  # BYTES: an object array of bytes, shape [n]
        words = np.array([len([w for w in t.split(self.separator) if w]) for t in texts], dtype=np.int64)
        upper = np.array([t.upper() for t in texts], dtype=object)
        return {"words": words, "upper": upper}
