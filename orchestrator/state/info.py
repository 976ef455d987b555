"""What the workspace holds right now, in one dictionary: ``orch info`` and ``GET /info``.

>>> with Store.open(ws.state_db) as store:       # doctest: +SKIP
...     workspace_info(ws, store)["totals"]
{'nodes': 4, 'live_nodes': 4, 'ready_nodes': 4, 'jobs': 1, 'releases': 1, 'providers': 1}
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from orchestrator.state import EventRecord, JobState, NodeState, Store
from orchestrator.workspace import Workspace


def workspace_info(ws: Workspace, store: Store) -> dict[str, Any]:
    """Nodes by state, by family and by provider (live nodes only for the last two),
    jobs by state, and totals.  Reads the store only; every state appears, zeros too."""
    nodes = store.list_nodes()
    jobs = store.list_jobs()
    live = [n for n in nodes if n.state.live]
    by_state = {state.value: 0 for state in NodeState}
    by_state.update(Counter(n.state.value for n in nodes))
    jobs_by_state = {state.value: 0 for state in JobState}
    jobs_by_state.update(Counter(j.state.value for j in jobs))
    return {
        "workspace": {"id": store.workspace_id, "root": str(ws.root)},
        "nodes": {
            "by_state": by_state,
            "by_family": dict(sorted(Counter(n.family for n in live).items())),
            "by_provider": dict(sorted(Counter(n.provider for n in live).items())),
        },
        "jobs": {"by_state": jobs_by_state},
        "totals": {
            "nodes": len(nodes),
            "live_nodes": len(live),
            "ready_nodes": by_state[NodeState.READY.value],
            "jobs": len(jobs),
            "releases": len(store.list_releases()),
            "providers": len(store.list_providers()),
        },
    }


def event_dict(event: EventRecord) -> dict[str, Any]:
    """An event as JSON (``orch events --json``, ``GET /events``)."""
    return {"id": event.id, "at": event.at, "kind": event.kind, "reason": event.reason, "node": event.node,
            "family": event.family, "job": event.job, "provider": event.provider, "data": event.data}
