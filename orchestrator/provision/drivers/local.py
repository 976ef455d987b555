"""``local``: libcloud nodes that are OpenSSH ``sshd`` processes on 127.0.0.N.

Each node is one ``sshd`` listening on its own loopback address.  The node's "disk" is
its folder ``ROOT/<node-id>/``, and the driver keeps nothing in memory that matters, so
a new driver on the same root (a new orch process after a crash) sees the same nodes:

    meta.json         the node record; written atomically, and before sshd starts
    host_key          the node's ed25519 host key (OpenSSH format, 0600)
    authorized_keys   the fleet's public key (0600)
    sshd_config       ListenAddress, HostKey, PidFile, SetEnv ...; sshd.pid, sshd.log
    home/             the node's clean HOME

Why it is built this way:

- sshd's ``StrictModes`` refuses authorized_keys when any folder above it, up to the
  user's home or ``/``, is group/world-writable or foreign-owned: anything under /tmp
  fails, sticky bit or not.  ``create_node`` checks the chain itself, accepting sticky
  folders (nobody else can swap what we own in them), names the culprit otherwise,
  and keeps StrictModes on wherever sshd's stricter rule agrees.
- ``SetEnv HOME=<node>/home`` (OpenSSH >= 8.7) overrides the HOME sshd sets, so the
  ``~/.bashrc`` that Debian's bash sources for every SSH command is the node's, not the
  user's (root's here runs ``pyenv init``: +155 ms per command).  sshd still starts
  commands in the passwd home, so the node's ``.bashrc`` is one ``cd "$HOME"``, and SFTP
  starts there too (``internal-sftp -d``): relative paths stay on the node's disk.
- sshd puts every connection and every command in a session of its own, so killing
  sshd's process group misses them.  ``destroy_node`` kills sshd (found by the config
  path in its title), all its descendants, and every process whose environment carries
  ``ORCH_NODE_ID=<id>`` (``SetEnv``), which finds commands orphaned by ``nohup ... &``.
  Ids carry a random suffix so that marker never matches another provider's node.

>>> driver = LocalNodeDriver(root=".orch/drivers/local/laptop", max_nodes=8)  # doctest: +SKIP
>>> node = driver.create_node("w1", driver.list_sizes()[0], driver.list_images()[0],
...                           auth=NodeAuthSSHKey(pubkey))                      # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import platform
import pwd
import re
import secrets
import shutil
import signal
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from libcloud.common.types import LibcloudError
from libcloud.compute.base import (
    Node,
    NodeAuthPassword,
    NodeAuthSSHKey,
    NodeDriver,
    NodeImage,
    NodeLocation,
    NodeSize,
)
from libcloud.compute.types import NodeState

from orchestrator.provision.drivers import QuotaError

SSHD = "/usr/sbin/sshd"
META = "meta.json"
_STAGING = ".new-"  # a node folder being made, before it is renamed to its id
ENV_MARKER = "ORCH_NODE_ID"
_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
# sshd_config cannot express these in a path (internal-sftp splits its -d on spaces)
_UNSAFE_PATH_CHARS = set('"\\% \n\r\t')
# id, cpus, ram (MB), disk (GB)
_SIZES = (("local-1", 1, 512, 10), ("local-2", 2, 1024, 20), ("local-4", 4, 2048, 40))
_POLL = 0.005  # seconds between readiness / exit checks
_GRACE = 1.0  # seconds between SIGTERM and SIGKILL

_LOG_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND
# The sshd processes this process spawned, kept only to reap them (no zombies).  Not
# state: nodes are found on disk.  posix_spawn, not Popen: a node outlives the Popen.
_spawned: set[int] = set()
_spawned_lock = threading.Lock()


class LocalDriverError(LibcloudError):
    """The local driver cannot do what was asked (unusable root, sshd will not start)."""

    def __str__(self) -> str:  # libcloud's is a repr with the driver object in it
        return str(self.value)


class QuotaExceededError(LocalDriverError, QuotaError):
    """No room for another node: ``max_nodes`` reached or no loopback address free."""

    def __init__(self, value: str, *, quota: int, driver: NodeDriver | None = None) -> None:
        super().__init__(value, driver)
        self.quota = quota


# What an sshd node's status says, for libcloud; shared with the netns driver.
SSHD_NODE_STATES = {
    "pending": NodeState.PENDING,
    "running": NodeState.RUNNING,
    "stopped": NodeState.STOPPED,
}


class LocalNodeDriver(NodeDriver):
    """Nodes that are sshd processes on this machine, one loopback address each."""

    type = "local"
    name = "Local sshd nodes"
    website = "https://www.openssh.com/"
    # libcloud declares these as plain class attributes; ClassVar would clash with it.
    features = {"create_node": ["ssh_key"]}  # noqa: RUF012
    NODE_STATE_MAP = SSHD_NODE_STATES

    def __init__(
        self,
        key: str | None = None,
        secret: str | None = None,
        *,
        root: str | os.PathLike[str],
        max_nodes: int | None = None,
        port: int = 2222,
        first_address: int = 10,
        start_timeout: float = 5.0,
    ) -> None:
        if not 1 <= first_address <= 254:
            raise ValueError(f"first_address must be in 1..254 (127.0.0.N), not {first_address}")
        if not 1 <= port <= 65535:
            raise ValueError(f"port must be in 1..65535, not {port}")
        if max_nodes is not None and max_nodes < 0:
            raise ValueError(f"max_nodes must be >= 0, not {max_nodes}")
        self.root = Path(os.path.realpath(os.path.expanduser(root)))
        if _UNSAFE_PATH_CHARS & set(str(self.root)):
            raise ValueError(f"root {self.root!r} holds a space, quote, backslash or %: sshd_config cannot say it")
        self.max_nodes = max_nodes
        self.ssh_port = port
        self.first_address = first_address
        self.start_timeout = start_timeout
        self._strict_modes = True
        super().__init__(key or "local", secret)  # type: ignore[no-untyped-call]

    # -- catalogue -------------------------------------------------------------------

    def list_sizes(self, location: NodeLocation | None = None) -> list[NodeSize]:
        arch = platform.machine()
        return [
            NodeSize(sid, sid, ram, disk, None, 0.0, self, extra={"cpus": cpus, "arch": arch})
            for sid, cpus, ram, disk in _SIZES
        ]

    def list_images(self, location: NodeLocation | None = None) -> list[NodeImage]:
        return [NodeImage("host", _os_pretty_name(), self, extra={"arch": platform.machine()})]

    def list_locations(self) -> list[NodeLocation]:
        return [NodeLocation("local", "local", "ZZ", self)]

    # -- nodes -----------------------------------------------------------------------

    def create_node(
        self,
        name: str,
        size: NodeSize,
        image: NodeImage,
        location: NodeLocation | None = None,
        auth: NodeAuthSSHKey | NodeAuthPassword | None = None,
        ex_tags: dict[str, str] | None = None,
    ) -> Node:
        if not isinstance(auth, NodeAuthSSHKey):
            raise ValueError("the local driver needs auth=NodeAuthSSHKey(public_key); no other auth works")
        pubkey = auth.pubkey.strip()
        if "\n" in pubkey or not pubkey.startswith(("ssh-", "ecdsa-", "sk-")):
            raise ValueError("auth.pubkey must be one OpenSSH public key line ('ssh-ed25519 AAAA...')")
        if size.id not in {s[0] for s in _SIZES}:
            raise ValueError(f"unknown size {size.id!r}; list_sizes() offers {[s[0] for s in _SIZES]}")
        if image.id != "host":
            raise ValueError(f"unknown image {image.id!r}; the only image is 'host'")
        if location is not None and location.id != "local":
            raise ValueError(f"unknown location {location.id!r}; the only location is 'local'")
        self._prepare_root()
        # Loopback addresses belong to the machine, not to this root: they are chosen
        # and reserved under a machine-wide lock; sshd then starts outside it.
        with _address_lock(), self._root_lock():
            self._sweep_locked()
            metas = self._read_all()
            if self.max_nodes is not None and len(metas) >= self.max_nodes:
                raise QuotaExceededError(
                    f"quota reached: {len(metas)} of max_nodes={self.max_nodes} local nodes exist "
                    f"under {self.root}",
                    quota=self.max_nodes,
                    driver=self,
                )
            reserved = {a.rsplit(":", 1)[0] for a in _reservations() if a.endswith(f":{self.ssh_port}")}
            address = self._free_address({m["address"] for m in metas} | reserved)
            node_id = _new_id(name)
            node_dir = self.root / node_id
            meta: dict[str, Any] = {
                "id": node_id,
                "name": name,
                "address": address,
                "port": self.ssh_port,
                "ssh_user": pwd.getpwuid(os.geteuid()).pw_name,
                "host_key": "",
                "size": size.id,
                "image": image.id,
                "tags": dict(ex_tags or {}),
                "node_dir": str(node_dir),
                "pid": None,
                "creator": _this_process(),
                "created_at": dt.datetime.now(dt.UTC).isoformat(),
            }
            # The folder appears with its meta.json in it, or not at all: it is made
            # under a hidden name and renamed (a killed create leaves only a hidden
            # folder, which _sweep removes; its reservation names a missing folder and
            # is dropped).
            staging = self.root / f"{_STAGING}{node_id}"
            staging.mkdir(mode=0o700)
            _write_json(staging / META, meta)
            _reserve(f"{address}:{self.ssh_port}", node_dir)
            os.rename(staging, node_dir)
        try:
            meta["host_key"] = _write_node_files(node_dir, meta, pubkey, strict_modes=self._strict_modes)
            _write_json(node_dir / META, meta)
            self._start_sshd(meta)
        except BaseException:
            self._kill_processes(node_id, graceful=False)
            shutil.rmtree(node_dir, ignore_errors=True)
            _release(f"{address}:{self.ssh_port}", node_dir)
            raise
        return self._to_node(meta)

    def list_nodes(self) -> list[Node]:
        self._sweep()
        return [self._to_node(meta) for meta in self._read_all()]

    def destroy_node(self, node: Node) -> bool:
        node_id = self._node_id(node)
        meta = _read_json(self.root / node_id / META) if (self.root / node_id / META).exists() else None
        self._kill_processes(node_id, graceful=True)
        shutil.rmtree(self.root / node_id, ignore_errors=True)
        if meta:
            _release(f"{meta['address']}:{meta['port']}", self.root / node_id)
        else:  # a folder without its record: whatever names it
            _release_folder(self.root / node_id)
        if (self.root / node_id).exists():
            raise LocalDriverError(f"could not remove {self.root / node_id}", driver=self)
        return True

    def stop_node(self, node: Node) -> bool:
        """End every process of the node (SIGTERM, then SIGKILL); keep its folder."""
        self._kill_processes(self._node_id(node), graceful=True)
        return True

    def start_node(self, node: Node) -> bool:
        """Start a stopped node's sshd again, with the same address and host key."""
        meta = self._meta(self._node_id(node))
        if not self._sshd_alive(meta):
            self._start_sshd(meta)
        return True

    def reboot_node(self, node: Node) -> bool:
        return self.stop_node(node) and self.start_node(node)

    def ex_kill_node(self, node: Node) -> bool:
        """SIGKILL every process of the node at once and keep its folder (fault injection)."""
        self._kill_processes(self._node_id(node), graceful=False)
        return True

    def ex_host_key(self, node: Node) -> str:
        """The node's public host key line, ``ssh-ed25519 AAAA...``."""
        key: str = self._meta(self._node_id(node))["host_key"]
        return key

    def _to_node(self, meta: dict[str, Any]) -> Node:
        status = self._status(meta)
        sizes = {s.id: s for s in self.list_sizes()}
        extra = {key: meta[key] for key in ("host_key", "port", "ssh_user", "node_dir", "pid", "size", "image")}
        extra.update(tags=dict(meta["tags"]), created_at=meta["created_at"], status=status)
        return Node(
            id=meta["id"],
            name=meta["name"],
            state=self.NODE_STATE_MAP.get(status, NodeState.UNKNOWN),
            public_ips=[meta["address"]],
            private_ips=[meta["address"]],
            driver=self,
            size=sizes.get(meta["size"]),
            image=self.list_images()[0],
            extra=extra,
            created_at=dt.datetime.fromisoformat(meta["created_at"]),
        )

    # -- the node folder -------------------------------------------------------------

    def _prepare_root(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        problem = folder_chain_problem(self.root)
        if problem:
            raise LocalDriverError(
                f"another user could replace the node folders under {self.root}: {problem}; "
                "use a root whose folders up to your home (or /) are writable only by you or "
                "root, such as WORKSPACE/.orch/drivers/local/NAME",
                driver=self,
            )
        # We checked the chain ourselves, sticky-aware; sshd's own check refuses any
        # path below /tmp, so it is kept on only where it agrees.
        self._strict_modes = strict_modes_problem(self.root) is None

    @contextlib.contextmanager
    def _root_lock(self) -> Iterator[None]:
        """Serialize address and quota decisions across threads and processes."""
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read_all(self) -> list[dict[str, Any]]:
        if not self.root.is_dir():
            return []
        metas = [_read_json(d / META) for d in self.root.iterdir() if d.is_dir() and not d.name.startswith(".")]
        return sorted((m for m in metas if m), key=lambda m: (m["created_at"], m["id"]))

    def _leftovers(self, *, recordless: bool) -> list[Path]:
        """Folders that are not nodes: one being made (hidden ``.new-ID``), and with
        ``recordless`` one without meta.json (left by an older orch killed between its
        mkdir and its first meta.json, or put there by hand)."""
        if not self.root.is_dir():
            return []
        return [d for d in self.root.iterdir() if d.is_dir() and (
            d.name.startswith(_STAGING) or (recordless and _ID_RE.match(d.name) and not (d / META).exists()))]

    def _sweep(self) -> None:
        """Remove the folders of creates killed before their folder appeared; cheap when
        there is none.  (A listing leaves other folders alone; ``create_node`` sweeps
        folders without a record too, where their reservations matter.)"""
        if self._leftovers(recordless=False):
            with _address_lock(), self._root_lock():
                self._sweep_locked(recordless=False)

    def _sweep_locked(self, *, recordless: bool = True) -> None:
        """``_sweep`` with the address and root locks held: a folder being made by a live
        create is renamed before either lock is let go, so what is left here is dead."""
        for folder in self._leftovers(recordless=recordless):
            node_id = folder.name.removeprefix(_STAGING)
            if _ID_RE.match(node_id):
                self._kill_processes(node_id, graceful=False)
            shutil.rmtree(folder, ignore_errors=True)
            _release_folder(folder)
            _release_folder(self.root / node_id)

    def _meta(self, node_id: str) -> dict[str, Any]:
        meta = _read_json(self.root / node_id / META)
        if meta is None:
            raise LocalDriverError(f"no local node {node_id} under {self.root}", driver=self)
        return meta

    def _node_id(self, node: Node) -> str:
        node_id = str(node.id)
        if not _ID_RE.match(node_id):
            raise ValueError(f"{node_id!r} is not a local node id")
        return node_id

    def _free_address(self, taken: set[str]) -> str:
        for n in range(self.first_address, 255):
            address = f"127.0.0.{n}"
            if address not in taken and _port_free(address, self.ssh_port):
                return address
        raise QuotaExceededError(
            f"no free loopback address 127.0.0.{self.first_address}-254 with port {self.ssh_port} free",
            quota=255 - self.first_address,
            driver=self,
        )

    # -- processes -------------------------------------------------------------------

    def _start_sshd(self, meta: dict[str, Any]) -> None:
        node_dir = Path(meta["node_dir"])
        if os.geteuid() == 0:  # root's sshd wants its privilege separation folder
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        # Not our environment: the orch process may hold credentials.
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", ENV_MARKER: meta["id"]}
        with _spawned_lock:
            pid = os.posix_spawn(
                SSHD,
                _sshd_argv(node_dir),
                env,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_OPEN, 1, str(node_dir / "sshd.log"), _LOG_FLAGS, 0o600),
                    (os.POSIX_SPAWN_DUP2, 1, 2),
                ],
                setsid=True,  # its own session and process group
            )
            _spawned.add(pid)
        meta["pid"] = pid
        _write_json(node_dir / META, meta)
        deadline = time.monotonic() + self.start_timeout
        while True:
            exited = _reap(pid)
            if exited is not None:
                raise LocalDriverError(
                    f"sshd of node {meta['id']} exited with {exited}: {_tail(node_dir / 'sshd.log')}",
                    driver=self,
                )
            with contextlib.suppress(OSError), socket.create_connection((meta["address"], meta["port"]), 1):
                return
            if time.monotonic() > deadline:
                raise LocalDriverError(
                    f"sshd of node {meta['id']} did not listen on {meta['address']}:{meta['port']} "
                    f"within {self.start_timeout}s: {_tail(node_dir / 'sshd.log')}",
                    driver=self,
                )
            time.sleep(_POLL)

    def _sshd_alive(self, meta: dict[str, Any]) -> bool:
        """Whether the recorded pid is still our sshd (a reused pid has another cmdline).

        Without a recorded pid (the creating process was killed right after it spawned
        sshd), the pid file sshd writes once it listens is asked.
        """
        pid = meta.get("pid") or _read_pid(Path(meta["node_dir"]) / "sshd.pid")
        if not pid:
            return False
        _reap(pid)
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        # sshd retitles itself "sshd: /usr/sbin/sshd -D -e -f CONFIG [listener] ..."
        return " ".join(_sshd_argv(Path(meta["node_dir"]))).encode() in cmdline.replace(b"\0", b" ")

    def _status(self, meta: dict[str, Any]) -> str:
        """running: its sshd is alive; pending: sshd not started yet by a create that is
        still going on; stopped: anything else (such as a create killed half-way)."""
        if self._sshd_alive(meta):
            return "running"
        if meta.get("pid") is not None:
            return "stopped"
        creator = meta.get("creator")
        if isinstance(creator, dict):
            if _process_alive(creator):
                return "pending"
        else:  # a record from before "creator": young means pending
            created = dt.datetime.fromisoformat(meta["created_at"])
            if dt.datetime.now(dt.UTC) - created < dt.timedelta(seconds=2 * self.start_timeout):
                return "pending"
        # The create was killed: between spawning sshd and recording its pid, or before.
        return "running" if _find_sshd(Path(meta["node_dir"])) else "stopped"

    def _kill_processes(self, node_id: str, *, graceful: bool) -> None:
        """End every process of the node: sshd's tree and all carrying the env marker."""
        marker = f"{ENV_MARKER}={node_id}".encode()
        config = str(self.root / node_id / "sshd_config").encode()
        known: dict[int, int] = {}  # pid -> start time, so that a reused pid is left alone
        for signum in ([signal.SIGTERM] if graceful else []) + [signal.SIGKILL] * 5:
            known = _survivors(known) | _node_processes(marker, config)
            if not known:
                return
            if not graceful:  # a machine dies at once: none of its processes sees another die first
                for pid in known:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGSTOP)
            for pid in known:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signum)
            deadline = time.monotonic() + (_GRACE if signum == signal.SIGTERM else 2.0)
            while _survivors(known) and time.monotonic() < deadline:
                time.sleep(_POLL)
        if _survivors(known):
            raise LocalDriverError(f"processes {sorted(known)} of node {node_id} survive SIGKILL", driver=self)


