"""`mock-llm` as a decoupled Triton Python-backend model, for the peer rows of the streaming benchmark.

The same inputs and outputs as InferenceHub's shipped `mock-llm` (``text_input`` BYTES in, one ``text_output``
token a response, the last one flagged final; Triton 2.51's Python backend cannot set response parameters, so the
usage counts InferenceHub's final response carries are left out), the same deterministic text for a prompt (from
the same vocabulary, the model's ``vocabulary`` parameter) and the same timing, slept on an event loop as mock-llm
does: the first token ``first_token_ms`` after the request, each further one ``token_ms`` after the previous.
``execute`` is a coroutine (the Python backend runs it on its event loop and takes the next requests meanwhile),
so one model instance serves any number of streams at a time; a cancelled request (the client hung up) stops
generating. It runs in Triton's Python-backend stub, on the system's Python 3.11, never in the project's
environment.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random

import numpy as np
import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def tokens(prompt: str, count: int, vocabulary: list[str]) -> list[str]:
    """mock-llm's first ``count`` tokens for ``prompt`` (``inferencehub.inference.runtimes.mock_llm.tokens``, which
    the stub cannot import: words drawn from its vocabulary by a generator seeded with the prompt; the benchmark
    checks that both servers stream the same text)."""
    rng = random.Random(hashlib.blake2b(prompt.encode(), digest_size=8).digest())
    return [("" if i == 0 else " ") + rng.choice(vocabulary) for i in range(count)]


class TritonPythonModel:
    def initialize(self, args):
        parameters = json.loads(args["model_config"])["parameters"]
        self.first = float(parameters["first_token_ms"]["string_value"]) / 1000
        self.each = float(parameters["token_ms"]["string_value"]) / 1000
        self.vocabulary = parameters["vocabulary"]["string_value"].split()

    async def execute(self, requests):
        await asyncio.gather(*(self.generate(request) for request in requests))
        return None

    async def generate(self, request):
        sender = request.get_response_sender()
        try:
            prompt = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)[0]
            prompt = prompt.decode() if isinstance(prompt, bytes) else str(prompt)
            limit = pb_utils.get_input_tensor_by_name(request, "max_tokens")
            count = int(limit.as_numpy().reshape(-1)[0]) if limit is not None else 16
            words = tokens(prompt, count, self.vocabulary)
            await asyncio.sleep(self.first)
            for i, word in enumerate(words):
                if i:
                    await asyncio.sleep(self.each)
                if sender.is_cancelled():
                    sender.send(flags=FINAL)
                    return
                output = pb_utils.Tensor("text_output", np.array([word.encode()], dtype=np.object_))
                last = i == len(words) - 1
                sender.send(pb_utils.InferenceResponse(output_tensors=[output]), flags=FINAL if last else 0)
        except Exception as exc:  # a failed request still ends its stream, with the error
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))), flags=FINAL)
