"""Credentials: the secret values behind a provider's references.

A registration holds references only (``env:VAR`` or ``file:PATH``, the file 0600).
They are resolved when a driver is built, and the values are never returned in
anything that is printed, logged or stored.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from orchestrator.config import ProviderConfig
from orchestrator.errors import CredentialError
from orchestrator.workspace import Workspace


def resolve_credentials(ws: Workspace, config: ProviderConfig) -> dict[str, str]:
    """The secret values behind ``config.credentials``; never print the result."""
    return {key: _resolve(ws, config.name, key, ref) for key, ref in config.credentials.items()}


def _resolve(ws: Workspace, provider: str, key: str, ref: str) -> str:
    kind, _, target = ref.partition(":")
    where = f"providers/{provider}.yaml: credentials.{key}"
    if kind == "env":
        value = os.environ.get(target)
        if value is None:
            raise CredentialError(f"{where}: environment variable {target} is not set", hint=f"export {target}")
        return value
    path = Path(target).expanduser()
    if not path.is_absolute():
        path = ws.root / path
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise CredentialError(f"{where}: file {path} does not exist", hint="create it with mode 0600") from None
    except OSError as exc:
        raise CredentialError(f"{where}: cannot read {path}: {exc.strerror}") from exc
    if not stat.S_ISREG(mode):
        raise CredentialError(f"{where}: {path} is not a regular file")
    if mode & 0o077:
        raise CredentialError(
            f"{where}: {path} is readable by others (mode {stat.S_IMODE(mode):04o})", hint=f"chmod 600 {path}"
        )
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise CredentialError(f"{where}: cannot read {path}: {exc.strerror}") from exc
