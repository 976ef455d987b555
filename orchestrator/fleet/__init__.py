"""Fleet: spawn, roll, scale down and stop node families, and the autoscaler's decisions.

``spawn`` drives the rooms below (provision, deploy, remote) to bring a family to its
count; ``stop`` selects and destroys nodes; ``autoscale`` decides (pure) how many
nodes a family wants.  The public surface is re-exported here: ``fleet.spawn(ws,
store, "workers")``.
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

__all__ = [
    "UP",
    "FleetEvents",
    "SpawnReport",
    "family_lock",
    "load_config",
    "plan",
    "reconcile",
    "select_nodes",
    "spawn",
    "stop",
]
