"""Runtime state: the SQLite store (the only writer) and its typed records."""

from __future__ import annotations

from orchestrator.state.jobstore import StoredBatches
from orchestrator.state.migrations import MIGRATIONS
from orchestrator.state.records import (
    NODE_TRANSITIONS,
    SERVING_STATES,
    ArtifactRecord,
    DeployedRelease,
    EventRecord,
    JobRecord,
    JobState,
    Migration,
    NodeRecord,
    NodeState,
    ProviderRecord,
    ReleaseRecord,
)
from orchestrator.state.store import Store, StorePool

__all__ = [
    "MIGRATIONS",
    "NODE_TRANSITIONS",
    "SERVING_STATES",
    "ArtifactRecord",
    "DeployedRelease",
    "EventRecord",
    "JobRecord",
    "JobState",
    "Migration",
    "NodeRecord",
    "NodeState",
    "ProviderRecord",
    "ReleaseRecord",
    "Store",
    "StorePool",
    "StoredBatches",
]
