"""Real nodes behind a peer's instances.

Each instance a peer creates is a local sshd node (orch's own local driver, under the
peer's folder): on its own loopback address 127.0.0.N, port 22 as on a cloud's image,
accepting the fleet key the instance was created with, and offering the host key of
the instance's cloud-init user data (``ssh_keys``), as cloud-init would install it.  A
peer reports that address as the instance's public IP: nothing is ever sent to an
address a peer invents.
"""

from __future__ import annotations

import threading
from pathlib import Path

from libcloud.compute.base import Node, NodeAuthSSHKey

from orchestrator.provision.drivers.local import LocalNodeDriver

SSH_PORT = 22


class Backing:
    """The local nodes of one peer, by instance id (the local node's name)."""

    def __init__(self, root: Path, *, port: int = SSH_PORT) -> None:
        self.driver = LocalNodeDriver(None, root=root, port=port)
        self._lock = threading.Lock()

    def start(self, instance_id: str, public_key: str, user_data: str | None = None, *,
              size: str = "local-1") -> str:
        """Start the instance's node; its address.  ``public_key``: one OpenSSH line."""
        sizes = {s.id: s for s in self.driver.list_sizes()}
        node = self.driver.create_node(instance_id, sizes.get(size) or sizes["local-1"],
                                       self.driver.list_images()[0], auth=NodeAuthSSHKey(public_key),
                                       ex_userdata=user_data or None)
        return str(node.public_ips[0])

    def node(self, instance_id: str) -> Node | None:
        return next((n for n in self.driver.list_nodes() if n.name == instance_id), None)

    def address(self, instance_id: str) -> str | None:
        node = self.node(instance_id)
        return str(node.public_ips[0]) if node is not None else None

    def stop(self, instance_id: str) -> None:
        """The instance's node gone (its processes ended, its folder removed); no error
        when there is none."""
        node = self.node(instance_id)
        if node is not None:
            self.driver.destroy_node(node)

    def close(self) -> None:
        """Every node of this peer gone."""
        for node in self.driver.list_nodes():
            self.driver.destroy_node(node)
