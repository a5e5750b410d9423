"""Settings (``settings.py``): each dataclass field is a flag and an ``INFERENCEHUB_*`` env var."""

from __future__ import annotations

import argparse
import os
from dataclasses import fields
from pathlib import Path

import pytest

from inferencehub.errors import InferenceHubError
from inferencehub.gateway.coalescer import coalescer_for
from inferencehub.settings import (
    ENV_PREFIX,
    GatewaySettings,
    InferenceSettings,
    UpSettings,
    add_arguments,
    env_name,
    from_args,
)

ALL = [InferenceSettings, GatewaySettings, UpSettings]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """The tests set the env vars they need; none from the calling shell leaks in."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def parse(cls, *argv: str):
    parser = argparse.ArgumentParser(prog="test")
    add_arguments(parser, cls)
    return from_args(cls, parser.parse_args(list(argv)))


def refused(cls, capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as caught:
        parse(cls, *argv)
    assert caught.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("cls", ALL)
def test_no_flags_and_no_env_give_the_dataclass_defaults(cls):
    assert parse(cls) == cls()


@pytest.mark.parametrize("cls", ALL)
def test_every_field_has_a_flag_that_mentions_its_env_var(cls):
    parser = argparse.ArgumentParser()
    add_arguments(parser, cls)
    by_dest = {action.dest: action for action in parser._actions}
    for f in fields(cls):
        action = by_dest[f.name]
        assert env_name(f.name) in action.help
        assert f.metadata["help"] in action.help


def test_env_names():
    assert env_name("max_body_bytes") == "INFERENCEHUB_MAX_BODY_BYTES"


def test_flags_convert_to_the_field_types():
    settings = parse(GatewaySettings, "--port", "9000", "--deadline-seconds", "1.5", "--api-keys-file", "keys.txt")
    assert settings.port == 9000
    assert settings.deadline_seconds == 1.5
    assert settings.api_keys_file == Path("keys.txt")


def test_a_flag_can_have_another_name_than_its_field():
    assert parse(GatewaySettings, "--nats", "nats://127.0.0.1:4222").nats_url == "nats://127.0.0.1:4222"


def test_the_env_var_keeps_the_fields_name(monkeypatch):
    monkeypatch.setenv("INFERENCEHUB_NATS_URL", "nats://a:4222")
    assert parse(InferenceSettings).nats_url == "nats://a:4222"


def test_an_env_var_sets_the_default_and_a_flag_overrides_it(monkeypatch):
    monkeypatch.setenv("INFERENCEHUB_PORT", "9100")
    monkeypatch.setenv("INFERENCEHUB_RATE_LIMIT", "2.5")
    assert parse(GatewaySettings).port == 9100
    assert parse(GatewaySettings).rate_limit == 2.5
    assert parse(GatewaySettings, "--port", "9200").port == 9200


def test_a_bad_env_var_is_refused_by_name(monkeypatch, capsys):
    monkeypatch.setenv("INFERENCEHUB_THREADS", "four")
    assert "INFERENCEHUB_THREADS='four': expected int" in refused(InferenceSettings, capsys)


def test_a_bad_flag_value_is_refused(capsys):
    assert "argument --threads: invalid int value: '2.5'" in refused(InferenceSettings, capsys, "--threads", "2.5")


def test_an_env_var_outside_the_choices_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("INFERENCEHUB_MODEL_CONTROL_MODE", "sometimes")
    err = refused(InferenceSettings, capsys)
    assert "INFERENCEHUB_MODEL_CONTROL_MODE='sometimes': expected one of none, explicit, poll" in err


def test_a_flag_outside_the_choices_is_refused(capsys):
    err = refused(GatewaySettings, capsys, "--balancing", "random")
    assert "argument --balancing: invalid choice: 'random'" in err


def test_a_choice_from_the_env_is_taken(monkeypatch):
    monkeypatch.setenv("INFERENCEHUB_BALANCING", "round_robin")
    assert parse(GatewaySettings).balancing == "round_robin"


def test_a_repeated_flag_builds_a_comma_separated_list():
    assert parse(InferenceSettings, "--load", "a", "--load", "b,c").load == "a,b,c"


def test_repeated_flags_replace_the_env_vars_list(monkeypatch):
    monkeypatch.setenv("INFERENCEHUB_LOAD", "x,y")
    assert parse(InferenceSettings).load == "x,y"
    assert parse(InferenceSettings, "--load", "z").load == "z"


def test_unknown_flags_are_refused(capsys):
    assert "unrecognized arguments: --colour" in refused(UpSettings, capsys, "--colour", "red")


def test_help_shows_non_empty_defaults():
    parser = argparse.ArgumentParser()
    add_arguments(parser, GatewaySettings)
    helps = {action.dest: action.help for action in parser._actions}
    assert helps["port"].endswith("[env INFERENCEHUB_PORT, default 8080]")
    assert helps["nats_url"].endswith("[env INFERENCEHUB_NATS_URL]")


def test_an_empty_env_var_leaves_an_optional_path_unset(monkeypatch):
    # Set but empty (as a chart or compose file may leave it): unset, not the current folder.
    monkeypatch.setenv("INFERENCEHUB_API_KEYS_FILE", "")
    assert parse(GatewaySettings).api_keys_file is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"coalesce": "maybe"}, "--coalesce must be on or off, got 'maybe'"),
        ({"coalesce_max_delay_ms": -1.0}, "--coalesce-max-delay-ms must be from 0 to 1000 milliseconds, got -1.0"),
        ({"coalesce_max_delay_ms": 1001.0}, "got 1001.0"),
    ],
)
def test_coalescing_settings_are_checked(changes, message):
    with pytest.raises(InferenceHubError, match=message):
        coalescer_for(GatewaySettings(**changes), upstream=None, metrics=None)
