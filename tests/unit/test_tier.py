"""The unit tier stays in-process: no tritonclient in this process, no network, and ``pytest`` alone (the system
tests) leaves this folder to its own process."""

from __future__ import annotations

import re
import socket
import sys
import tomllib
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent
ROOT = UNIT.parent.parent


def test_no_unit_test_imports_tritonclient():
    importing = re.compile(r"^\s*(import|from)\s+tritonclient\b", re.MULTILINE)
    offenders = [p.name for p in UNIT.glob("*.py") if importing.search(p.read_text())]
    assert offenders == []
    assert "tritonclient" not in sys.modules


def test_the_protocol_messages_are_ours():
    from inferencehub.protocol.inference import grpc_predict_v2_pb2 as pb

    assert pb.ModelInferRequest.__module__ == "inferencehub.protocol.inference.grpc_predict_v2_pb2"


def test_the_network_is_out_of_reach():
    with pytest.raises(AssertionError, match="tried to open a network connection"):
        socket.create_connection(("127.0.0.1", 9), timeout=1)
    with socket.socket() as s, pytest.raises(AssertionError, match="listen on a port"):
        s.bind(("127.0.0.1", 0))


def test_plain_pytest_runs_the_system_tests_without_this_tier():
    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert options["testpaths"] == ["tests/system"]
    assert "unit" in options["norecursedirs"]
    recipe = re.search(r"^test:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.MULTILINE).group(1)
    unit = recipe.index("-m pytest tests/unit")
    system = recipe.index("-m pytest tests/system ")
    assert unit < system  # two processes: this tier first, then the system tests
