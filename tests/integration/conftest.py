"""Fixtures for tests against real local nodes: real sshd processes, real SSH.

Every node a test makes lives under a root that the ``driver`` fixture owns; its
teardown destroys every node found there, checks that no process of theirs survived,
and removes the root, whether the test passed or not.  Helpers reach the tests as
fixtures (``node_processes``, ``new_key_pair``): test modules do not import conftest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from libcloud.compute.base import Node, NodeAuthSSHKey
from libcloud.compute.types import NodeState

from orchestrator.provision.drivers import driver_class
from orchestrator.provision.drivers.local import LocalNodeDriver
from orchestrator.remote.ssh import SSHPool, SSHTarget

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class KeyPair:
    private: Path
    public: str


def make_key_pair(folder: Path, name: str = "fleet_key") -> KeyPair:
    """An ed25519 key pair, the private half in OpenSSH format (0600) under ``folder``."""
    key = ed25519.Ed25519PrivateKey.generate()
    private = folder / name
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    private.chmod(0o600)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return KeyPair(private, public.decode())


def processes_of(node_id: object, node_dir: str | Path) -> list[int]:
    """Live (non-zombie) pids that belong to a node, found independently of the driver:
    ORCH_NODE_ID=<id> in their environment, its sshd_config in their command line, and
    the descendants of those (sshd's connection processes carry neither)."""
    marker = f"ORCH_NODE_ID={node_id}".encode()
    config = str(Path(node_dir) / "sshd_config").encode()
    found: set[int] = set()
    parents: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        state, ppid = stat[stat.rfind(")") + 2 :].split()[:2]
        if state in "ZX":
            continue
        parents[int(proc.name)] = int(ppid)
        if marker in environ or config in cmdline:
            found.add(int(proc.name))
    grew = True
    while grew:
        more = {pid for pid, ppid in parents.items() if ppid in found} - found
        found |= more
        grew = bool(more)
    return sorted(found)


@pytest.fixture
def nodes_root(tmp_path: Path) -> Path:
    """A folder for nodes: pytest's tmp_path (under the sticky /tmp) is accepted."""
    return tmp_path / "nodes"


def destroy_all(driver: LocalNodeDriver) -> None:
    """Destroy every node under the driver's root and prove nothing of them is left."""
    survivors = {}
    for node in driver.list_nodes():
        driver.destroy_node(node)
        survivors[node.id] = processes_of(node.id, node.extra["node_dir"])
    half_written = [d.name for d in driver.root.iterdir() if d.is_dir()] if driver.root.is_dir() else []
    for name in half_written:
        driver.destroy_node(Node(name, name, NodeState.UNKNOWN, [], [], driver))
    assert not any(survivors.values()), f"processes survived destroy_node: {survivors}"
    assert not half_written, f"node folders without metadata were left behind: {half_written}"


@pytest.fixture
def driver(nodes_root: Path) -> Iterator[LocalNodeDriver]:
    """A local driver on a fresh root, made the way the engine makes it."""
    cls = driver_class("local")
    made = cls(None, root=nodes_root)
    assert isinstance(made, LocalNodeDriver)
    try:
        yield made
    finally:
        destroy_all(made)


@pytest.fixture
def fleet_key(tmp_path: Path) -> KeyPair:
    """The fleet's key pair: nodes are created with its public half."""
    return make_key_pair(tmp_path)


@pytest.fixture
def new_key_pair(tmp_path: Path) -> Callable[[str], KeyPair]:
    """``new_key_pair(name)``: another key pair, e.g. one the nodes do not know."""
    return lambda name: make_key_pair(tmp_path, name)


@pytest.fixture
def node_processes() -> Callable[[object, str | Path], list[int]]:
    """``node_processes(node_id, node_dir)``: see :func:`processes_of`."""
    return processes_of


MakeNodes = Callable[..., list[Node]]


@pytest.fixture
def make_nodes(driver: LocalNodeDriver, fleet_key: KeyPair) -> MakeNodes:
    """``make_nodes(n, name="w", **create_kwargs)``: n new nodes; the ``driver``
    fixture destroys them all in teardown."""

    def make(count: int, name: str = "w", **kwargs: Any) -> list[Node]:
        size = driver.list_sizes()[0]
        image = driver.list_images()[0]
        auth = NodeAuthSSHKey(fleet_key.public)
        return [driver.create_node(f"{name}{i}", size, image, auth=auth, **kwargs) for i in range(count)]

    return make


TargetOf = Callable[[Node], SSHTarget]


@pytest.fixture
def target_of(fleet_key: KeyPair) -> TargetOf:
    return lambda node: SSHTarget.from_node(node, fleet_key.private)


@pytest.fixture
def pool() -> Iterator[SSHPool]:
    with SSHPool() as p:
        yield p
