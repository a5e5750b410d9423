"""The benchmark scripts run end to end (quick mode: short runs, no timing assertions)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from run import BENCHMARKS


@pytest.mark.timeout(660)  # every benchmark in quick mode (MLServer among the servers); the run stops first
def test_every_benchmark_runs_and_writes_a_table_and_a_plot(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in BENCHMARKS:
        report = (tmp_path / f"{name}.md").read_text()
        assert report.startswith("# ") and "Machine: " in report and "quick mode" in report
        table = [line for line in report.splitlines() if line.startswith("| ")]
        assert len(table) >= 3, name  # a header and rows
        png = (tmp_path / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 5000, name
        # A verdict line for each (after the table, for a benchmark that prints one).
        assert re.search(rf"== {name} \.\.\.\n(\|.*\n)*   \S", done.stdout), name


def test_committed_results_are_complete_and_linked():
    results = ROOT / "benchmarks" / "results"
    readme = (ROOT / "docs" / "benchmarks.md").read_text() + (ROOT / "benchmarks" / "README.md").read_text()
    for name in BENCHMARKS:
        report = (results / f"{name}.md").read_text()
        assert "Machine: " in report and "quick mode" not in report, name
        assert (results / f"{name}.png").exists()
        assert f"results/{name}.md" in readme


@pytest.mark.timeout(200)
def test_the_streaming_benchmark_prints_its_table(tmp_path):
    """The streaming benchmark alone, quick: it prints a row per path and concurrency with no failed stream, every
    path streamed the same text, and the report names the load average."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import peers

    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--only", "streaming", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    paths = ["InferenceHub gateway, SSE", "InferenceHub replica, direct gRPC"]
    if peers.triton_missing() is None:
        paths += ["Triton, SSE", "Triton, gRPC"]
    rows = [line.split(" | ") for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert [(row[0].strip("| "), row[1]) for row in rows[1:]] == [(p, c) for p in paths for c in ("1", "4")]
    assert all(int(row[2]) > 0 and row[-1].strip(" |") == "0" for row in rows[1:])  # streams read, none failed
    report = (tmp_path / "streaming.md").read_text()
    assert "Every path streamed the same text" in report and "load average" in report
