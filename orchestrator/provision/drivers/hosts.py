"""``hosts``: a pool of existing machines ("bare metal") that nobody creates through an API.

The pool is the provider's ``options.hosts``; each entry names one machine, its shape and
its pinned host key.  Creating a node *claims* a free machine of the asked-for shape;
destroying it cleans the machine over SSH and releases the claim.  Claims are files,
``ROOT/claims/<host-name>.json``, written atomically under ``ROOT/.lock`` (flock), so two
orch processes never claim the same machine and a new process sees every claim.

What a machine must already have:

- the fleet's public key in the ``authorized_keys`` of ``user``: the driver installs no
  key.  ``auth=NodeAuthSSHKey(pubkey)`` is accepted, and refused when ``key_file`` is
  given and ``pubkey`` is not its public half (a node the fleet key could not reach);
- ``python3`` (the agent needs it anyway): ``destroy_node`` cleans with a python3 script.

``destroy_node`` connects with the pool's pinned host key and ``key_file`` and ends every
process of the user that belongs to the node: its environment has ``ORCH_NODE_ID=<id>``
(set by whoever starts it; sshd on a real machine does not), or its working folder,
executable or command line is under ``~/orch`` (bootstrap's folder); SIGTERM, then SIGKILL.
Then it removes ``~/orch`` and releases the claim.  On failure:

- ``HostKeyMismatch``, ``AuthenticationFailed``, ``CommandFailed``: raised, claim kept:
  the machine is not handed out again until it was cleaned (or ``ex_release``).
- ``NodeUnreachable`` while the machine is still in the pool: raised, claim kept, for
  the same reason.  When it has left the pool (retired from the YAML), the claim is
  released unclean and ``destroy_node`` returns False.

A node of an unknown id (released already) destroys as True: idempotent.

>>> driver = HostsNodeDriver(root=".orch/drivers/hosts/rack1", key_file=".orch/ssh/id_ed25519",
...                          hosts=[{"name": "m1", "address": "10.0.0.5", "user": "orch",
...                                  "host_key": "ssh-ed25519 AAAA...", "cpus": 8,
...                                  "ram_mb": 16384, "disk_gb": 200, "arch": "x86_64"}])  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import fcntl
import os
import shlex
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any

import paramiko
from libcloud.common.types import LibcloudError
from libcloud.compute.base import Node, NodeAuthPassword, NodeAuthSSHKey, NodeDriver, NodeImage, NodeLocation, NodeSize
from libcloud.compute.types import NodeState
from pydantic import Field, StringConstraints, ValidationError, field_validator

from orchestrator.config.models import Label, StrictModel
from orchestrator.provision import drivers
from orchestrator.provision.drivers.features import DriverFeatures
from orchestrator.provision.drivers.nodefolders import (
    QuotaExceededError,
    folder_chain_problem,
    new_id,
    read_json,
    write_json,
)
from orchestrator.remote.ssh import HostKeyMismatch, NodeUnreachable, SSHSession, SSHTarget, Timeouts

PROBE_TIMEOUT = 0.2  # seconds for a TCP connect that decides RUNNING vs UNKNOWN
_CLEAN_TIMEOUTS = Timeouts(connect=10.0, command=60.0)
# Runs on the machine: python3 -c SCRIPT NODE_ID.  Exit 1 with a reason when it fails.
_CLEAN_SCRIPT = r"""
import os, shutil, signal, sys, time
link = os.path.join(os.path.expanduser("~"), "orch")
root, marker, skip, pid = os.path.realpath(link), b"ORCH_NODE_ID=" + sys.argv[1].encode(), set(), os.getpid()
while pid > 1:  # never ourselves or our ancestors (the shell, sshd)
    skip.add(pid)
    try: pid = int(open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError): break
def belongs(pid):
    d = "/proc/%d/" % pid
    try:
        return (marker in open(d + "environ", "rb").read().split(b"\0")
                or any(t == root or t.startswith(root + "/") for t in (os.readlink(d + "cwd"), os.readlink(d + "exe")))
                or (root + "/").encode() in open(d + "cmdline", "rb").read())
    except OSError:
        return False
