"""Node folders: the on-disk side of sshd nodes (the ``local`` and ``netns`` drivers).

A node's "disk" is its folder ``ROOT/<node-id>/``, and a driver keeps nothing in memory
that matters, so a new driver on the same root (a new orch process after a crash) sees
the same nodes:

    meta.json         the node record; written atomically, and before sshd starts
    host_key          the node's ed25519 host key (OpenSSH format, 0600)
    authorized_keys   the fleet's public key (0600)
    sshd_config       ListenAddress, HostKey, PidFile, SetEnv ...; sshd.pid, sshd.log
    home/             the node's clean HOME

This module owns:

- node ids (``new_id``, ``node_id_of``) and the record (``write_json``, ``read_json``,
  ``read_records``, ``read_record``), under the root's lock (``root_lock``);
- making a folder atomically (``make_node_folder``: a hidden ``.new-ID`` folder with its
  ``meta.json`` in it, then renamed, so a node folder always has its record) and
  sweeping what a killed create left (``leftovers``, ``sweep_leftovers``);
- writing a node's files (``write_node_files``);
- the loopback ``address:port`` reservations under ``/tmp/orch-local-<uid>/``, which
  are the machine's, not a root's (``address_lock``, ``reservations``, ``reserve``,
  ``release``, ``release_folder``);
- the folder-chain permission checks (``folder_chain_problem``, ``strict_modes_problem``);
- the errors of the sshd-node drivers (``LocalDriverError``, ``QuotaExceededError``):
  they live here, the lowest module that raises them, and the drivers raise them too.

Why the files are written this way:

- sshd's ``StrictModes`` refuses authorized_keys when any folder above it, up to the
  user's home or ``/``, is group/world-writable or foreign-owned: anything under /tmp
  fails, sticky bit or not.  The drivers check the chain themselves, accepting sticky
  folders (nobody else can swap what we own in them), name the culprit otherwise, and
  keep StrictModes on wherever sshd's stricter rule agrees.
- ``SetEnv HOME=<node>/home`` (OpenSSH >= 8.7) overrides the HOME sshd sets, so the
  ``~/.bashrc`` that Debian's bash sources for every SSH command is the node's, not the
  user's (root's here runs ``pyenv init``: +155 ms per command).  sshd still starts
  commands in the passwd home, so the node's ``.bashrc`` is one ``cd "$HOME"``, and SFTP
  starts there too (``internal-sftp -d``): relative paths stay on the node's disk.
- ``SetEnv ORCH_NODE_ID=<id>`` marks every process of the node (see ``processes``).
  Ids carry a random suffix so that marker never matches another provider's node.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import re
import secrets
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from libcloud.common.types import LibcloudError
from libcloud.compute.base import Node, NodeDriver

from orchestrator.config import safeyaml
from orchestrator.provision.drivers import QuotaError
from orchestrator.provision.drivers.processes import ENV_MARKER

META = "meta.json"
STAGING = ".new-"  # a node folder being made, before it is renamed to its id
ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
# sshd_config cannot express these in a path (internal-sftp splits its -d on spaces)
UNSAFE_PATH_CHARS = set('"\\% \n\r\t')


class LocalDriverError(LibcloudError):
    """The local driver cannot do what was asked (unusable root, sshd will not start)."""

    def __str__(self) -> str:  # libcloud's is a repr with the driver object in it
        return str(self.value)


class QuotaExceededError(LocalDriverError, QuotaError):
    """No room for another node: ``max_nodes`` reached or no loopback address free."""

    def __init__(self, value: str, *, quota: int, driver: NodeDriver | None = None) -> None:
        super().__init__(value, driver)
        self.quota = quota


# -- ids and records ---------------------------------------------------------------------


def new_id(name: str) -> str:
    """``<name as slug>-<8 hex>``: unique across roots, so the env marker is too."""
    slug = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:40] or "node"
    return f"{slug}-{secrets.token_hex(4)}"


def node_id_of(node: Node) -> str:
    """The id of ``node``, checked to be a node folder's name (ValueError otherwise), so
    that it can never name a path outside the root."""
    node_id = str(node.id)
    if not ID_RE.match(node_id):
        raise ValueError(f"{node_id!r} is not a local node id")
    return node_id


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` atomically: a reader sees the old or the new record, never half.

    No fsync: this guards against a crashed process, not a lost machine.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_record(root: Path, node_id: str) -> dict[str, Any] | None:
    """The ``meta.json`` of node ``node_id`` under ``root``, or None."""
    return read_json(root / node_id / META)


def read_records(root: Path) -> list[dict[str, Any]]:
    """The records of every node under ``root``, oldest first (folders being made, hidden
    ones, and folders without a readable record are no nodes)."""
    if not root.is_dir():
        return []
    metas = [read_json(d / META) for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
    return sorted((m for m in metas if m), key=lambda m: (m["created_at"], m["id"]))


@contextlib.contextmanager
def root_lock(root: Path) -> Iterator[None]:
    """Serialize address and quota decisions across threads and processes."""
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# -- making and sweeping folders ---------------------------------------------------------


def make_node_folder(node_dir: Path, meta: dict[str, Any], reservation: str) -> None:
    """Make ``node_dir`` with ``meta`` as its ``meta.json``, reserving ``reservation``
    (``address:port``) for it; under ``address_lock`` and the root's lock.

    The folder appears with its meta.json in it, or not at all: it is made under a
    hidden name and renamed (a killed create leaves only a hidden folder, which
    ``sweep_leftovers`` removes; its reservation names a missing folder and is dropped).
    """
    staging = node_dir.with_name(f"{STAGING}{node_dir.name}")
    staging.mkdir(mode=0o700)
    write_json(staging / META, meta)
    reserve(reservation, node_dir)
    os.rename(staging, node_dir)


def leftovers(root: Path, *, recordless: bool) -> list[Path]:
    """Folders that are not nodes: one being made (hidden ``.new-ID``), and with
    ``recordless`` one without meta.json (left by an older orch killed between its
    mkdir and its first meta.json, or put there by hand)."""
    if not root.is_dir():
        return []
    return [d for d in root.iterdir() if d.is_dir() and (
        d.name.startswith(STAGING) or (recordless and ID_RE.match(d.name) and not (d / META).exists()))]


def sweep_leftovers(root: Path, end_processes: Callable[[str], None], *, recordless: bool) -> None:
    """Remove the ``leftovers`` under ``root`` and their reservations, after
    ``end_processes(node_id)`` ended whatever a dead create had started in them.

    Called with ``address_lock`` and the root's lock held: a folder being made by a live
    create is renamed before either lock is let go, so what is left here is dead.
    """
    for folder in leftovers(root, recordless=recordless):
        node_id = folder.name.removeprefix(STAGING)
        if ID_RE.match(node_id):
            end_processes(node_id)
        shutil.rmtree(folder, ignore_errors=True)
        release_folder(folder)
        release_folder(root / node_id)


# -- a node's files ----------------------------------------------------------------------


def cloud_config_host_key(user_data: str) -> ed25519.Ed25519PrivateKey | None:
    """The ed25519 host key a ``#cloud-config`` document installs (``ssh_keys:
    ed25519_private``), as cloud-init would; None when it names none.  ValueError when
    the document or its key cannot be read."""
    if not user_data.startswith("#cloud-config"):
        return None
    try:
        document = safeyaml.load(user_data, "user data")
    except yaml.YAMLError as exc:
        raise ValueError(f"the user data is not a readable #cloud-config document: {exc}") from None
    keys = document.get("ssh_keys") if isinstance(document, dict) else None
    private = keys.get("ed25519_private") if isinstance(keys, dict) else None
    if private is None:
        return None
    key = serialization.load_ssh_private_key(str(private).encode(), None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError("ssh_keys.ed25519_private in the user data is not an ed25519 key")
    return key


def write_node_files(node_dir: Path, meta: dict[str, Any], pubkey: str, *, strict_modes: bool = True,
                     host_key: ed25519.Ed25519PrivateKey | None = None) -> str:
    """Write host key (``host_key``, else a new one), authorized_keys, home/ and
    sshd_config; return the host key line."""
    host_key = host_key or ed25519.Ed25519PrivateKey.generate()
    private = host_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = host_key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write_private(node_dir / "host_key", private)
    _write_private(node_dir / "authorized_keys", (pubkey + "\n").encode())
    home = node_dir / "home"
    home.mkdir(mode=0o700)
    # sshd starts commands in the passwd home; Debian's bash sources this for every SSH
    # command, so relative paths land on the node's disk, not in the real home.
    (home / ".bashrc").write_text('cd "$HOME" 2>/dev/null || true\n')
    config = f"""\
