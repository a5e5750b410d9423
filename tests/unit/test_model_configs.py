"""The model repository (``inference/repository.py``): config parsing and its errors, version folders and policies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inferencehub.errors import ConfigError
from inferencehub.inference.repository import (
    SHIPPED_MODELS,
    expand,
    load_config,
    load_repository,
    parse_config,
    version_folders,
)
from inferencehub.model import Batching, Scheduling, TensorSpec, VersionPolicy

TENSOR = {"name": "x", "datatype": "FP32", "shape": [-1, 4]}


def mock(**changes) -> dict:
    config = {"name": "m", "runtime": "mock", "inputs": [TENSOR], "outputs": [{**TENSOR, "name": "y"}]}
    config.update(changes)
    return {k: v for k, v in config.items() if v is not None}


def parse(raw, folder: Path):
    return parse_config(raw, folder / "config.json")


def refused(raw, folder: Path, field: str, problem: str):
    with pytest.raises(ConfigError) as caught:
        parse(raw, folder)
    message = str(caught.value)
    assert message.startswith(f"{folder / 'config.json'}: {field}: "), message
    assert problem in message, message


def test_a_minimal_config(tmp_path):
    config = parse(mock(), tmp_path)
    assert (config.name, config.version, config.runtime, config.platform) == ("m", "1", "mock", "inferencehub_mock")
    assert config.inputs == (TensorSpec("x", "FP32", (-1, 4)),)
    assert config.batching is None and config.scheduling == Scheduling() and config.version_policy == VersionPolicy()
    assert config.directory == tmp_path.resolve()


def test_an_integer_version_is_a_string(tmp_path):
    assert parse(mock(version=3), tmp_path).version == "3"


def test_batching_and_scheduling(tmp_path):
    config = parse(
        mock(
            batching={"max_batch_size": 8, "max_queue_delay_ms": 2, "preferred_batch_sizes": [8, 4, 4]},
            scheduling={"max_concurrency": 2, "max_queue_size": 0},
        ),
        tmp_path,
    )
    assert config.batching == Batching(8, 2.0, (4, 8))
    assert config.scheduling == Scheduling(2, 0)


@pytest.mark.parametrize(
    ("raw", "field", "problem"),
    [
        ([], "(top level)", "expected a JSON object"),
        (mock(colour="red"), "colour", "unknown field"),
        (mock(name="bad name"), "name", "expected a model name"),
        (mock(name=""), "name", "expected a model name"),
        (mock(version="1.0/x"), "version", 'expected a version string such as "1"'),
        (mock(version=True), "version", "expected a version string"),
        (mock(runtime="tensorflow"), "runtime", "expected one of mlp, mock, onnx, python, sklearn, got 'tensorflow'"),
        (mock(parameters=[]), "parameters", "expected a JSON object"),
        (mock(execution="gpu"), "execution", "expected one of thread, process, got 'gpu'"),
        (mock(platform=1), "platform", "expected a string"),
        (mock(inputs=[]), "inputs", "expected a non-empty list of tensors"),
        (mock(inputs=["x"]), "inputs[0]", "expected an object with name, datatype and shape"),
        (mock(inputs=[{**TENSOR, "dims": [1]}]), "inputs[0].dims", "unknown field"),
        (mock(inputs=[{**TENSOR, "name": ""}]), "inputs[0].name", "expected a non-empty string"),
        (mock(inputs=[{**TENSOR, "datatype": "FLOAT"}]), "inputs[0].datatype", "got 'FLOAT'"),
        (mock(inputs=[{**TENSOR, "shape": [0]}]), "inputs[0].shape", "each > 0 or -1"),
        (mock(inputs=[{**TENSOR, "shape": [-2]}]), "inputs[0].shape", "each > 0 or -1"),
        (mock(inputs=[{**TENSOR, "shape": [True]}]), "inputs[0].shape", "each > 0 or -1"),
        (mock(inputs=[{**TENSOR, "shape": []}]), "inputs[0].shape", "a non-empty list"),
        (mock(inputs=[TENSOR, TENSOR]), "inputs[1].name", "duplicate tensor name 'x'"),
        (mock(batching=8), "batching", "expected an object"),
        (mock(batching={"max_batch_size": 0}), "batching.max_batch_size", "expected an integer >= 1"),
        (mock(batching={"max_batch_size": 4, "delay": 1}), "batching.delay", "unknown field"),
        (mock(batching={"max_batch_size": 4, "max_queue_delay_ms": 10_001}), "batching.max_queue_delay_ms", "0 to"),
        (mock(batching={"max_batch_size": 4, "preferred_batch_sizes": [5]}), "batching.preferred_batch_sizes", "(4)"),
        (
            mock(inputs=[{**TENSOR, "shape": [2, 4]}], batching={"max_batch_size": 4}),
            "inputs[0].shape",
            "batching stacks requests along the first dimension: it must be -1",
        ),
        (mock(scheduling={"max_concurrency": 0}), "scheduling.max_concurrency", "expected an integer >= 1"),
        (mock(scheduling={"max_queue_size": -1}), "scheduling.max_queue_size", "expected an integer >= 0"),
        (mock(scheduling={"workers": 1}), "scheduling.workers", "unknown field"),
        (mock(version_policy={"newest": {}}), "version_policy", "expected one of"),
        (mock(version_policy={"all": {}, "latest": {}}), "version_policy", "expected one of"),
        (mock(version_policy={"latest": {"num_versions": 0}}), "version_policy.latest.num_versions", ">= 1"),
        (mock(version_policy={"specific": {"versions": []}}), "version_policy.specific.versions", "non-empty list"),
        (mock(version_policy={"specific": {"versions": ["1"]}}), "version_policy.specific.versions", "version numbers"),
        (mock(parameters={"mode": "nap"}), "parameters.mode", "nap"),
    ],
)
def test_a_bad_config_names_its_file_and_field(tmp_path, raw, field, problem):
    refused(raw, tmp_path, field, problem)


@pytest.mark.parametrize(
    ("raw", "policy"),
    [
        ({"all": {}}, VersionPolicy("all")),
        ({"latest": {"num_versions": 2}}, VersionPolicy("latest", 2)),
        ({"specific": {"versions": [1, 3]}}, VersionPolicy("specific", versions=("1", "3"))),
    ],
)
def test_version_policies(tmp_path, raw, policy):
    assert parse(mock(version_policy=raw), tmp_path).version_policy == policy


def test_version_policies_select_numerically():
    available = ["10", "9", "2", "1"]
    assert VersionPolicy().select(available) == ["10"]
    assert VersionPolicy("latest", 3).select(available) == ["2", "9", "10"]
    assert VersionPolicy("all").select(available) == ["1", "2", "9", "10"]
    assert VersionPolicy("specific", versions=("9", "4")).select(available) == ["9"]


def test_version_folders_name_the_versions(tmp_path):
    for name in ("10", "2", "notes", "3a"):
        (tmp_path / name).mkdir()
    (tmp_path / "7").write_text("a file, not a folder")
    assert version_folders(tmp_path) == ["2", "10"]
    assert version_folders(tmp_path / "missing") == []
    config = parse(mock(), tmp_path)
    assert config.version == "10"
    refused(mock(version="1"), tmp_path, "version", "the folder has version folders (2, 10")


def test_expand_serves_the_versions_the_policy_selects(tmp_path):
    for name in ("1", "2", "3"):
        (tmp_path / name).mkdir()
    configs = expand(parse(mock(version_policy={"latest": {"num_versions": 2}}), tmp_path))
    assert [(c.version, c.directory.name) for c in configs] == [("2", "2"), ("3", "3")]
    with pytest.raises(ConfigError, match=r"version_policy: selects none of the versions \(1, 2, 3\)"):
        expand(parse(mock(version_policy={"specific": {"versions": [4]}}), tmp_path))
    with pytest.raises(ConfigError, match="a process-executed model serves one version at a time"):
        expand(parse(mock(execution="process", version_policy={"all": {}}), tmp_path))


def test_load_config_reports_json_errors_with_their_place(tmp_path):
    source = tmp_path / "config.json"
    source.write_text('{"name": "m",\n  "runtime": }')
    with pytest.raises(ConfigError, match=r"config.json: invalid JSON at line 2 column 14"):
        load_config(source)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.json")


def test_load_repository_refuses_two_models_of_one_name(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "config.json").write_text(json.dumps(mock()))
    with pytest.raises(ConfigError, match=r"b/config.json: name: model 'm' is also defined in .*a/config.json"):
        load_repository(tmp_path)


def test_load_repository_needs_a_folder_with_configs(tmp_path):
    with pytest.raises(ConfigError, match="model repository is not a folder"):
        load_repository(tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"no model configs found \(expected <model>/config.json\)"):
        load_repository(tmp_path)


def test_the_shipped_models_parse():
    names = {c.name for c in load_repository(SHIPPED_MODELS)}
    assert {"iris", "mock"} <= names