def find():
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) not in skip and belongs(int(p))]
for sig in (signal.SIGTERM, signal.SIGKILL, signal.SIGKILL):
    pids, deadline = find(), time.monotonic() + 2
    for p in pids:
        try: os.kill(p, sig)
        except OSError: pass
    while pids and time.monotonic() < deadline and any(belongs(p) for p in pids): time.sleep(0.02)
os.unlink(link) if os.path.islink(link) else shutil.rmtree(link, ignore_errors=True)
if find() or os.path.lexists(link):
    sys.exit("processes %s survive SIGKILL, or %s remains" % (find(), link))
"""


class HostsDriverError(LibcloudError):
    """The hosts driver cannot do what was asked (unusable root, bad size, no key_file)."""

    def __str__(self) -> str:  # libcloud's is a repr with the driver object in it
        return str(self.value)


class CapacityError(HostsDriverError, drivers.CapacityError):
    """No free machine of the asked-for size (and location): the pool is full."""

    def __init__(self, value: str, *, claimed: int, total: int, driver: NodeDriver | None = None) -> None:
        super().__init__(value, driver)
        self.claimed, self.total = claimed, total


class HostEntry(StrictModel):
    """One machine of ``options.hosts``; unknown keys are refused."""

    name: Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{0,40}$")]
    address: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9.:_-]{1,253}$")]
    port: int = Field(default=22, ge=1, le=65535)
    user: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}$")]
    host_key: str = Field(description="the machine's public host key line, pinned: 'ssh-ed25519 AAAA...'")
    cpus: int = Field(ge=1)
    ram_mb: int = Field(ge=1)
    disk_gb: int = Field(ge=1)
    arch: Annotated[str, StringConstraints(pattern=r"^[a-z0-9_]{1,32}$")]
    location: Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")] = "default"
    labels: list[Label] = Field(default_factory=list)

    @field_validator("host_key")
    @classmethod
    def _one_public_key(cls, value: str) -> str:
        parts = value.split()
        try:
            blob = base64.b64decode(parts[1], validate=True) if len(parts) >= 2 else b""
        except binascii.Error:
            blob = b""
        if not blob or not parts[0].startswith(("ssh-", "ecdsa-", "sk-")):
            raise ValueError("must be one OpenSSH public key line, 'ssh-ed25519 AAAA...' (ssh-keyscan prints it)")
        return f"{parts[0]} {parts[1]}"  # the comment is not part of the key

    @property
    def size_id(self) -> str:
        return f"h-{self.cpus}c-{self.ram_mb}m-{self.disk_gb}g-{self.arch}"


def parse_hosts(hosts: Any) -> list[HostEntry]:
    """Validate ``options.hosts``; a ValueError names the entry's index and field."""
    if not isinstance(hosts, list) or not hosts:
        raise ValueError("options.hosts must be a non-empty list of machines")
    entries = []
    for index, raw in enumerate(hosts):
        try:
            entries.append(HostEntry.model_validate(raw))
        except ValidationError as exc:
            name = f" ({raw.get('name')!r})" if isinstance(raw, dict) and raw.get("name") else ""
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(entry)'}: {e['msg']}" for e in exc.errors())
            raise ValueError(f"options.hosts[{index}]{name}: {problems}") from None
    for attribute in ("name", "endpoint"):
        seen: dict[str, int] = {}
        for index, entry in enumerate(entries):
            value = entry.name if attribute == "name" else f"{entry.address}:{entry.port}"
            if value in seen:
                raise ValueError(f"options.hosts[{index}]: {attribute} {value!r} repeats options.hosts[{seen[value]}]")
            seen[value] = index
    return entries


