"""API auth (orchestrator/server/auth.py, middleware.py): the token file and the bearer
check, exactly.  Written to kill the mutants that survived in docs/mutation.md."""

from __future__ import annotations

import os
import stat

import pytest

from orchestrator.errors import StateError
from orchestrator.server.auth import api_token, bearer_ok, token_path
from orchestrator.workspace import Workspace

TOKEN = "s3cret-token_value"


@pytest.mark.parametrize(("header", "ok"), [
    (None, False), ("", False), (f"Bearer {TOKEN}", True), (f"bearer {TOKEN}", True), (f"BEARER {TOKEN}", True),
    (f"  Bearer   {TOKEN}  ", True), (f"Basic {TOKEN}", False), ("Bearer", False), ("Bearer ", False),
    (f"Bearer {TOKEN}x", False), (f"Bearer {TOKEN[:-1]}", False), (f"Bearer{TOKEN}", False), (TOKEN, False),
    (f"Token {TOKEN}", False), (f"Bearer {TOKEN} {TOKEN}", False),
])
def test_bearer_ok(header: str | None, ok: bool) -> None:
    assert bearer_ok(header, TOKEN) is ok


def test_the_token_is_made_once_0600_and_kept(ws: Workspace) -> None:
    token = api_token(ws)
    path = token_path(ws)
    assert path == ws.root / ".orch" / "api-token"
    assert len(token) == 43 and set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert path.read_text() == token + "\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert api_token(ws) == token, "a second call made another token"
    assert sorted(p.name for p in path.parent.iterdir() if "api-token" in p.name) == ["api-token"]  # no temp left


def test_a_token_already_there_is_never_replaced(ws: Workspace) -> None:
    ws.ensure_runtime()
    path = token_path(ws)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"  made-by-another-process \n")
    os.close(fd)
    assert api_token(ws) == "made-by-another-process"
    assert path.read_bytes() == b"  made-by-another-process \n"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_a_token_others_can_read_is_refused(ws: Workspace, mode: int) -> None:
    api_token(ws)
    token_path(ws).chmod(mode)
    with pytest.raises(StateError) as caught:
        api_token(ws)
    assert (caught.value.message, caught.value.hint) == (
        f".orch/api-token is readable by others (mode {mode:o})", "chmod 600 .orch/api-token")


def test_an_empty_token_file_is_refused(ws: Workspace) -> None:
    api_token(ws)
    token_path(ws).write_text(" \n")
    with pytest.raises(StateError) as caught:
        api_token(ws)
    assert (caught.value.message, caught.value.hint) == (
        ".orch/api-token is empty", "remove it; the next `orch serve` makes a new one")
