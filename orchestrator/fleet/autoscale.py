"""Autoscaling decisions, pure: a family's scaling rules + what the fleet and the work
look like now -> scale up, scale down, or hold, always with the reason.

``orch serve`` (``server/autoscaler.py``) measures and acts; this module only decides, so
every rule is testable without nodes.  The rules (``scaling:`` in the family's YAML):

- never below ``min`` nor above ``max`` live nodes (a family outside its bounds is
  brought back into them first, cooldown or not);
- *up* when the tasks waiting per live node pass ``queued_tasks_per_node``: to as many
  nodes as would bring it under the threshold, at most ``max``;
- *down* when nodes have run no work for ``idle_seconds`` and nothing waits: by the
  number of idle nodes, at least to ``min``;
- after any change, nothing more for ``cooldown_seconds``, except bringing the family
  back into its bounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from orchestrator.config.models import Scaling


@dataclass(frozen=True)
class Demand:
    """What a family looks like now."""

    live: int
    """Live nodes (requested .. ready)."""
    waiting_tasks: float
    """Tasks waiting for these nodes: not yet cut, or cut and not yet sent (estimated)."""
    idle: int
    """Nodes that have run no work for the family's idle_seconds."""
    since_last_change: float
    """Seconds since the autoscaler last changed this family (inf: never)."""


@dataclass(frozen=True)
class Decision:
    action: str  # "up" | "down" | "hold"
    target: int
    reason: str


def decide(rules: Scaling, now: Demand) -> Decision:
    """The decision for one family."""
    live = now.live
    if live < rules.min:
        return Decision("up", rules.min, f"{live} live node(s), below the minimum of {rules.min}")
    if live > rules.max:
        return Decision("down", rules.max, f"{live} live node(s), above the maximum of {rules.max}")
    per_node = now.waiting_tasks / live if live else math.inf if now.waiting_tasks else 0.0
    cooling = now.since_last_change < rules.cooldown_seconds
    if now.waiting_tasks and per_node > rules.queued_tasks_per_node:
        wanted = min(rules.max, max(live + 1, math.ceil(now.waiting_tasks / rules.queued_tasks_per_node)))
        if wanted <= live:
            return Decision("hold", live, f"{per_node:.1f} waiting tasks per node, but already at the maximum "
                                          f"of {rules.max}")
        if cooling:
            return Decision("hold", live, f"{per_node:.1f} waiting tasks per node, but cooling down "
                                          f"({now.since_last_change:.0f} of {rules.cooldown_seconds:g} s)")
        return Decision("up", wanted, f"{per_node:.1f} waiting tasks per node (threshold "
                                      f"{rules.queued_tasks_per_node:g})")
    if now.idle and not now.waiting_tasks and live > rules.min:
        wanted = max(rules.min, live - now.idle)
        if cooling:
            return Decision("hold", live, f"{now.idle} idle node(s), but cooling down "
                                          f"({now.since_last_change:.0f} of {rules.cooldown_seconds:g} s)")
        return Decision("down", wanted, f"{now.idle} node(s) idle for {rules.idle_seconds:g} s and nothing waits")
    if now.waiting_tasks:
        return Decision("hold", live, f"{per_node:.1f} waiting tasks per node, within the threshold "
                                      f"of {rules.queued_tasks_per_node:g}")
    return Decision("hold", live, "nothing waits" + (f"; at the minimum of {rules.min}" if live == rules.min else ""))
