"""Model configs: the shipped ones load; a bad one stops start-up naming the file and the field."""

from __future__ import annotations

import json

import pytest

from inferencehub.errors import ConfigError
from inferencehub.inference.repository import load_repository

from conftest import EXAMPLE_MODELS, SHIPPED, failed_start

GOOD = {
    "name": "m",
    "runtime": "mock",
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1]}],
    "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1]}],
}


def test_shipped_and_example_models_load():
    names = {c.name for c in load_repository(SHIPPED)}
    assert names == {"digits", "iris", "mock", "mock-heavy", "mock-llm"}
    heavy = next(c for c in load_repository(SHIPPED) if c.name == "mock-heavy")
    assert heavy.execution == "process"
    assert [c.name for c in load_repository(EXAMPLE_MODELS)] == ["word-count"]


BAD = [
    ({**GOOD, "name": "bad name!"}, "name"),
    ({**GOOD, "runtime": "tensorflow"}, "runtime"),
    ({**GOOD, "version": [1]}, "version"),
    ({**GOOD, "colour": "blue"}, "colour"),
    ({**GOOD, "execution": "gpu"}, "execution"),
    ({**GOOD, "inputs": []}, "inputs"),
    ({**GOOD, "inputs": [{"name": "input", "datatype": "FP8", "shape": [-1]}]}, "inputs[0].datatype"),
    ({**GOOD, "inputs": [{"name": "input", "datatype": "FP32", "shape": [0]}]}, "inputs[0].shape"),
    ({**GOOD, "inputs": [{"name": "input", "datatype": "FP32", "shape": "[-1]"}]}, "inputs[0].shape"),
    ({**GOOD, "inputs": [{"datatype": "FP32", "shape": [-1]}]}, "inputs[0].name"),
    ({**GOOD, "outputs": [{"name": "o", "datatype": "FP32", "shape": [-1], "dims": 1}]}, "outputs[0].dims"),
    ({**GOOD, "parameters": {"mode": "nap"}}, "parameters.mode"),
    ({**GOOD, "parameters": {"latency": {"distribution": "poisson"}}}, "parameters.latency.distribution"),
    ({**GOOD, "parameters": {"latency": {"distribution": "normal", "mean_ms": 5}}}, "parameters.latency.stddev_ms"),
    ({**GOOD, "parameters": {"latency": {"distribution": "fixed", "ms": -1}}}, "parameters.latency.ms"),
    ({**GOOD, "parameters": {"error_rate": 2}}, "parameters.error_rate"),
    ({**GOOD, "outputs": [{"name": "o", "datatype": "INT8", "shape": [-1]}]}, "parameters.mode"),
    ({**GOOD, "runtime": "mlp", "parameters": {"weights": "missing.npz"}}, "parameters.weights"),
    ({**GOOD, "runtime": "python", "parameters": {"class": "nowhere"}}, "parameters.class"),
    ({**GOOD, "runtime": "python", "parameters": {"class": "no_such_module:Model"}}, "parameters.class"),
    ({**GOOD, "runtime": "python", "parameters": {"class": "json:JSONDecoder"}}, "parameters.class"),
    ([1, 2], "(top level)"),
    ({**GOOD, "batching": {"max_batch_size": 0}}, "batching.max_batch_size"),
    ({**GOOD, "batching": {"max_batch_size": 8, "preferred_batch_sizes": [16]}}, "batching.preferred_batch_sizes"),
    ({**GOOD, "batching": {"max_batch_size": 8, "max_queue_delay_ms": -1}}, "batching.max_queue_delay_ms"),
    ({**GOOD, "batching": {"max_batch_size": 8, "size": 1}}, "batching.size"),
    (
        {
            **GOOD,
            "batching": {"max_batch_size": 8},
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [4]}],
            "outputs": [{"name": "output", "datatype": "FP32", "shape": [4]}],
        },
        "inputs[0].shape",
    ),
    ({**GOOD, "scheduling": {"max_concurrency": 0}}, "scheduling.max_concurrency"),
    ({**GOOD, "scheduling": {"max_queue_size": -1}}, "scheduling.max_queue_size"),
    ({**GOOD, "runtime": "mlp", "parameters": {"random_features": {"seed": 0}}}, "parameters.random_features"),
]


@pytest.mark.parametrize(("config", "field"), BAD, ids=[f for _, f in BAD])
def test_bad_config_names_file_and_field(tmp_path, config, field):
    source = tmp_path / "m" / "config.json"
    source.parent.mkdir()
    source.write_text(json.dumps(config))
    with pytest.raises(ConfigError) as err:
        load_repository(tmp_path)
    assert str(err.value).startswith(f"{source}: {field}:"), str(err.value)


def test_invalid_json_and_duplicates(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.json").write_text('{"name": "m",')
    with pytest.raises(ConfigError, match=r"a/config.json: invalid JSON at line 1"):
        load_repository(tmp_path)
    (tmp_path / "a" / "config.json").write_text(json.dumps(GOOD))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text(json.dumps(GOOD))
    with pytest.raises(ConfigError, match=r"b/config.json: name: model 'm' is also defined in .*a/config.json"):
        load_repository(tmp_path)
    with pytest.raises(ConfigError, match="no model configs"):
        load_repository(tmp_path / "a")


def test_server_refuses_to_start_with_a_bad_config(tmp_path):
    source = tmp_path / "m" / "config.json"
    source.parent.mkdir()
    source.write_text(json.dumps({**GOOD, "inputs": [{"name": "input", "datatype": "FP32", "shape": [0]}]}))
    done = failed_start("--models", str(tmp_path), timeout=30)
    assert done.returncode == 2
    assert f"{source}: inputs[0].shape:" in done.stderr
    assert "Traceback" not in done.stderr


def test_model_that_fails_to_load_stops_start_up(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "broken_model.py").write_text(
        "from inferencehub.model import Model\n"
        "class Broken(Model):\n"
        "    def load(self):\n"
        "        raise RuntimeError('weights are corrupt')\n"
    )
    (folder / "config.json").write_text(
        json.dumps({**GOOD, "name": "broken", "runtime": "python", "parameters": {"class": "broken_model:Broken"}})
    )
    done = failed_start("--models", str(tmp_path), "--processes", "1", timeout=60)
    assert done.returncode == 2
    assert "broken/config.json: model 'broken' failed to load" in done.stderr
    assert "weights are corrupt" in done.stderr
