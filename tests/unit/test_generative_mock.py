"""The generative mock's pure parts (``runtimes/mock_llm.py``) and the checks of decoupled model configs."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from inferencehub.errors import ConfigError, InvalidInput, ModelError
from inferencehub.inference.repository import SHIPPED_MODELS, load_config, parse_config
from inferencehub.inference.runtimes import build
from inferencehub.inference.runtimes.mock_llm import MAX_TOKENS, VOCABULARY, StopMatcher, read_request, tokens
from inferencehub.model import Response

LLM = json.loads((SHIPPED_MODELS / "mock-llm" / "config.json").read_text())
FAST = {"first_token_latency": {"distribution": "fixed", "ms": 0}, "token_latency": {"distribution": "fixed", "ms": 0}}


def first(prompt: str, n: int) -> list[str]:
    sequence = iter(tokens(prompt))
    return [next(sequence) for _ in range(n)]


def test_tokens_are_words_from_the_prompt_the_first_without_a_leading_space():
    words = first("hello there", 50)
    assert words[0] in VOCABULARY and all(w.startswith(" ") and w[1:] in VOCABULARY for w in words[1:])
    assert first("hello there", 50) == words  # deterministic
    assert first("hello there!", 50) != words
    assert len("".join(words).split()) == 50  # the tokenizer for counts: str.split()


def feed_all(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    matcher = StopMatcher(stops)
    sent = []
    for piece in pieces:
        out, stopped = matcher.feed(piece)
        sent.append(out)
        if stopped:
            return "".join(sent), True
    return "".join(sent) + matcher.flush(), False


def test_stop_matcher_holds_back_a_possible_start_and_cuts_before_the_stop():
    matcher = StopMatcher([" blue sky"])
    assert matcher.feed("the") == ("the", False)
    assert matcher.feed(" blue") == ("", False)  # may be the start of " blue sky"
    assert matcher.feed(" sky") == ("", True)
    matcher = StopMatcher([" blue sky"])
    matcher.feed("the")
    matcher.feed(" blue")
    assert matcher.feed(" river") == (" blue river", False)  # it was not: released with the next token
    assert StopMatcher(["x"]).feed("abxcd") == ("ab", True)
    assert StopMatcher([]).feed(" any") == (" any", False)
    held = StopMatcher([" blue sky"])
    held.feed(" blue")
    assert held.flush() == " blue"  # generation ended (length): nothing is lost


@given(
    st.lists(st.sampled_from(["a", " b", " ab", "c", " ba", "bc"]), max_size=12),
    st.lists(st.text(alphabet="abc ", min_size=1, max_size=4), max_size=3),
)
def test_stop_matcher_sends_exactly_the_text_before_the_first_stop(pieces, stops):
    text = "".join(pieces)
    sent, stopped = feed_all(stops, pieces)
    cuts = [text.find(s) for s in stops if s in text]
    if stopped:
        assert cuts and sent == text[: min(cuts)] and not any(s in sent for s in stops)
    else:
        # No stop string was ever complete in the text seen: all of it is sent.
        assert sent == text


def arrays(prompt="hi there", max_tokens=None, stop=None) -> dict[str, np.ndarray]:
    inputs = {"text_input": np.array([prompt.encode()], dtype=object)}
    if max_tokens is not None:
        inputs["max_tokens"] = np.array([max_tokens], dtype=np.int32)
    if stop is not None:
        inputs["stop"] = np.array([s.encode() for s in stop], dtype=object)
    return inputs


def test_read_request_defaults_and_bounds():
    assert read_request("m", arrays()) == ("hi there", 16, [])
    assert read_request("m", arrays(max_tokens=4096, stop=["a", "b"])) == ("hi there", 4096, ["a", "b"])
    for bad in (0, -1, MAX_TOKENS + 1):
        with pytest.raises(InvalidInput, match=rf"model 'm': input 'max_tokens' is {bad}: expected 1 to 4096"):
            read_request("m", arrays(max_tokens=bad))
    with pytest.raises(InvalidInput, match=r"text_input.*UTF-8"):
        read_request("m", {"text_input": np.array([b"\xff\xfe"], dtype=object)})


def generate(config: dict, folder: Path, inputs: dict[str, np.ndarray]) -> list[Response]:
    model = build(parse_config(config, folder / "config.json"))

    async def collect() -> list[Response]:
        return [r async for r in model.generate(inputs)]  # type: ignore[union-attr]

    return asyncio.run(collect())


def test_the_generative_mock_streams_tokens_and_ends_with_its_final_parameters(tmp_path):
    config = {**LLM, "parameters": FAST}
    got = generate(config, tmp_path, arrays("one two three", max_tokens=4))
    assert [r.final for r in got] == [False, False, False, True]
    texts = [r.outputs["text_output"][0].decode() for r in got]
    assert texts == first("one two three", 4)
    assert got[-1].parameters == {"finish_reason": "length", "prompt_tokens": 3, "completion_tokens": 4}
    stopped = generate(config, tmp_path, arrays("one two three", max_tokens=4, stop=[texts[2]]))
    assert "".join(r.outputs["text_output"][0].decode() for r in stopped) == "".join(texts[:2])
    assert stopped[-1].final and stopped[-1].parameters["finish_reason"] == "stop"
    assert stopped[-1].parameters["completion_tokens"] == 3


def test_shipped_mock_llm_is_decoupled_on_the_event_loop():
    config = load_config(SHIPPED_MODELS / "mock-llm" / "config.json")
    assert config.decoupled and config.execution == "thread"
    assert [(s.name, s.optional) for s in config.inputs] == [
        ("text_input", False),
        ("max_tokens", True),
        ("stop", True),
    ]


@pytest.mark.parametrize(
    ("change", "field", "problem"),
    [
        ({"decoupled": "yes"}, "decoupled", "expected true"),
        ({"parameters": {"latency": {"distribution": "fixed", "ms": 1}}}, "parameters.latency", "unknown parameter"),
        ({"parameters": {"token_latency": {"distribution": "gamma"}}}, "parameters.token_latency.distribution", ""),
        ({"parameters": {"first_token_latency": {"distribution": "fixed", "ms": -1}}}, "parameters.first_token", ""),
        ({"parameters": {"error_rate": 2}}, "parameters.error_rate", "between 0.0 and 1.0"),
        ({"outputs": [{"name": "text", "datatype": "BYTES", "shape": [1]}]}, "outputs", "text_output BYTES [1]"),
        ({"inputs": LLM["inputs"][:1]}, "inputs", "max_tokens INT32 [1] (optional)"),
        ({"execution": "process"}, "execution", "cannot run in worker processes"),
    ],
)
def test_generative_mock_config_errors_name_the_field(tmp_path, change, field, problem):
    with pytest.raises(ConfigError) as caught:
        parse_config({**LLM, **change}, tmp_path / "config.json")
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'config.json'}: {field}"), message
    assert problem in message, message


def test_optional_is_for_inputs_only(tmp_path):
    outputs = [{"name": "text_output", "datatype": "BYTES", "shape": [1], "optional": True}]
    with pytest.raises(ConfigError, match=r"outputs\[0\]\.optional: unknown field"):
        parse_config({**LLM, "outputs": outputs}, tmp_path / "config.json")


def write_python_model(folder: Path, source: str, **config) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "gen.py").write_text(source)
    raw = {
        "name": folder.name,  # one name per model: its module is imported under it
        "runtime": "python",
        "inputs": [{"name": "n", "datatype": "INT32", "shape": [1]}],
        "outputs": [{"name": "i", "datatype": "INT32", "shape": [1]}],
        "parameters": {"class": "gen:Gen"},
        **config,
    }
    (folder / "config.json").write_text(json.dumps(raw))
    return folder / "config.json"


ASYNC_GEN = """
import numpy as np
from inferencehub.model import Model

