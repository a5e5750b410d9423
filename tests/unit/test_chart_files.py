"""The chart's plain files, checked in-process (rendering and cluster checks are in tests/system/test_chart.py):
its values against their schema, and every env var its templates set against the settings the services read."""

from __future__ import annotations

import copy
import json
import re
from dataclasses import fields
from pathlib import Path

import jsonschema
import pytest
import yaml

from inferencehub.settings import GatewaySettings, InferenceSettings, env_name

CHART = Path(__file__).resolve().parents[2] / "charts" / "inferencehub"
CLI_API_KEY = "INFERENCEHUB_API_KEY"


def validate(values: dict, schema: dict) -> None:
    jsonschema.Draft7Validator(schema).validate(values)  # the draft the schema names


@pytest.fixture(scope="module")
def values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads((CHART / "values.schema.json").read_text())


def test_the_default_values_satisfy_the_schema(values, schema):
    validate(values, schema)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda v: v.update(gatewayy={}), "'gatewayy' was unexpected"),
        (lambda v: v["gateway"].update(replicas="two"), "'two' is not of type 'integer'"),
    ],
)
def test_the_schema_refuses_misspelt_or_mistyped_values(values, schema, change, message):
    changed = copy.deepcopy(values)
    change(changed)
    with pytest.raises(jsonschema.ValidationError, match=message):
        validate(changed, schema)


def test_every_env_var_the_chart_sets_is_a_setting():
    known = {env_name(f.name) for cls in (GatewaySettings, InferenceSettings) for f in fields(cls)}
    known.add(CLI_API_KEY)  # the helm test pods run `inferencehub infer`, which reads its key from there
    set_by_chart = {
        name
        for template in (CHART / "templates").glob("*")
        if template.is_file()
        for name in re.findall(r"^\s*- name: (INFERENCEHUB_\w+)", template.read_text(), re.MULTILINE)
    }
    assert len(set_by_chart) > 20
    assert sorted(set_by_chart - known) == []


def test_the_dashboard_is_json():
    dashboard = json.loads((CHART / "files" / "grafana-dashboard.json").read_text())
    assert dashboard["panels"]
