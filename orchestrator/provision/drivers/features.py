"""What each driver declares beyond libcloud's ``NodeDriver`` API, and the one place
that reads those declarations.

libcloud's own ``features`` dict says little (``{"create_node": ["ssh_key"]}``), and
how a driver takes tags or the SSH key differs by keyword.  So every driver orch uses
declares a :class:`DriverFeatures`: ours as the class attribute ``orch_features``,
libcloud's stock drivers in :data:`STOCK` by their libcloud ``type`` (so subclasses,
such as a test adapter of EC2, inherit it).  The engine asks the declaration; it never
compares a driver's name or probes a signature.

>>> from orchestrator.provision.drivers.local import LocalNodeDriver  # doctest: +SKIP
>>> features_of(LocalNodeDriver).tags  # doctest: +SKIP
'ex_tags'
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Literal

TagArgument = Literal["ex_tags", "ex_metadata", "ex_labels"]
KeyStyle = Literal["auth", "key_pair"]


@dataclass(frozen=True)
class DriverFeatures:
    """How orch drives one kind of driver.

    ``tags``: the ``create_node`` keyword that takes orch's tags as a dict (None: the
    driver cannot tag, and orch refuses to create nodes it could not find again).
    ``ssh_key``: how ``create_node`` gets the fleet's public key: ``"auth"``, as
    ``auth=NodeAuthSSHKey(...)``; ``"key_pair"``, as ``ex_keyname=`` of a key pair
    imported once per workspace (EC2, OpenStack).
    ``node_folders``: one of orch's own drivers, which keeps its nodes' folders under
    ``.orch/drivers/DRIVER/PROVIDER`` (it takes ``root=``) and enforces the provider's
    ``max_nodes`` itself (it takes ``max_nodes=``).
    ``fleet_key_file``: the driver reaches machines itself with the fleet's private
    key (it takes ``key_file=``): the ``hosts`` driver cleans a machine it releases.
    ``bootstrap``: nodes can be bootstrapped over SSH at the address the driver
    reports (False: provisioned only, whatever the registration says).

    Where a node's agent reaches this machine is not a driver-wide answer: a driver
    that knows records it in the node's ``extra["gateway"]`` (``local``: 127.0.0.1;
    ``netns``: its bridge); for the others it is ``scheduler_address`` in orch.yaml.
    """

    tags: TagArgument | None
    ssh_key: KeyStyle = "auth"
    node_folders: bool = False
    fleet_key_file: bool = False
    bootstrap: bool = True


STOCK: dict[str, DriverFeatures] = {
    "ec2": DriverFeatures(tags="ex_metadata", ssh_key="key_pair"),
}
"""libcloud's stock drivers orch has been proven with, by ``NodeDriver.type``."""

_TAG_ARGUMENTS: tuple[TagArgument, ...] = ("ex_tags", "ex_metadata", "ex_labels")


def features_of(cls: type) -> DriverFeatures:
    """The driver class's declaration: its own ``orch_features``, else the stock table's
    entry for its libcloud ``type``, else one read once from its ``create_node``
    signature (a stock driver orch has no declaration for yet)."""
    declared = getattr(cls, "orch_features", None)
    if isinstance(declared, DriverFeatures):
        return declared
    stock = STOCK.get(str(getattr(cls, "type", "")))
    if stock is not None:
        return stock
    return _read_from_signature(cls)


def _read_from_signature(cls: type) -> DriverFeatures:
    create = getattr(cls, "create_node", None)
    params = inspect.signature(create).parameters if create is not None else {}
    tags = next((name for name in _TAG_ARGUMENTS if name in params), None)
    return DriverFeatures(tags=tags, ssh_key="key_pair" if "ex_keyname" in params else "auth")
