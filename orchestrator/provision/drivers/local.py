"""``local``: libcloud nodes that are OpenSSH ``sshd`` processes on 127.0.0.N.

Each node is one ``sshd`` listening on its own loopback address, with its own host key
(handed over in ``extra``, like a cloud's console output).  This module owns the driver:
the catalogue, the address choice (loopback addresses are the machine's: chosen under a
machine-wide lock, then reserved), the order of a create, and what a node's state is.
What it builds on:

- :mod:`~orchestrator.provision.drivers.nodefolders`: the node's folder ``ROOT/<id>/``
  (its disk: ``meta.json``, host key, sshd_config, authorized_keys, a clean HOME), made
  atomically, swept when a create was killed, and the loopback reservations;
- :mod:`~orchestrator.provision.drivers.processes`: finding, spawning, reaping and
  ending the node's processes.

The driver keeps nothing in memory that matters, so a new driver on the same root (a new
orch process after a crash) sees the same nodes.  The record names its creating process,
so a node whose create was killed before sshd started is listed ``stopped`` at once, not
``pending``.  ``destroy_node`` ends every process the node started (sshd by its config
path, sessions by ``ORCH_NODE_ID`` in their environment, and descendants).

>>> driver = LocalNodeDriver(root=".orch/drivers/local/laptop", max_nodes=8)  # doctest: +SKIP
>>> node = driver.create_node("w1", driver.list_sizes()[0], driver.list_images()[0],
...                           auth=NodeAuthSSHKey(pubkey))                      # doctest: +SKIP
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import pwd
import shutil
import socket
from pathlib import Path
from typing import Any

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

from orchestrator.agent.platforms import host_platform
from orchestrator.provision.drivers.features import DriverFeatures
from orchestrator.provision.drivers.nodefolders import (
    META,
    UNSAFE_PATH_CHARS,
    LocalDriverError,
    QuotaExceededError,
    address_lock,
    cloud_config_host_key,
    folder_chain_problem,
    leftovers,
    make_node_folder,
    new_id,
    node_id_of,
    read_record,
    read_records,
    release,
    release_folder,
    reservations,
    root_lock,
    strict_modes_problem,
    sweep_leftovers,
    write_json,
    write_node_files,
)
from orchestrator.provision.drivers.processes import (
    ENV_MARKER,
    end_processes,
    find_sshd,
    node_processes,
    process_alive,
    spawn,
    sshd_alive,
    sshd_argv,
    this_process,
    wait_for_sshd,
)

# id, cpus, ram (MB), disk (GB)
_SIZES = (("local-1", 1, 512, 10), ("local-2", 2, 1024, 20), ("local-4", 4, 2048, 40))

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
    orch_features = DriverFeatures(tags="ex_tags", ssh_key="auth", node_folders=True)
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
        path: str | None = None,
    ) -> None:
        """``path``: the PATH of the nodes' sessions, as a minimal image has it (sshd's
        default when not given); a node whose PATH holds no compiler has none."""
        if not 1 <= first_address <= 254:
            raise ValueError(f"first_address must be in 1..254 (127.0.0.N), not {first_address}")
        if not 1 <= port <= 65535:
            raise ValueError(f"port must be in 1..65535, not {port}")
        if max_nodes is not None and max_nodes < 0:
            raise ValueError(f"max_nodes must be >= 0, not {max_nodes}")
        self.root = Path(os.path.realpath(os.path.expanduser(root)))
        if UNSAFE_PATH_CHARS & set(str(self.root)):
            raise ValueError(f"root {self.root!r} holds a space, quote, backslash or %: sshd_config cannot say it")
        self.max_nodes = max_nodes
        self.ssh_port = port
        self.first_address = first_address
        self.start_timeout = start_timeout
        if path is not None and (not path or UNSAFE_PATH_CHARS & set(path)):
            raise ValueError(f"path {path!r} is empty or holds a space, quote, backslash or %")
        self.path = path
        # Whether the nodes' sshd_config keeps StrictModes on; set by prepare_root.
        self.strict_modes = True
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
        ex_userdata: str | None = None,
    ) -> Node:
        """A node: an sshd on a free loopback address.  ``ex_userdata``: a
        ``#cloud-config`` document whose ``ssh_keys`` host key the node takes, as a
        cloud's node does (the protocol peers of the clouds back their nodes so)."""
        host_key = cloud_config_host_key(ex_userdata) if ex_userdata else None
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
        self.prepare_root()
        # Loopback addresses belong to the machine, not to this root: they are chosen
        # and reserved under a machine-wide lock; sshd then starts outside it.
        with address_lock(), root_lock(self.root):
            sweep_leftovers(self.root, self._kill_at_once, recordless=True)
            metas = read_records(self.root)
            if self.max_nodes is not None and len(metas) >= self.max_nodes:
                raise QuotaExceededError(
                    f"quota reached: {len(metas)} of max_nodes={self.max_nodes} local nodes exist "
                    f"under {self.root}",
                    quota=self.max_nodes,
                    driver=self,
                )
            reserved = {a.rsplit(":", 1)[0] for a in reservations() if a.endswith(f":{self.ssh_port}")}
            address = self._free_address({m["address"] for m in metas} | reserved)
            node_id = new_id(name)
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
                "creator": this_process(),
                "created_at": dt.datetime.now(dt.UTC).isoformat(),
                **({"path": self.path} if self.path else {}),
            }
            make_node_folder(node_dir, meta, f"{address}:{self.ssh_port}")
        try:
            meta["host_key"] = write_node_files(node_dir, meta, pubkey, strict_modes=self.strict_modes,
                                                host_key=host_key)
            write_json(node_dir / META, meta)
            self._start_sshd(meta)
        except BaseException:
            self._kill_processes(node_id, graceful=False)
            shutil.rmtree(node_dir, ignore_errors=True)
            release(f"{address}:{self.ssh_port}", node_dir)
            raise
        return self.node_from_record(meta)

    def list_nodes(self) -> list[Node]:
        self._sweep()
        return [self.node_from_record(meta) for meta in read_records(self.root)]

    def destroy_node(self, node: Node) -> bool:
        node_id = node_id_of(node)
        meta = read_record(self.root, node_id) if (self.root / node_id / META).exists() else None
        self._kill_processes(node_id, graceful=True)
        shutil.rmtree(self.root / node_id, ignore_errors=True)
        if meta:
            release(f"{meta['address']}:{meta['port']}", self.root / node_id)
        else:  # a folder without its record: whatever names it
            release_folder(self.root / node_id)
        if (self.root / node_id).exists():
            raise LocalDriverError(f"could not remove {self.root / node_id}", driver=self)
        return True

    def stop_node(self, node: Node) -> bool:
        """End every process of the node (SIGTERM, then SIGKILL); keep its folder."""
        self._kill_processes(node_id_of(node), graceful=True)
        return True

    def start_node(self, node: Node) -> bool:
        """Start a stopped node's sshd again, with the same address and host key."""
        meta = self.node_record(node_id_of(node))
        if not sshd_alive(Path(meta["node_dir"]), meta.get("pid")):
            self._start_sshd(meta)
        return True

    def reboot_node(self, node: Node) -> bool:
        return self.stop_node(node) and self.start_node(node)

    def ex_kill_node(self, node: Node) -> bool:
        """SIGKILL every process of the node at once and keep its folder (fault injection)."""
        self._kill_processes(node_id_of(node), graceful=False)
        return True

    def ex_host_key(self, node: Node) -> str:
        """The node's public host key line, ``ssh-ed25519 AAAA...``."""
        key: str = self.node_record(node_id_of(node))["host_key"]
        return key

    # -- for drivers whose nodes live in node folders too (netns) --------------------

    def prepare_root(self) -> None:
        """Make the root and check that nobody else could swap its folders
        (``LocalDriverError`` names the culprit); set ``strict_modes`` to whether sshd's
        own, stricter check agrees (it refuses any path below /tmp)."""
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
        self.strict_modes = strict_modes_problem(self.root) is None

    def node_record(self, node_id: str) -> dict[str, Any]:
        """The ``meta.json`` of node ``node_id``; ``LocalDriverError`` when there is none."""
        meta = read_record(self.root, node_id)
        if meta is None:
            raise LocalDriverError(f"no local node {node_id} under {self.root}", driver=self)
        return meta

    def node_from_record(self, meta: dict[str, Any]) -> Node:
        """The libcloud Node of a ``meta.json`` record, with its state asked of its
        processes now (running, pending while its create goes on, else stopped)."""
        status = self._status(meta)
        sizes = {s.id: s for s in self.list_sizes()}
        extra = {key: meta[key] for key in ("host_key", "port", "ssh_user", "node_dir", "pid", "size", "image")}
        extra.update(tags=dict(meta["tags"]), created_at=meta["created_at"], status=status,
                     gateway="127.0.0.1",  # where the node reaches this machine: loopback
                     platform=host_platform())  # what binaries it runs: this machine's
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

    # -- internals -------------------------------------------------------------------

    def _sweep(self) -> None:
        """Remove the folders of creates killed before their folder appeared; cheap when
        there is none.  (A listing leaves other folders alone; ``create_node`` sweeps
        folders without a record too, where their reservations matter.)"""
        if leftovers(self.root, recordless=False):
            with address_lock(), root_lock(self.root):
                sweep_leftovers(self.root, self._kill_at_once, recordless=False)

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

    def _start_sshd(self, meta: dict[str, Any]) -> None:
        node_dir = Path(meta["node_dir"])
        if os.geteuid() == 0:  # root's sshd wants its privilege separation folder
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        # Not our environment: the orch process may hold credentials.
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", ENV_MARKER: meta["id"]}
        pid = spawn(sshd_argv(node_dir), env, node_dir / "sshd.log")
        meta["pid"] = pid
        write_json(node_dir / META, meta)
        problem = wait_for_sshd(pid, meta["id"], meta["address"], meta["port"], node_dir / "sshd.log",
                                timeout=self.start_timeout, connect_timeout=1)
        if problem:
            raise LocalDriverError(problem, driver=self)

    def _status(self, meta: dict[str, Any]) -> str:
        """running: its sshd is alive; pending: sshd not started yet by a create that is
        still going on; stopped: anything else (such as a create killed half-way)."""
        if sshd_alive(Path(meta["node_dir"]), meta.get("pid")):
            return "running"
        if meta.get("pid") is not None:
            return "stopped"
        creator = meta.get("creator")
        if isinstance(creator, dict):
            if process_alive(creator):
                return "pending"
        else:  # a record from before "creator": young means pending
            created = dt.datetime.fromisoformat(meta["created_at"])
            if dt.datetime.now(dt.UTC) - created < dt.timedelta(seconds=2 * self.start_timeout):
                return "pending"
        # The create was killed: between spawning sshd and recording its pid, or before.
        return "running" if find_sshd(Path(meta["node_dir"])) else "stopped"

    def _kill_processes(self, node_id: str, *, graceful: bool) -> None:
        """End every process of the node: sshd's tree and all carrying the env marker.
        Not graceful, a machine dies at once: all are stopped before any is killed."""
        node_dir = self.root / node_id
        left = end_processes(lambda: node_processes(node_id, node_dir), graceful=graceful, stop_first=not graceful)
        if left:
            raise LocalDriverError(f"processes {sorted(left)} of node {node_id} survive SIGKILL", driver=self)

    def _kill_at_once(self, node_id: str) -> None:
        """What a sweep does to a dead create's processes."""
        self._kill_processes(node_id, graceful=False)


def _port_free(address: str, port: int) -> bool:
    """Whether nothing listens on address:port (or on the wildcard address)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError:
            return False
    return True


def _os_pretty_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return f"{platform.system()} {platform.release()}"
