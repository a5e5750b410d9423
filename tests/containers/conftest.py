"""tests/containers (`make test-containers`) shares the system tier's harness, ``tests/system/conftest.py``: this
conftest loads it and hands on what the container tests use, so ``from conftest import ROOT, wait_for`` works here
as it does in tests/system."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "system_harness", Path(__file__).resolve().parents[1] / "system" / "conftest.py"
)
assert _spec and _spec.loader
_harness = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _harness
_spec.loader.exec_module(_harness)

ROOT = _harness.ROOT
wait_for = _harness.wait_for
