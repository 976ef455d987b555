"""The ``orch`` command line: in-process (the ``orch`` fixture gives a :class:`Run`), or
as a subprocess in a workspace."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from orchestrator.workspace import Workspace
from tests.helpers.primes import primes_below

ORCH = [sys.executable, "-m", "orchestrator"]


@dataclass
class Run:
    code: int
    out: str
    err: str


def orch(ws: Workspace, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``orch ARGS`` as a subprocess in the workspace (wide, so tables do not wrap)."""
    return subprocess.run([*ORCH, *args], cwd=ws.root, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200"})


def run_primes_job(orch: Callable[..., Run], **options: Any) -> None:
    """``orch job run primes:count_primes`` over 0:200000 (``options`` to the ``orch``
    fixture, such as ``cwd``): it is done with no task failed, and its result adds up to
    the number of primes below 200000."""
    ran = orch("job", "run", "primes:count_primes", "--input", "0:200000", "--json", **options)
    assert ran.code == 0, ran.err
    outcome = json.loads(ran.out)
    assert outcome["state"] == "done" and outcome["counters"]["failed"] == 0, outcome
    result = orch("job", "result", outcome["job"], **options)
    assert sum(int(line) for line in result.out.split()) == primes_below(200_000)
