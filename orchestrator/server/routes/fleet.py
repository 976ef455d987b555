"""The fleet: its nodes (``GET /nodes``), bringing a family up (``POST /nodes/spawn``),
stopping nodes (``/nodes/stop``), commands on them (``/nodes/exec``), and the agents the
server's scheduler holds connected (``GET /agents``)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from orchestrator.errors import InputError
from orchestrator.server.bodies import ExecRequest, SpawnRequest, StopRequest
from orchestrator.server.deps import SECURED, ServiceDep, StoreDep, WorkspaceDep
from orchestrator.state import NodeRecord, NodeState, Store, targets
from orchestrator.workspace import Workspace

router = APIRouter(tags=["fleet"], dependencies=SECURED)


@router.get("/agents")
def agents(service: ServiceDep) -> dict[str, float]:
    """Node id -> seconds since its connected agent was last heard from (the server's
    scheduler holds the connections between jobs; empty without it)."""
    return {node: round(age, 3) for node, age in sorted(service.connected().items())} if service else {}


@router.get("/nodes")
def nodes(db: StoreDep, family: str | None = None,
          all: Annotated[bool, Query(description="include stopped nodes")] = False) -> list[dict[str, Any]]:
    """Nodes, as `orch nodes --json`."""
    return [_node(n) for n in db.list_nodes(family=family) if all or n.state.live]


@router.post("/nodes/spawn")
def spawn(request: SpawnRequest, ws: WorkspaceDep, db: StoreDep) -> dict[str, Any]:
    """Create and bootstrap a family's nodes until it has its count (as `orch spawn --json`)."""
    from orchestrator import fleet

    report = fleet.spawn(ws, db, request.family, count=request.count)
    return {"family": report.family, "target": report.target, "ready": report.ready,
            "created": report.created, "rolled": report.rolled, "removed": report.removed,
            "stale": report.stale, "failures": [str(f) for f in report.failures], "ok": report.ok}


@router.post("/nodes/stop")
def stop(request: StopRequest, ws: WorkspaceDep, db: StoreDep) -> dict[str, Any]:
    """Destroy nodes through their providers (as `orch stop`)."""
    from orchestrator import fleet

    chosen = _chosen(ws, db, request.named(), request.labels, [s for s in NodeState if s.live])
    return {"stopped": fleet.stop(ws, db, chosen) if chosen else []}


@router.post("/nodes/exec")
def exec_(request: ExecRequest, ws: WorkspaceDep, db: StoreDep, service: ServiceDep) -> dict[str, Any]:
    """Run a command on ready nodes in parallel, through their agents when connected, else
    over SSH; per node `{exit, stdout, stderr}` or `{error}` (as `orch exec --json`)."""
    from orchestrator.remote import fanout

    chosen = _chosen(ws, db, request.named(), request.labels, [NodeState.READY])
    if not chosen:
        raise InputError("no ready node to run on", hint="see GET /nodes")
    return fanout.exec_nodes(ws, service, chosen, request.line(), timeout=request.timeout)


def _chosen(ws: Workspace, db: Store, named: list[str], labels: list[str], states: list[NodeState]
            ) -> list[NodeRecord]:
    """The one resolver the CLI uses too (orchestrator.state.targets)."""
    from orchestrator.config import provider_labels

    nodes = db.list_nodes(states=states)
    by_provider = provider_labels(ws, {n.provider for n in nodes}) if labels else None
    return targets.resolve(nodes, named, labels, provider_labels=by_provider)


def _node(n: NodeRecord) -> dict[str, Any]:
    """A node as `orch nodes --json` shows it."""
    return {"id": n.id, "family": n.family, "provider": n.provider, "location": n.location, "address": n.address,
            "port": n.port, "state": n.state.value, "release": n.release, "size": n.size, "path": n.path,
            "ready_at": n.ready_at, "reason": n.reason}
