"""The workspace API token: every route of ``orch serve`` but ``GET /healthz`` wants
``Authorization: Bearer <token>``.

The token is made on first use (``secrets.token_urlsafe``) into ``.orch/api-token``,
mode 0600 from its first byte, and compared in constant time.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import secrets
from pathlib import Path

from orchestrator.errors import StateError
from orchestrator.workspace import Workspace

TOKEN_FILE = "api-token"


def token_path(ws: Workspace) -> Path:
    return ws.runtime_dir / TOKEN_FILE


def api_token(ws: Workspace) -> str:
    """The workspace's API token, made on first use (0600; a racing maker wins once)."""
    path = token_path(ws)
    ws.ensure_runtime()
    if not path.exists():
        token = secrets.token_urlsafe(32)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(token + "\n")
            os.chmod(tmp, 0o600)
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)  # never replaces a token another process made first
        finally:
            tmp.unlink(missing_ok=True)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise StateError(f"{ws.relative(path)} is readable by others (mode {mode:o})",
                         hint=f"chmod 600 {ws.relative(path)}")
    token = path.read_text().strip()
    if not token:
        raise StateError(f"{ws.relative(path)} is empty", hint="remove it; the next `orch serve` makes a new one")
    return token


def bearer_ok(header: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header carries ``token`` (constant-time compare)."""
    if not header:
        return False
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode(), token.encode())
