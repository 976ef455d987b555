"""The ``orch`` command line: in-process (the ``orch`` fixture gives a :class:`Run`), or
as a subprocess in a workspace."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

from orchestrator.workspace import Workspace

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
