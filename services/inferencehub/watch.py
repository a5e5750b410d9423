"""Noticing that files changed: what rotating API keys and certificates without a restart relies on.

A file's signature is its inode, size and modification time, read through symlinks: a Kubernetes Secret volume
swaps a ``..data`` symlink when the Secret changes, which changes the inode even if size and time match.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

Signature = tuple[tuple[int, int, int] | None, ...]


def signature(*paths: Path) -> Signature:
    """Inode, size and mtime of each file (None for one that cannot be read)."""
    result: list[tuple[int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            result.append(None)
        else:
            result.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(result)


class Watch:
    """Tells whether ``paths`` changed since the last accepted look, checking at most every ``interval`` seconds."""

    def __init__(self, *paths: Path, interval: float = 1.0) -> None:
        self.paths = paths
        self.interval = interval
        self.seen = signature(*paths)
        self.checked = time.monotonic()

    def changed(self) -> bool:
        now = time.monotonic()
        if now - self.checked < self.interval:
            return False
        self.checked = now
        current = signature(*self.paths)
        if current == self.seen:
            return False
        self.seen = current
        return True
