"""inferencehub.lifeline: a tied child ends when its parent is killed, by the kernel's signal or by its own watch."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

import pytest

from conftest import alive, wait_for

CHILD = """
import sys, time
from inferencehub import lifeline
if sys.argv[2] == "watch":  # as where prctl is not available
    lifeline._death_signal = lambda sig: False
lifeline.tie_to_parent(int(sys.argv[1]))
print("tied", flush=True)
time.sleep(60)
"""
PARENT = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], str(os.getpid()), sys.argv[2]])
print(child.pid, flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("how", ["kernel", "watch"])
def test_a_tied_child_ends_when_its_parent_is_killed(how):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, how], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        assert parent.stdout.readline() == "tied\n"  # its parent is still alive: the tie is what ends it
        parent.kill()
        parent.wait(10)
        wait_for(lambda: not alive(child), 10, what="the child to end with its parent")
    finally:
        parent.kill()
        parent.wait(10)
        parent.stdout.close()
        if alive(child):
            with contextlib.suppress(OSError):
                os.kill(child, signal.SIGKILL)