class HostsNodeDriver(NodeDriver):
    """Nodes that are claimed machines of a fixed pool, reached over SSH."""

    type = "hosts"
    name = "Existing machines over SSH"
    website = "https://www.openssh.com/"
    # libcloud declares these as plain class attributes; ClassVar would clash with it.
    features = {"create_node": ["ssh_key"]}  # noqa: RUF012
    orch_features = DriverFeatures(tags="ex_tags", ssh_key="auth", node_folders=True, fleet_key_file=True)
    NODE_STATE_MAP = {"reachable": NodeState.RUNNING, "unreachable": NodeState.UNKNOWN}  # noqa: RUF012

    def __init__(
        self,
        key: str | None = None,
        secret: str | None = None,
        *,
        root: str | os.PathLike[str],
        hosts: list[dict[str, Any]],
        key_file: str | os.PathLike[str] | None = None,
        max_nodes: int | None = None,
    ) -> None:
        if max_nodes is not None and max_nodes < 0:
            raise ValueError(f"max_nodes must be >= 0, not {max_nodes}")
        self.hosts = parse_hosts(hosts)
        self.root = Path(os.path.realpath(os.path.expanduser(root)))
        self.key_file = Path(os.path.expanduser(key_file)) if key_file is not None else None
        self.max_nodes = max_nodes
        super().__init__(key or "hosts", secret)  # type: ignore[no-untyped-call]

    # -- catalogue -------------------------------------------------------------------

    def list_sizes(self, location: NodeLocation | None = None) -> list[NodeSize]:
        shapes = {h.size_id: h for h in self.hosts if location is None or h.location == location.id}
        return [
            NodeSize(sid, sid, h.ram_mb, h.disk_gb, None, 0.0, self, extra={"cpus": h.cpus, "arch": h.arch})
            for sid, h in sorted(shapes.items())
        ]

    def list_images(self, location: NodeLocation | None = None) -> list[NodeImage]:
        return [NodeImage("host", "the machine as it is", self)]

    def list_locations(self) -> list[NodeLocation]:
        return [NodeLocation(loc, loc, "ZZ", self) for loc in sorted({h.location for h in self.hosts})]

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
        self._check_auth(auth)
        if size.id not in {h.size_id for h in self.hosts}:
            raise ValueError(f"unknown size {size.id!r}; list_sizes() offers {[s.id for s in self.list_sizes()]}")
        if image.id != "host":
            raise ValueError(f"unknown image {image.id!r}; the only image is 'host'")
        where = location.id if location is not None else None
        if where is not None and where not in {h.location for h in self.hosts}:
            raise ValueError(
                f"unknown location {where!r}; list_locations() offers {sorted({h.location for h in self.hosts})}"
            )
        with self._claims_lock():
            claims = self._read_claims()
            if self.max_nodes is not None and len(claims) >= self.max_nodes:
                raise QuotaExceededError(
                    f"quota reached: {len(claims)} of max_nodes={self.max_nodes} hosts claimed under {self.root}",
                    quota=self.max_nodes,
                    driver=self,
                )
            fitting = [h for h in self.hosts if h.size_id == size.id and where in (None, h.location)]
            free = [h for h in fitting if h.name not in claims]
            if not free:
                raise CapacityError(
                    f"no free host of size {size.id} in location {where or '(any)'}: "
                    f"{len(fitting) - len(free)} of {len(fitting)} claimed",
                    claimed=len(fitting) - len(free),
                    total=len(fitting),
                    driver=self,
                )
            host = free[0]
            claim: dict[str, Any] = {
                "id": new_id(host.name),
                "name": name,
                "host": host.model_dump(mode="json"),
                "tags": dict(ex_tags or {}),
                "created_at": dt.datetime.now(dt.UTC).isoformat(),
            }
            write_json(self._claim_path(host.name), claim)
        return self._to_node(claim, "reachable" if _reachable(host) else "unreachable")

    def list_nodes(self) -> list[Node]:
        claims = sorted(self._read_claims().values(), key=lambda c: (c["created_at"], c["id"]))
        hosts = [self._host_of(c) for c in claims]
        with ThreadPoolExecutor(max_workers=max(1, min(32, len(hosts)))) as probes:
            up = list(probes.map(_reachable, hosts))
        return [self._to_node(c, "reachable" if ok else "unreachable") for c, ok in zip(claims, up, strict=True)]

    def destroy_node(self, node: Node) -> bool:
        claim = self._claim_of(str(node.id))
        if claim is None:
            return True
        host = self._host_of(claim)
        if self.key_file is None:
            raise HostsDriverError(f"cannot clean host {host.name} of node {claim['id']}: no key_file", driver=self)
        target = SSHTarget(host.name, host.address, host.port, host.user, host.host_key, self.key_file)
        command = f"python3 -c {shlex.quote(_CLEAN_SCRIPT)} {shlex.quote(claim['id'])}"
        cleaned = True
        try:
            with SSHSession(target, timeouts=_CLEAN_TIMEOUTS) as session:
                session.run(command, check=True)
        except HostKeyMismatch as exc:
            raise HostKeyMismatch(
                f"host {host.name} ({host.address}:{host.port}) of node {claim['id']} offered host key "
                f"{exc.offered}, but {exc.expected} is pinned; the host was not cleaned and stays claimed",
                expected=exc.expected,
                offered=exc.offered,
                hint=f"check the machine's key out of band (on its console), correct the host_key of {host.name!r} "
                "in the provider's options.hosts, then destroy again",
            ) from exc
        except NodeUnreachable:
            if any(h.name == host.name for h in self.hosts):
                raise  # still in the pool: never hand out a machine we could not clean
            cleaned = False
        self._release(claim["id"], host.name)
        return cleaned

    def ex_release(self, node: Node) -> bool:
        """Drop the node's claim without touching the machine (the operator cleaned it)."""
        claim = self._claim_of(str(node.id))
        if claim is not None:
            self._release(claim["id"], claim["host"]["name"])
        return True

    def _to_node(self, claim: dict[str, Any], status: str) -> Node:
        host = self._host_of(claim)
        sizes = {s.id: s for s in self.list_sizes()}
        extra = {
            "host_key": host.host_key,
            "port": host.port,
            "ssh_user": host.user,
            "tags": dict(claim["tags"]),
            "host": host.name,
            "location": host.location,
            "host_labels": list(host.labels),
            "created_at": claim["created_at"],
            "status": status,
        }
        return Node(
            id=claim["id"],
            name=claim["name"],
            state=self.NODE_STATE_MAP.get(status, NodeState.UNKNOWN),
            public_ips=[host.address],
            private_ips=[],
            driver=self,
            size=sizes.get(host.size_id),
            image=self.list_images()[0],
            extra=extra,
            created_at=dt.datetime.fromisoformat(claim["created_at"]),
        )

    # -- claims ----------------------------------------------------------------------

    def _check_auth(self, auth: NodeAuthSSHKey | NodeAuthPassword | None) -> None:
        if isinstance(auth, NodeAuthPassword):
            raise ValueError("the hosts driver takes auth=NodeAuthSSHKey(public_key) or none; not a password")
        if auth is None or self.key_file is None:
            return
        try:
            key = paramiko.Ed25519Key.from_private_key_file(str(self.key_file))
        except (OSError, paramiko.SSHException) as exc:
            raise ValueError(f"cannot read key_file {self.key_file}: {exc}") from exc
        if auth.pubkey.split()[:2] != [key.get_name(), key.get_base64()]:
            raise ValueError(
                f"auth.pubkey is not the public half of key_file {self.key_file}: the hosts driver installs no key, "
                "the machines trust the fleet key only"
            )

    def _host_of(self, claim: dict[str, Any]) -> HostEntry:
        """The pool's current entry (a corrected host key wins), or the claimed snapshot."""
        snapshot = HostEntry.model_validate(claim["host"])
        return next((h for h in self.hosts if h.name == snapshot.name), snapshot)

    def _claim_path(self, host_name: str) -> Path:
        return self.root / "claims" / f"{host_name}.json"

    def _read_claims(self) -> dict[str, dict[str, Any]]:
        """host name -> claim, for every claim file (hosts that left the pool too)."""
        folder = self.root / "claims"
        claims = [read_json(p) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []
        return {c["host"]["name"]: c for c in claims if c}

    def _claim_of(self, node_id: str) -> dict[str, Any] | None:
        return next((c for c in self._read_claims().values() if c["id"] == node_id), None)

    def _release(self, node_id: str, host_name: str) -> None:
        with self._claims_lock():
            current = read_json(self._claim_path(host_name))
            if current is not None and current["id"] == node_id:  # not a newer claim on the host
                self._claim_path(host_name).unlink()

    def _prepare_root(self) -> None:
        (self.root / "claims").mkdir(mode=0o700, parents=True, exist_ok=True)
        problem = folder_chain_problem(self.root)
        if problem:
            raise HostsDriverError(f"another user could rewrite the claims under {self.root}: {problem}", driver=self)

    @contextlib.contextmanager
    def _claims_lock(self) -> Iterator[None]:
        """Serialize claims across threads and processes (one open file per holder)."""
        self._prepare_root()
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def _reachable(host: HostEntry) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host.address, host.port), PROBE_TIMEOUT):
        return True
    return False
