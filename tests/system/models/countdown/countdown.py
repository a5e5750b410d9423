"""A decoupled model written as a plain generator: each step runs in the replica's thread pool."""

import time

import numpy as np

from inferencehub.errors import InvalidInput
from inferencehub.model import Model


class Countdown(Model):
    def generate(self, inputs):
        start = int(inputs["start"][0])
        if start < 0:
            raise InvalidInput(f"input 'start' is {start}: expected 0 or more")
        for i in range(start, 0, -1):
            time.sleep(0.001)  # blocking is fine here: not on the event loop
            yield {"count": np.array([i], dtype=np.int32)}
        # No final response marked: the replica sends an empty final one.
