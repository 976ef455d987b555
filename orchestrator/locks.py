"""Exclusive file locks between threads and processes (``flock`` on a file of their own).

Each ``exclusive(path)`` opens the file anew, so two threads of one process exclude each
other as two processes do; a lock is never re-entered (a holder that asks again waits
for itself).  The kernel drops the lock when its holder dies, so a crash leaves nothing
to clean up.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def exclusive(path: Path, *, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold ``path``'s lock for the block.  When another holder has it, ``on_wait`` is
    called first with what the file says of that holder (its pid), then this waits."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                fh.seek(0)
                on_wait(fh.read().strip() or "unknown")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()}\n")
            fh.flush()
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
