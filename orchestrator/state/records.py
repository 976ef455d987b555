"""Typed records the store hands out; rows never leave ``orchestrator.state``."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any


class NodeState(enum.StrEnum):
    """A node's lifecycle.

    requested -> creating -> booting -> bootstrapping -> ready -> stopping -> stopped,
    and failed or lost from any live state.
    """

    REQUESTED = "requested"
    CREATING = "creating"
    BOOTING = "booting"
    BOOTSTRAPPING = "bootstrapping"
    READY = "ready"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"
    LOST = "lost"

    @property
    def live(self) -> bool:
        """Whether a node in this state may exist at its provider."""
        return self is not NodeState.STOPPED


_S = NodeState
# Which moves are legal; anything else is a bug in the caller, refused by the store.
NODE_TRANSITIONS: dict[NodeState, frozenset[NodeState]] = {
    _S.REQUESTED: frozenset({_S.CREATING, _S.FAILED, _S.STOPPING, _S.STOPPED}),
    _S.CREATING: frozenset({_S.BOOTING, _S.FAILED, _S.LOST, _S.STOPPING}),
    _S.BOOTING: frozenset({_S.BOOTSTRAPPING, _S.READY, _S.FAILED, _S.LOST, _S.STOPPING}),
    _S.BOOTSTRAPPING: frozenset({_S.READY, _S.FAILED, _S.LOST, _S.STOPPING}),
    _S.READY: frozenset({_S.BOOTSTRAPPING, _S.FAILED, _S.LOST, _S.STOPPING}),
    _S.STOPPING: frozenset({_S.STOPPED, _S.FAILED, _S.LOST}),
    _S.FAILED: frozenset({_S.STOPPING, _S.STOPPED}),
    _S.LOST: frozenset({_S.READY, _S.STOPPING, _S.STOPPED}),
    _S.STOPPED: frozenset(),
}


def _loads(text: str | None) -> Any:
    return json.loads(text) if text else {}


@dataclass(frozen=True)
class ProviderRecord:
    name: str
    driver: str
    config: dict[str, Any]
    registered_at: float
    updated_at: float


@dataclass(frozen=True)
class ReleaseRecord:
    name: str
    version: str
    sha256: str
    size: int
    manifest: dict[str, Any]
    uploaded_at: float

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class ArtifactRecord:
    """A release built for one platform: what nodes of that platform get."""

    name: str
    version: str
    platform: str
    sha256: str
    size: int
    source_sha256: str
    abi: int
    compiler: str
    flags: str
    builder: str
    built_at: float

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class NodeRecord:
    id: str
    family: str
    provider: str
    state: NodeState
    location: str = ""
    size: str = ""
    image: str = ""
    provider_node_id: str | None = None
    address: str | None = None
    port: int | None = None
    ssh_user: str | None = None
    host_key: str | None = None
    release: str | None = None
    config_hash: str | None = None
    hourly_price: float = 0.0
    labels: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0
    ready_at: float | None = None
    reason: str = ""

    @property
    def path(self) -> str:
        """The node's resource path, used for targeting."""
        return f"/{self.provider}/{self.location or '-'}/{self.family}/{self.id}"

    @property
    def serving(self) -> bool:
        """Ready, or being rolled in place (bootstrapping again after it was ready): its
        agent keeps running jobs on the releases the node has while the new one goes in."""
        return self.state == NodeState.READY or (self.state == NodeState.BOOTSTRAPPING and self.ready_at is not None)


SERVING_STATES = (NodeState.READY, NodeState.BOOTSTRAPPING)
"""The states of nodes that may be ``serving`` (filter a listing with ``.serving``)."""


@dataclass(frozen=True)
class DeployedRelease:
    """One entry of a family's release history: the family ran ``release`` on all its
    ready nodes from ``at`` on, after a spawn started by ``cause`` (spawn, deploy,
    rollback)."""

    release: str
    sha256: str
    at: float
    cause: str
    nodes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class EventRecord:
    id: int
    at: float
    kind: str
    reason: str = ""
    node: str | None = None
    family: str | None = None
    job: str | None = None
    provider: str | None = None
    data: dict[str, Any] = field(default_factory=dict)


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    SUSPENDED = "suspended"
    FAILED = "failed"


@dataclass(frozen=True)
class JobRecord:
    id: str
    release: str
    function: str
    state: JobState
    spec: dict[str, Any]
    created_at: float
    updated_at: float
    reason: str = ""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def row_to_provider(row: Any) -> ProviderRecord:
    return ProviderRecord(
        name=row["name"], driver=row["driver"], config=_loads(row["config"]),
        registered_at=row["registered_at"], updated_at=row["updated_at"],
    )


def row_to_release(row: Any) -> ReleaseRecord:
    return ReleaseRecord(
        name=row["name"], version=row["version"], sha256=row["sha256"], size=row["size"],
        manifest=_loads(row["manifest"]), uploaded_at=row["uploaded_at"],
    )


def row_to_artifact(row: Any) -> ArtifactRecord:
    return ArtifactRecord(
        name=row["name"], version=row["version"], platform=row["platform"], sha256=row["sha256"], size=row["size"],
        source_sha256=row["source_sha256"], abi=row["abi"], compiler=row["compiler"], flags=row["flags"],
        builder=row["builder"], built_at=row["built_at"],
    )


def row_to_node(row: Any) -> NodeRecord:
    return NodeRecord(
        id=row["id"], family=row["family"], provider=row["provider"], state=NodeState(row["state"]),
        location=row["location"], size=row["size"], image=row["image"],
        provider_node_id=row["provider_node_id"], address=row["address"], port=row["port"],
        ssh_user=row["ssh_user"], host_key=row["host_key"], release=row["release"],
        config_hash=row["config_hash"], hourly_price=row["hourly_price"],
        labels=json.loads(row["labels"] or "[]"), extra=_loads(row["extra"]),
        created_at=row["created_at"], updated_at=row["updated_at"], ready_at=row["ready_at"],
        reason=row["reason"],
    )


def row_to_event(row: Any) -> EventRecord:
    return EventRecord(
        id=row["id"], at=row["at"], kind=row["kind"], reason=row["reason"], node=row["node"],
        family=row["family"], job=row["job"], provider=row["provider"], data=_loads(row["data"]),
    )


def row_to_job(row: Any) -> JobRecord:
    return JobRecord(
        id=row["id"], release=row["release"], function=row["function"], state=JobState(row["state"]),
        spec=_loads(row["spec"]), created_at=row["created_at"], updated_at=row["updated_at"],
        reason=row["reason"],
    )
