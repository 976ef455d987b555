"""Every tag orch writes on a cloud resource, and how to read them back.

Each node carries three: the workspace, the family and orch's node id, so that a
crash at any point leaves a node that ``recover`` finds again.
"""

from __future__ import annotations

from libcloud.compute.base import Node

from orchestrator.errors import ProviderError
from orchestrator.provision.drivers import DriverFeatures

TAG_WORKSPACE = "orch-workspace"
TAG_FAMILY = "orch-family"
TAG_NODE = "orch-node"


def node_tags(node: Node) -> dict[str, str]:
    extra = node.extra or {}
    tags = extra.get("tags") or extra.get("labels") or {}
    return {str(k): str(v) for k, v in dict(tags).items()}


def tag_arguments(features: DriverFeatures, tags: dict[str, str]) -> dict[str, dict[str, str]]:
    """``{"ex_tags": tags}``, or whatever keyword the driver declares it takes tags by."""
    if features.tags is None:
        raise ProviderError("this driver cannot tag nodes at create time",
                            hint="orch needs tags to find its nodes again; use a driver that declares how it "
                                 "takes tags (ex_tags, ex_metadata or ex_labels)")
    return {features.tags: tags}