def _reservation_dir() -> Path:
    """``/tmp/orch-local-<uid>/``: one file per address:port taken by a node of any root."""
    folder = Path(tempfile.gettempdir()) / f"orch-local-{os.geteuid()}"
    with contextlib.suppress(FileExistsError):
        folder.mkdir(mode=0o700)
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise LocalDriverError(f"{folder} is not a private folder of ours; remove it")
    return folder


def _reservations() -> set[str]:
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


def _release_folder(node_dir: Path) -> None:
    """Drop every reservation held for ``node_dir`` (its address unknown)."""
    folder = _reservation_dir()
    for entry in folder.iterdir():
        with contextlib.suppress(OSError):
            if entry.read_text() == str(node_dir):
                entry.unlink()


def _reserve(address: str, node_dir: Path) -> None:
    (_reservation_dir() / address).write_text(str(node_dir))


def _release(address: str, node_dir: Path) -> None:
    entry = _reservation_dir() / address
    with contextlib.suppress(OSError):
        if entry.read_text() == str(node_dir):
            entry.unlink()


@contextlib.contextmanager
def _address_lock() -> Iterator[None]:
    """One lock per user for the whole machine (every root, every workspace)."""
    path = os.path.join(tempfile.gettempdir(), f"orch-local-addresses-{os.geteuid()}.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


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


def _sshd_argv(node_dir: Path) -> list[str]:
    return [SSHD, "-D", "-e", "-f", str(node_dir / "sshd_config")]


def _write_node_files(node_dir: Path, meta: dict[str, Any], pubkey: str, *, strict_modes: bool = True) -> str:
    """Write host key, authorized_keys, home/ and sshd_config; return the host key line."""
    host_key = ed25519.Ed25519PrivateKey.generate()
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
# Written by orch's local driver for node {meta["id"]}; see orchestrator/drivers/local.py.
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
SetEnv {ENV_MARKER}={meta["id"]} "HOME={home}"
"""
    _write_private(node_dir / "sshd_config", config.encode())
    return public.decode()


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` atomically: a reader sees the old or the new record, never half.

    No fsync: this guards against a crashed process, not a lost machine.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _this_process() -> dict[str, int]:
    """This process, as a pid and its start time (so that a reused pid is told apart)."""
    return {"pid": os.getpid(), "start": _start_time(os.getpid()) or 0}


def _start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


def _process_alive(identity: dict[str, Any]) -> bool:
    pid, start = identity.get("pid"), identity.get("start")
    return isinstance(pid, int) and pid > 0 and _start_time(pid) == start


def _find_sshd(node_dir: Path) -> int | None:
    """The pid of the node's sshd, found by its command line (sshd retitles itself
    "sshd: /usr/sbin/sshd -D -e -f CONFIG ..."), or None."""
    argv = " ".join(_sshd_argv(node_dir)).encode()
    with os.scandir("/proc") as entries:  # closed when we return from inside the loop
        for entry in entries:
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    cmdline = Path(f"/proc/{entry.name}/cmdline").read_bytes().replace(b"\0", b" ")
                    if argv in cmdline and _start_time(int(entry.name)) is not None:
                        return int(entry.name)
    return None


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _new_id(name: str) -> str:
    """``<name as slug>-<8 hex>``: unique across roots, so the env marker is too."""
    slug = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:40] or "node"
    return f"{slug}-{secrets.token_hex(4)}"


def _port_free(address: str, port: int) -> bool:
    """Whether nothing listens on address:port (or on the wildcard address)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError:
            return False
    return True


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, start time) of every process; zombies count as gone."""
    table: dict[int, tuple[int, int]] = {}
    with os.scandir("/proc") as entries:
        for entry in entries:
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    stat = Path(f"/proc/{entry.name}/stat").read_text()
                    fields = stat[stat.rfind(")") + 2 :].split()
                    if fields[0] not in ("Z", "X"):
                        table[int(entry.name)] = (int(fields[1]), int(fields[19]))
    return table


def _survivors(known: dict[int, int]) -> dict[int, int]:
    """The processes of ``known`` (pid -> start time) still alive; reaps our own."""
    for pid in known:
        _reap(pid)
    table = _proc_table()
    return {pid: start for pid, start in known.items() if table.get(pid, (0, -1))[1] == start}


def _node_processes(marker: bytes, config: bytes) -> dict[int, int]:
    """pid -> start time of a node's processes: its sshd (by config path in the title),
    those whose environment has the marker, and all their descendants."""
    table = _proc_table()
    found: set[int] = set()
    for pid in table:
        if pid == os.getpid():
            continue
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()  # sshd retitles itself "sshd: ..."
            if cmdline.startswith((SSHD.encode(), b"sshd: ")) and config in cmdline:
                found.add(pid)
                continue
        with contextlib.suppress(OSError):
            if marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found.add(pid)
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    todo = list(found)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return {pid: table[pid][1] for pid in found}


def _reap(pid: int) -> int | None:
    """Collect the exit of an sshd this process spawned: its exit code once it has ended,
    None while it runs or when it is not our child."""
    with _spawned_lock:
        if pid not in _spawned:
            return None
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # reaped elsewhere: ended, status unknown
            _spawned.discard(pid)
            return -1
        if done == 0:
            return None
        _spawned.discard(pid)
        return os.waitstatus_to_exitcode(status)


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(empty log)"


def _os_pretty_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return f"{platform.system()} {platform.release()}"
