"""Local nodes (LocalNodeDriver) made directly through the driver, and proving that none
is left."""

from __future__ import annotations

from collections.abc import Callable

from libcloud.compute.base import Node
from libcloud.compute.types import NodeState

from orchestrator.provision.drivers.local import LocalNodeDriver
from orchestrator.remote.ssh import SSHTarget
from tests.helpers.processes import processes_of

MakeNodes = Callable[..., list[Node]]
"""The ``make_nodes`` fixture: ``make_nodes(n, name="w", **create_kwargs)``."""
TargetOf = Callable[[Node], SSHTarget]
"""The ``target_of`` fixture: a node's SSH target with the fleet key."""


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
