"""Children that never outlive their parent, however the parent ends (SIGKILL included).

A process started by ``inferencehub up`` (and a replica's model worker process) ties itself to its parent:

- on Linux it asks the kernel for SIGKILL when its parent dies, ``prctl(PR_SET_PDEATHSIG)``. The request survives
  ``exec``, so ``python -m inferencehub.lifeline COMMAND...`` ties a program that is not ours (nats-server) and
  then becomes it. The kernel sends the signal when the parent *thread* that started the child ends, so a parent
  must start tied children from a thread that lives as long as it does: ``up`` and a replica's worker pool start
  them from the main thread, where their event loop runs;
- elsewhere a daemon thread looks at ``os.getppid()`` once a second (Python children only: ``exec`` ends it).

The parent names itself in ``INFERENCEHUB_PARENT_PID``; the child removes it from its environment (its own
children have another parent), and if its parent is already gone (it died between the fork and the request),
the child ends at once.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

PARENT_PID_ENV = "INFERENCEHUB_PARENT_PID"
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
POLL_SECONDS = 1.0  # where the kernel cannot tell us: how often the parent is looked for


def tie_to_parent(parent: int, sig: int = signal.SIGKILL) -> None:
    """End this process with ``sig`` when process ``parent`` (this one's parent now) ends."""
    if not _death_signal(sig):
        threading.Thread(target=_watch, args=(parent, sig), name="lifeline", daemon=True).start()
    if os.getppid() != parent:  # it died before we asked
        os.kill(os.getpid(), sig)


def tie_from_env() -> None:
    """In a server's entry point: tie this process to the parent named in the environment, if one is."""
    parent = os.environ.pop(PARENT_PID_ENV, "")
    if parent.isdigit():
        tie_to_parent(int(parent))


def _death_signal(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch(parent: int, sig: int) -> None:
    while os.getppid() == parent:
        time.sleep(POLL_SECONDS)
    os.kill(os.getpid(), sig)


def main(argv: list[str]) -> None:
    """``python -m inferencehub.lifeline COMMAND [ARGS...]``: tie to the parent, then become COMMAND."""
    if not argv:
        sys.exit("usage: python -m inferencehub.lifeline COMMAND [ARGS...]")
    tie_from_env()
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
