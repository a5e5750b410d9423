"""The generative mock: a stand-in LLM that streams words (``runtime: mock`` with ``"decoupled": true``).

Tensors (checked at load)::

    inputs:  text_input  BYTES [1]   the prompt (UTF-8)
             max_tokens  INT32 [1]   optional: tokens to generate, default 16, at most 4096
             stop        BYTES [-1]  optional: stop strings
    outputs: text_output BYTES [1]   each response: the next token's text

Tokens are words; every token after the first starts with a space. The words are drawn from a fixed
vocabulary by a generator seeded with the prompt, so the same prompt always gives the same tokens
(whatever the replica or process). Generation stops after ``max_tokens`` tokens (``finish_reason``
"length") or when the text so far contains a stop string ("stop"): the text is cut before the stop
string, and text that might be the start of a stop string is held back until the next token tells.
The final response carries ``finish_reason``, ``prompt_tokens`` (words in the prompt, ``str.split()``)
and ``completion_tokens`` (tokens generated, the one that completed a stop string included).

Parameters (all optional)::

    "first_token_latency": a latency distribution (as the mock's ``latency``), before the first token
    "token_latency":       a latency distribution, before each later token
    "error_rate": 0.0      share of generations that fail on purpose after their first token, for drills
    "seed": 0              seed of the latency and error draws (not of the text: the prompt seeds that)
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import AsyncIterator, Iterable

import numpy as np

from inferencehub.errors import ConfigError, InvalidInput, ModelError
from inferencehub.inference.runtimes import mock, params
from inferencehub.model import Model, ModelConfig, Response, TensorSpec

DEFAULT_MAX_TOKENS = 16
MAX_TOKENS = 4096
PARAMETERS = ("first_token_latency", "token_latency", "error_rate", "seed")
INPUTS = (
    TensorSpec("text_input", "BYTES", (1,)),
    TensorSpec("max_tokens", "INT32", (1,), optional=True),
    TensorSpec("stop", "BYTES", (-1,), optional=True),
)
OUTPUTS = (TensorSpec("text_output", "BYTES", (1,)),)
WORDS = (
    "the a model token stream replica gateway answer light river stone cloud quiet bright seven "
    "small large early late north south east west window garden paper signal number letter "
    "green blue red silver golden morning evening winter summer autumn spring ocean mountain "
    "forest field city road bridge tower engine wheel circle square line point edge center "
    "simple careful patient rapid steady gentle open closed ready"
)
VOCABULARY = tuple(WORDS.split())


def tokens(prompt: str) -> Iterable[str]:
    """The endless token sequence for ``prompt``: words, each after the first with a leading space."""
    rng = random.Random(hashlib.blake2b(prompt.encode(), digest_size=8).digest())
    yield rng.choice(VOCABULARY)
    while True:
        yield " " + rng.choice(VOCABULARY)


class StopMatcher:
    """Cuts generated text at the first stop string, holding back text that may be the start of one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Text that is safe to send now, and whether a stop string was reached (then nothing more is sent)."""
        self.held += text
        found = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if found:
            out, self.held = self.held[: min(found)], ""
            return out, True
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.held.endswith(s[:k])), default=0)
        out = self.held[: len(self.held) - keep]
        self.held = self.held[len(out) :]
        return out, False

    def flush(self) -> str:
        """The text held back, when generation ends without a stop."""
        out, self.held = self.held, ""
        return out


def _text(array: np.ndarray, name: str) -> str:
    value = array.reshape(-1)[0]
    try:
        return value.decode() if isinstance(value, bytes) else str(value)
    except UnicodeDecodeError:
        raise InvalidInput(f"input '{name}': expected UTF-8 text") from None


def read_request(name: str, inputs: dict[str, np.ndarray]) -> tuple[str, int, list[str]]:
    """The prompt, max_tokens and stop strings of a request; INVALID_ARGUMENT naming what is wrong."""
    prompt = _text(inputs["text_input"], "text_input")
    max_tokens = DEFAULT_MAX_TOKENS
    if "max_tokens" in inputs:
        max_tokens = int(inputs["max_tokens"].reshape(-1)[0])
        if not 1 <= max_tokens <= MAX_TOKENS:
            raise InvalidInput(f"model '{name}': input 'max_tokens' is {max_tokens}: expected 1 to {MAX_TOKENS}")
    stops = [_text(np.array([s], dtype=object), "stop") for s in inputs.get("stop", np.array([], dtype=object))]
    return prompt, max_tokens, stops


def resolve(config: ModelConfig) -> type[Model]:
    unknown = sorted(set(config.parameters) - set(PARAMETERS))
    if unknown:
        expected = ", ".join(PARAMETERS)
        raise params.error(config, unknown[0], f"unknown parameter for a decoupled mock (expected {expected})")
    for key in ("first_token_latency", "token_latency"):
        mock.parse_latency(config, key)
    params.number(config, config.parameters, "error_rate", "error_rate", maximum=1.0, default=0.0)
    params.number(config, config.parameters, "seed", "seed", default=0)
    tensors: tuple[tuple[str, tuple[TensorSpec, ...], tuple[TensorSpec, ...]], ...] = (
        ("inputs", config.inputs, INPUTS),
        ("outputs", config.outputs, OUTPUTS),
    )
    for key, specs, wanted in tensors:
        if specs != wanted:
            raise ConfigError(
                f"{config.source}: {key}: a decoupled mock's {key} are exactly {describe(wanted)} "
                f"(got {describe(specs)})"
            )
    return LanguageMock


def describe(specs: tuple[TensorSpec, ...]) -> str:
    described = (f"{s.name} {s.datatype} {list(s.shape)}{' (optional)' if s.optional else ''}" for s in specs)
    return ", ".join(described) or "none"


def _token(text: str) -> dict[str, np.ndarray]:
    return {"text_output": np.array([text.encode()], dtype=object)}


class LanguageMock(Model):
    """Streams the prompt's tokens, sleeping (no CPU) the configured latencies; runs on the event loop."""

    def load(self) -> None:
        self.first_latency = mock.parse_latency(self.config, "first_token_latency")
        self.token_latency = mock.parse_latency(self.config, "token_latency")
        self.error_rate = float(self.config.parameters.get("error_rate", 0.0))
        self.rng = random.Random(self.config.parameters.get("seed", 0))

    async def generate(self, inputs: dict[str, np.ndarray]) -> AsyncIterator[Response]:
        prompt, max_tokens, stops = read_request(self.config.name, inputs)
        fail = self.error_rate and self.rng.random() < self.error_rate
        matcher = StopMatcher(stops)
        usage = {"prompt_tokens": len(prompt.split())}
        for count, word in enumerate(tokens(prompt), start=1):
            await asyncio.sleep((self.first_latency if count == 1 else self.token_latency).sample(self.rng))
            if fail and count == 2:
                raise ModelError(f"mock model '{self.config.name}': injected failure (error_rate={self.error_rate})")
            text, stopped = matcher.feed(word)
            if stopped or count == max_tokens:
                final = {"finish_reason": "stop" if stopped else "length", "completion_tokens": count, **usage}
                yield Response(_token(text if stopped else text + matcher.flush()), final, final=True)
                return
            if text:
                yield Response(_token(text))
