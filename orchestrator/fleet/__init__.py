"""Fleet: spawn, roll, scale down and stop node families, upgrade them in place, and the
autoscaler's decisions.

``spawn`` drives the rooms below (provision, deploy, remote) to bring a family to its
count; ``stop`` selects and destroys nodes; ``upgrade`` moves a family to another
version of its release and back (``deploy``, ``rollback``, ``history``), rolling its
nodes in place; ``autoscale`` decides (pure) how many nodes a family wants.  The public
surface is re-exported here: ``fleet.spawn(ws, store, "workers")``.
"""

from __future__ import annotations

from orchestrator.fleet.spawn import (
    UP,
    FleetEvents,
    SpawnReport,
    family_lock,
    load_config,
    plan,
    reconcile,
    select_nodes,
    spawn,
    stop,
)
from orchestrator.fleet.upgrade import UpgradeReport, deploy, history, previous_release, rollback

__all__ = [
    "UP",
    "FleetEvents",
    "SpawnReport",
    "UpgradeReport",
    "deploy",
    "family_lock",
    "history",
    "load_config",
    "plan",
    "previous_release",
    "reconcile",
    "rollback",
    "select_nodes",
    "spawn",
    "stop",
]
