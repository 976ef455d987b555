"""The workspace: desired config in git, runtime state under ``.orch/``.

A workspace is a folder holding ``orch.yaml`` (its settings, possibly empty) beside
``providers/``, ``node_families/`` and ``releases/``.  Runtime state lives in
``.orch/`` (never in git): the state store, stored release tarballs, logs and the
fleet's SSH key pair.  ``.orch/`` is made on first use, so a fresh clone of a
workspace works as it is.

>>> ws = Workspace.find()            # walk up from the current folder   # doctest: +SKIP
>>> ws.state_db                                                          # doctest: +SKIP
PosixPath('/src/orch/.orch/state.db')
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from orchestrator.errors import WorkspaceError

MARKER = "orch.yaml"
CONFIG_DIRS = ("providers", "node_families", "releases")
ENV_VAR = "ORCH_WORKSPACE"

_DEFAULT_SETTINGS = """\
# orch workspace settings. Every key is optional; see `orch schema workspace`.
# release_max_bytes: 67108864
"""

_GITIGNORE = ".orch/\n"


@dataclass(frozen=True)
class Workspace:
    """A workspace rooted at ``root``; paths below it are derived, never stored."""

    root: Path

    # -- locating ---------------------------------------------------------------

    @classmethod
    def find(cls, start: Path | str | None = None, *, explicit: Path | str | None = None) -> Workspace:
        """The workspace given explicitly, by ``ORCH_WORKSPACE``, or above ``start``."""
        given = explicit if explicit is not None else os.environ.get(ENV_VAR) or None
        if given is not None:
            root = Path(given).expanduser().resolve()
            if not (root / MARKER).is_file():
                raise WorkspaceError(
                    f"{root} is not an orch workspace (no {MARKER})",
                    hint=f"run `orch init {root}` to make one",
                )
            return cls(root)
        here = Path(start or Path.cwd()).resolve()
        for folder in (here, *here.parents):
            if (folder / MARKER).is_file():
                return cls(folder)
        raise WorkspaceError(
            f"no orch workspace in {here} or any folder above it",
            hint=f"run `orch init`, pass --workspace DIR, or set {ENV_VAR}",
        )

    @classmethod
    def init(cls, root: Path | str) -> Workspace:
        """Make a workspace at ``root`` (idempotent: existing files are kept)."""
        path = Path(root).expanduser().resolve()
        if path.exists() and not path.is_dir():
            raise WorkspaceError(f"{path} exists and is not a folder", hint="choose another path")
        path.mkdir(parents=True, exist_ok=True)
        for name in CONFIG_DIRS:
            (path / name).mkdir(exist_ok=True)
        marker = path / MARKER
        if not marker.exists():
            marker.write_text(_DEFAULT_SETTINGS)
        gitignore = path / ".gitignore"
        if not gitignore.exists():
            gitignore.write_text(_GITIGNORE)
        ws = cls(path)
        ws.ensure_runtime()
        return ws

    # -- paths --------------------------------------------------------------------

    @property
    def settings_file(self) -> Path:
        return self.root / MARKER

    @property
    def providers_dir(self) -> Path:
        return self.root / "providers"

    @property
    def families_dir(self) -> Path:
        return self.root / "node_families"

    @property
    def releases_src_dir(self) -> Path:
        return self.root / "releases"

    @property
    def runtime_dir(self) -> Path:
        return self.root / ".orch"

    @property
    def state_db(self) -> Path:
        return self.runtime_dir / "state.db"

    @property
    def release_store(self) -> Path:
        return self.runtime_dir / "releases"

    @property
    def logs_dir(self) -> Path:
        return self.runtime_dir / "logs"

    @property
    def ssh_key(self) -> Path:
        return self.runtime_dir / "ssh" / "id_ed25519"

    def relative(self, path: Path) -> str:
        """``path`` as shown to the user: relative to the root when inside it."""
        try:
            return str(path.resolve().relative_to(self.root))
        except ValueError:
            return str(path)

    # -- runtime ------------------------------------------------------------------

    def ensure_runtime(self) -> None:
        """Make ``.orch/`` and the fleet SSH key pair when missing (idempotent)."""
        for folder in (self.runtime_dir, self.release_store, self.logs_dir, self.ssh_key.parent):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self.ssh_key.exists():
            _write_ssh_keypair(self.ssh_key)


def _write_ssh_keypair(private_path: Path) -> None:
    """Write an OpenSSH ed25519 key pair, the private half 0600 from its first byte."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    tmp = private_path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private)
    private_path.with_suffix(".pub").write_bytes(public + b" orch-fleet\n")
    os.replace(tmp, private_path)
