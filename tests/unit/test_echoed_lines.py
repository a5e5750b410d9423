"""Children's logs are echoed line by line from a reader thread each (``up``, the gateway's workers): lines written
at the same moment come out whole, never one inside another."""

from __future__ import annotations

import io
import sys
import threading

from inferencehub.processes import write_line


def test_lines_echoed_from_many_threads_at_once_stay_whole(monkeypatch, tmp_path):
    # stderr as the servers have it (PYTHONUNBUFFERED): each write goes straight to the file, a system call that
    # lets other threads run
    out = io.TextIOWrapper(io.FileIO(tmp_path / "stderr", "w"), write_through=True)
    monkeypatch.setattr(sys, "stderr", out)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch as often as they can: interleaving, if possible, happens
    try:
        threads = [
            threading.Thread(target=lambda n=n: [write_line(f"child {n} | line {i}") for i in range(2000)])
            for n in range(8)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    out.close()
    lines = (tmp_path / "stderr").read_text().split("\n")
    assert lines.pop() == ""
    assert sorted(lines) == sorted(f"child {n} | line {i}" for n in range(8) for i in range(2000))
