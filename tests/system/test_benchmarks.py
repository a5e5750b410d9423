"""The benchmark scripts run end to end (quick mode: short runs, no timing assertions).

Each benchmark is a test of its own and a unit of work of its own for ``make test``'s workers (conftest's
EACH_TEST_A_UNIT): they run side by side rather than one after another in a single test."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import peers
from run import BENCHMARKS

# The longest first (quick mode on 2 cores beside the other tests: overhead ~40 s, balancing ~35 s, the rest 3-20 s).
LONGEST_FIRST = ["overhead", "balancing", "scaling", "blocking", "streaming", "tracing"]
ORDER = LONGEST_FIRST + [name for name in BENCHMARKS if name not in LONGEST_FIRST]


def run_quick(name: str, out) -> str:
    """``run.py --only NAME --quick``; its output (the table and the verdict it prints)."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--only", name, "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.timeout(330)
@pytest.mark.parametrize("name", ORDER)
def test_the_benchmark_runs_and_writes_a_table_a_plot_and_a_verdict(name, tmp_path):
    assert sorted(ORDER) == sorted(BENCHMARKS)
    printed = run_quick(name, tmp_path)
    report = (tmp_path / f"{name}.md").read_text()
    assert report.startswith("# ") and "Machine: " in report and "quick mode" in report
    table = [line for line in report.splitlines() if line.startswith("| ")]
    assert len(table) >= 3, name  # a header and rows
    png = (tmp_path / f"{name}.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000, name
    # A verdict line (after the table, for a benchmark that prints one).
    assert re.search(rf"== {name} \.\.\.\n(\|.*\n)*   \S", printed), printed
    if name == "streaming":
        check_streaming(printed, report)


def check_streaming(printed: str, report: str) -> None:
    """A row per path and concurrency with no failed stream, every path streamed the same text, and the report
    names the load average."""
    paths = ["InferenceHub gateway, SSE", "InferenceHub replica, direct gRPC"]
    if peers.triton_missing() is None:
        paths += ["Triton, SSE", "Triton, gRPC"]
    rows = [line.split(" | ") for line in printed.splitlines() if line.startswith("| ") and "---" not in line]
    assert [(row[0].strip("| "), row[1]) for row in rows[1:]] == [(p, c) for p in paths for c in ("1", "4")]
    assert all(int(row[2]) > 0 and row[-1].strip(" |") == "0" for row in rows[1:])  # streams read, none failed
    assert "Every path streamed the same text" in report and "load average" in report


def test_committed_results_are_complete_and_linked():
    results = ROOT / "benchmarks" / "results"
    readme = (ROOT / "docs" / "benchmarks.md").read_text() + (ROOT / "benchmarks" / "README.md").read_text()
    for name in BENCHMARKS:
        report = (results / f"{name}.md").read_text()
        assert "Machine: " in report and "quick mode" not in report, name
        assert (results / f"{name}.png").exists()
        assert f"results/{name}.md" in readme
