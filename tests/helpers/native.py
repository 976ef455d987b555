"""The C side, built: worker_native's port runner and test library (in place: its
``build/`` is ignored by git), and the sample primes library (in a copy)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.helpers.workspace import PRIMES, REPO

NATIVE = REPO / "worker_native"
PORT = NATIVE / "build" / "orch-port"
FAULTS = NATIVE / "build" / "libfaults.so"
INCLUDE = NATIVE / "include"


def build_native() -> None:
    """``make -s -C worker_native``: orch-port and libfaults.so, in place."""
    subprocess.run(["make", "-s", "-C", str(NATIVE)], check=True, capture_output=True)
    assert PORT.is_file() and FAULTS.is_file()


def build_primes(work: Path, *, quiet: bool = True) -> Path:
    """Copy releases/primes to ``work`` (which must not exist) and build it there with the
    repository's orch_work.h; the library's path."""
    shutil.copytree(PRIMES, work, ignore=shutil.ignore_patterns("build"))
    subprocess.run(["make", *(["-s"] if quiet else []), f"ORCH_INCLUDE={INCLUDE}"], cwd=work, check=True,
                   capture_output=True)
    return work / "build" / "libprimes.so"
