"""The autoscaling rules, case by case (orchestrator.fleet.autoscale.decide is pure)."""

from __future__ import annotations

import math

import pytest

from orchestrator.config.models import Scaling
from orchestrator.fleet.autoscale import Demand, decide

RULES = Scaling(min=1, max=4, queued_tasks_per_node=8, idle_seconds=30, cooldown_seconds=10)
NEVER = math.inf


@pytest.mark.parametrize(("demand", "action", "target", "words"), [
    (Demand(live=0, waiting_tasks=0, idle=0, since_last_change=NEVER), "up", 1, "below the minimum of 1"),
    (Demand(live=0, waiting_tasks=0, idle=0, since_last_change=0), "up", 1, "below the minimum"),  # bounds first
    (Demand(live=6, waiting_tasks=0, idle=0, since_last_change=0), "down", 4, "above the maximum of 4"),
    (Demand(live=1, waiting_tasks=100, idle=0, since_last_change=NEVER), "up", 4, "100.0 waiting tasks per node"),
    (Demand(live=1, waiting_tasks=20, idle=0, since_last_change=NEVER), "up", 3, "threshold 8"),
    (Demand(live=1, waiting_tasks=9, idle=0, since_last_change=NEVER), "up", 2, "9.0 waiting"),
    (Demand(live=2, waiting_tasks=16, idle=0, since_last_change=NEVER), "hold", 2, "within the threshold of 8"),
    (Demand(live=4, waiting_tasks=1000, idle=0, since_last_change=NEVER), "hold", 4, "at the maximum of 4"),
    (Demand(live=1, waiting_tasks=100, idle=0, since_last_change=3), "hold", 1, "cooling down (3 of 10 s)"),
    (Demand(live=4, waiting_tasks=0, idle=3, since_last_change=NEVER), "down", 1, "3 node(s) idle for 30 s"),
    (Demand(live=4, waiting_tasks=0, idle=1, since_last_change=NEVER), "down", 3, "1 node(s) idle"),
    (Demand(live=4, waiting_tasks=0, idle=3, since_last_change=5), "hold", 4, "cooling down"),
    (Demand(live=4, waiting_tasks=2, idle=3, since_last_change=NEVER), "hold", 4, "within the threshold"),
    (Demand(live=1, waiting_tasks=0, idle=1, since_last_change=NEVER), "hold", 1, "at the minimum of 1"),
    (Demand(live=2, waiting_tasks=0, idle=0, since_last_change=NEVER), "hold", 2, "nothing waits"),
])
def test_decide(demand: Demand, action: str, target: int, words: str) -> None:
    decision = decide(RULES, demand)
    assert (decision.action, decision.target) == (action, target), decision
    assert words in decision.reason, decision.reason
    assert decision.reason and "\n" not in decision.reason


def test_scaling_up_from_zero_nodes_with_work_waiting() -> None:
    rules = Scaling(min=0, max=3, queued_tasks_per_node=5)
    assert decide(rules, Demand(0, 12, 0, NEVER)).target == 3
    assert decide(rules, Demand(0, 0, 0, NEVER)).action == "hold"