# Written by orch's local driver for node {meta["id"]}; see orchestrator/provision/drivers/nodefolders.py.
ListenAddress {meta["address"]}:{meta["port"]}
HostKey "{node_dir}/host_key"
PidFile "{node_dir}/sshd.pid"
AuthorizedKeysFile "{node_dir}/authorized_keys"
AllowUsers {meta["ssh_user"]}
UsePAM no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes {"yes" if strict_modes else "no"}
UseDNS no
PrintMotd no
PrintLastLog no
X11Forwarding no
LogLevel ERROR
MaxSessions 64
MaxStartups 100:30:200
Subsystem sftp internal-sftp -d {home}
SetEnv {ENV_MARKER}={meta["id"]} "HOME={home}"{f' "PATH={meta["path"]}"' if meta.get("path") else ""}
"""
    _write_private(node_dir / "sshd_config", config.encode())
    return public.decode()


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


# -- loopback reservations ---------------------------------------------------------------


@contextlib.contextmanager
def address_lock() -> Iterator[None]:
    """One lock per user for the whole machine (every root, every workspace)."""
    path = os.path.join(tempfile.gettempdir(), f"orch-local-addresses-{os.geteuid()}.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _reservation_dir() -> Path:
    """``/tmp/orch-local-<uid>/``: one file per address:port taken by a node of any root."""
    folder = Path(tempfile.gettempdir()) / f"orch-local-{os.geteuid()}"
    with contextlib.suppress(FileExistsError):
        folder.mkdir(mode=0o700)
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise LocalDriverError(f"{folder} is not a private folder of ours; remove it")
    return folder


def reservations() -> set[str]:
    """Reserved ``address:port``s; a reservation whose node folder is gone is dropped."""
    taken = set()
    folder = _reservation_dir()
    for entry in folder.iterdir():
        try:
            node_dir = entry.read_text()
        except OSError:
            continue
        if os.path.isdir(node_dir):
            taken.add(entry.name)
        else:
            entry.unlink(missing_ok=True)
    return taken


def reserve(address: str, node_dir: Path) -> None:
    """Reserve ``address`` (``address:port``) for the node in ``node_dir``."""
    (_reservation_dir() / address).write_text(str(node_dir))


def release(address: str, node_dir: Path) -> None:
    """Drop the reservation of ``address`` (``address:port``) if ``node_dir`` holds it."""
    entry = _reservation_dir() / address
    with contextlib.suppress(OSError):
        if entry.read_text() == str(node_dir):
            entry.unlink()


def release_folder(node_dir: Path) -> None:
    """Drop every reservation held for ``node_dir`` (its address unknown)."""
    folder = _reservation_dir()
    for entry in folder.iterdir():
        with contextlib.suppress(OSError):
            if entry.read_text() == str(node_dir):
                entry.unlink()


# -- folder-chain permissions ------------------------------------------------------------


def strict_modes_problem(path: str | os.PathLike[str]) -> str | None:
    """Why sshd's ``StrictModes`` would refuse files under ``path``, or None.

    sshd walks from the file's folder up to the user's home or ``/``; every folder must
    be owned by root or the user and not be writable by group or others.
    """
    return _chain_problem(path, allow_sticky=False)


def folder_chain_problem(path: str | os.PathLike[str]) -> str | None:
    """Why files under ``path`` could be swapped by another user, or None.

    The same walk as sshd's StrictModes, except that a sticky folder writable by all
    (``/tmp``) is safe: nobody else can rename or remove what we own inside it.
    """
    return _chain_problem(path, allow_sticky=True)


def _chain_problem(path: str | os.PathLike[str], *, allow_sticky: bool) -> str | None:
    uid = os.geteuid()
    home = os.path.realpath(pwd.getpwuid(uid).pw_dir)
    current = os.path.realpath(path)
    while True:
        st = os.stat(current)
        shared = st.st_mode & 0o022 and not (allow_sticky and st.st_mode & stat.S_ISVTX)
        if st.st_uid not in (0, uid) or shared:
            return f"{current} has mode {st.st_mode & 0o7777:04o} and owner uid {st.st_uid}"
        if current in (home, "/"):
            return None
        current = os.path.dirname(current)
