"""Fixtures for tests against real local nodes: real sshd processes, real SSH.

Every node a test makes lives under a root that the ``driver`` fixture owns; its
teardown destroys every node found there, checks that no process of theirs survived,
and removes the root, whether the test passed or not.  Test modules do not import
conftest: helpers are in tests/helpers (some reach the tests as fixtures too:
``node_processes``, ``new_key_pair``).

The EC2 fixtures (at the end) run the EC2 API on a local moto server: every test gets its
own ``moto_server`` on a free port, stopped by its pid in teardown whatever the outcome.
Providers reach it through ``tests.helpers.moto_ec2.MotoEC2NodeDriver`` (libcloud's
stock EC2 driver plus moto's differences), registered as ``ec2moto`` through
``ORCH_DRIVER_PLUGINS`` in the environment, so that ``orch`` subprocesses find it too.
moto's instances have fake addresses: nothing here connects to them, as the adapter
declares (its ``orch_features`` say its nodes are not bootstrapped).  Workspaces keep their default ed25519 fleet
key: orch imports it as a key pair of its own (``orch-<workspace>-<digest>``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from libcloud.compute.base import Node, NodeAuthSSHKey

from orchestrator.provision.drivers import driver_class
from orchestrator.provision.drivers.local import LocalNodeDriver
from orchestrator.remote.pool import SSHPool
from orchestrator.remote.ssh import SSHTarget
from tests.helpers.ec2_faults import FaultProxy
from tests.helpers.keys import KeyPair, make_key_pair
from tests.helpers.local_nodes import MakeNodes, TargetOf, destroy_all
from tests.helpers.moto_ec2 import FAKE_CREDENTIALS, PLUGIN, Instances, MotoServer, ec2_client, start_moto
from tests.helpers.processes import processes_of
from tests.helpers.workspace import REPO
from tests.peers.ec2 import BackedEC2


@pytest.fixture
def nodes_root(tmp_path: Path) -> Path:
    """A folder for nodes: pytest's tmp_path (under the sticky /tmp) is accepted."""
    return tmp_path / "nodes"


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
    """``node_processes(node_id, node_dir)``: see :func:`tests.helpers.processes.processes_of`."""
    return processes_of


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


@pytest.fixture
def target_of(fleet_key: KeyPair) -> TargetOf:
    return lambda node: SSHTarget.from_node(node, fleet_key.private)


@pytest.fixture
def pool() -> Iterator[SSHPool]:
    with SSHPool() as p:
        yield p


# -- EC2 on a local moto server ------------------------------------------------------------


@pytest.fixture
def ec2_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The environment EC2 tests run orch in (in-process, and inherited by subprocesses):
    the ``ec2moto`` plugin, the repository on PYTHONPATH, fake AWS credentials."""
    monkeypatch.setenv("ORCH_DRIVER_PLUGINS", PLUGIN)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    for key, value in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    return dict(os.environ)


@pytest.fixture
def moto_server(tmp_path: Path, ec2_env: dict[str, str]) -> Iterator[MotoServer]:
    """A fresh moto server on a free port; stopped (by pid) afterwards."""
    server = start_moto(folder=tmp_path / "moto")
    try:
        yield server
    finally:
        server.stop()
        assert server.process.poll() is not None, "moto_server survived its stop"


@pytest.fixture
def fault_proxy(moto_server: MotoServer) -> Iterator[FaultProxy]:
    """A fault-injecting EC2 proxy in front of ``moto_server`` (no faults until told)."""
    proxy = FaultProxy(moto_server.port).start()
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture
def backed_ec2(moto_server: MotoServer, tmp_path: Path) -> Iterator[BackedEC2]:
    """The EC2 peer with real nodes: ``moto_server`` behind a fault proxy that backs each
    instance with a local sshd node (tests/peers/ec2.py); every node gone afterwards."""
    proxy = BackedEC2(moto_server.port, tmp_path / "instances").start()
    try:
        yield proxy
    finally:
        proxy.stop()
        assert proxy.backing.driver.list_nodes() == [], "a backing node outlived the test"


@pytest.fixture
def ec2(moto_server: MotoServer) -> Any:
    """A boto3 EC2 client for ``moto_server``: what the instances really look like."""
    return ec2_client(moto_server)


@pytest.fixture
def ec2_instances(ec2: Any) -> Instances:
    """``ec2_instances(workspace_id=None, states=())``: moto's instances as boto3 describes
    them (optionally only those with our workspace tag, in these states), each with its
    tags as a dict under ``"TagMap"``."""

    def find(*, workspace_id: str | None = None, states: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        filters = []
        if workspace_id is not None:
            filters.append({"Name": "tag:orch-workspace", "Values": [workspace_id]})
        if states:
            filters.append({"Name": "instance-state-name", "Values": list(states)})
        found = []
        for reservation in ec2.describe_instances(Filters=filters)["Reservations"]:
            for instance in reservation["Instances"]:
                found.append({**instance, "TagMap": {t["Key"]: t["Value"] for t in instance.get("Tags", [])}})
        return found

    return find
