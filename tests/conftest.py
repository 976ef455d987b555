"""Fixtures shared by every test layer (helpers live in tests/helpers)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests.helpers")  # before they are imported: helpers' asserts explain themselves

from orchestrator.cli.app import main  # noqa: E402
from orchestrator.workspace import Workspace  # noqa: E402
from tests.helpers import postgres  # noqa: E402
from tests.helpers.cli import Run  # noqa: E402
from tests.helpers.workspace import add_primes_source  # noqa: E402


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
    add_primes_source(workspace)
    return workspace


# -- PostgreSQL (tests/helpers/postgres.py) ---------------------------------------------


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[postgres.PostgresServer]:
    """The machine's cluster with a login role of this session's; skips, saying why,
    when not root or PostgreSQL is not installed."""
    reason = postgres.unavailable()
    if reason is not None:
        pytest.skip(reason)
    with postgres.cluster_with_role() as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server: postgres.PostgresServer) -> Iterator[str]:
    """A new database owned by that role, as a ``postgresql://`` URL; dropped afterwards."""
    with postgres.throwaway_database(postgres_server) as url:
        yield url