class Gen(Model):
    async def generate(self, inputs):
        for i in range(int(inputs["n"][0])):
            yield {"i": np.array([i], dtype=np.int32)}
"""

NO_GENERATOR = """
from inferencehub.model import Model

class Gen(Model):
    def generate(self, inputs):
        return [{"i": 1}]
"""


def test_python_decoupled_models_default_to_the_replica_and_refuse_what_cannot_stream(tmp_path):
    config = load_config(write_python_model(tmp_path / "a", ASYNC_GEN, decoupled=True))
    assert config.decoupled and config.execution == "thread"  # python models default to process otherwise
    with pytest.raises(ConfigError, match=r"execution: a decoupled model cannot run in worker processes"):
        load_config(write_python_model(tmp_path / "b", ASYNC_GEN, decoupled=True, execution="process"))
    with pytest.raises(ConfigError, match=r'implements generate .*set "decoupled": true'):
        load_config(write_python_model(tmp_path / "c", ASYNC_GEN))
    with pytest.raises(ConfigError, match=r"generate must be a generator"):
        load_config(write_python_model(tmp_path / "d", NO_GENERATOR, decoupled=True))
    with pytest.raises(ConfigError, match=r"is decoupled but .* has no generate"):
        load_config(write_python_model(tmp_path / "e", "from inferencehub.model import Model as Gen\n", decoupled=True))


def test_error_rate_fails_a_generation_after_its_first_token(tmp_path):
    model = build(parse_config({**LLM, "parameters": {**FAST, "error_rate": 1.0}}, tmp_path / "config.json"))

    got: list[str] = []

    async def collect() -> None:
        async for response in model.generate(arrays("drill", max_tokens=5)):  # type: ignore[union-attr]
            got.append(response.outputs["text_output"][0].decode())

    with pytest.raises(ModelError, match=r"mock model 'mock-llm': injected failure"):
        asyncio.run(collect())
    assert got == first("drill", 1)  # the stream had started: the error arrives mid-stream
