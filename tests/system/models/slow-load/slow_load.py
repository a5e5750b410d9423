"""A test model that takes a while to load and to predict, to observe health transitions."""

import time

import numpy as np

from inferencehub.model import Model


class SlowLoad(Model):
    def load(self) -> None:
        time.sleep(float(self.config.parameters.get("load_seconds", 2.0)))

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"output": inputs["input"]}
