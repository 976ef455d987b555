"""Fixtures shared by every test layer."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestrator.cli.app import main
from orchestrator.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Run:
    code: int
    out: str
    err: str


@pytest.fixture
def orch(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Callable[..., Run]:
    """Run the orch command line in-process, as the console script does."""
    monkeypatch.delenv("ORCH_WORKSPACE", raising=False)
    monkeypatch.setenv("COLUMNS", "200")

    def run(*args: str | Path, cwd: Path | None = None) -> Run:
        capsys.readouterr()
        if cwd is not None:
            monkeypatch.chdir(cwd)
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return Run(code, captured.out, captured.err)

    return run


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    """A fresh workspace with the sample release source copied in."""
    workspace = Workspace.init(tmp_path / "ws")
    shutil.copytree(REPO / "releases" / "primes", workspace.releases_src_dir / "primes",
                    ignore=shutil.ignore_patterns("build", "*.o", "*.so"))
    return workspace


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "absent"
