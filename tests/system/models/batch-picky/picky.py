"""A batching test model that refuses a whole call when any row holds a negative value, after a pause.

One bad request coalesced with good ones makes the whole call fail: the gateway must then send each alone.
"""

import time

import numpy as np

from inferencehub.errors import InvalidInput
from inferencehub.model import Model


class Picky(Model):
    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        time.sleep(self.config.parameters["ms"] / 1000)
        x = inputs["x"]
        if (x < 0).any():
            raise InvalidInput("batch-picky: negative values are not accepted")
        return {"y": x * 2}
