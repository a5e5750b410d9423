"""A test model that kills the whole replica process on every call: a job that keeps killing replicas."""

import os
import signal

import numpy as np

from inferencehub.model import Model


class Crasher(Model):
    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        os.kill(os.getpid(), signal.SIGKILL)
        return {"output": inputs["input"]}
