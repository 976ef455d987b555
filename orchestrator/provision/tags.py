"""Every tag orch writes on a cloud resource, and how to read them back.

Each node carries three: the workspace, the family and orch's node id, so that a
crash at any point leaves a node that ``recover`` finds again.
"""

from __future__ import annotations

from typing import Any

from libcloud.compute.base import Node

from orchestrator.errors import ProviderError
from orchestrator.provision.drivers import DriverFeatures

TAG_WORKSPACE = "orch-workspace"
TAG_FAMILY = "orch-family"
TAG_NODE = "orch-node"


def node_tags(node: Node) -> dict[str, str]:
    """The node's tags as a dict: from a dict (``extra["tags"]``, ``extra["labels"]``, or
    OpenStack's server ``extra["metadata"]``), or from ``key:value`` strings where the
    cloud's tags are plain strings."""
    extra = node.extra or {}
    tags = extra.get("tags") or extra.get("labels") or extra.get("metadata") or {}
    if isinstance(tags, (list, tuple)):
        pairs = (str(t).partition(":") for t in tags)
        return {key: value for key, sep, value in pairs if sep}
    return {str(k): str(v) for k, v in dict(tags).items()}


def tag_arguments(features: DriverFeatures, tags: dict[str, str]) -> dict[str, Any]:
    """``{"ex_tags": tags}``, or whatever keyword and shape the driver declares it takes
    tags by (``ex_create_attr={"tags": ["key:value", ...]}`` for DigitalOcean)."""
    if features.tags is None:
        raise ProviderError("this driver cannot tag nodes at create time",
                            hint="orch needs tags to find its nodes again; use a driver that declares how it "
                                 "takes tags (ex_tags, ex_metadata or ex_labels)")
    value: dict[str, str] | list[str] = tags if features.tag_style == "dict" else [f"{k}:{v}" for k, v in tags.items()]
    if features.tags == "ex_create_attr":
        return {"ex_create_attr": {"tags": value}}
    return {features.tags: value}
