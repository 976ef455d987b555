"""What the workspace is made of and holds: ``GET /info`` (as ``orch info --json``) and
its configuration, ``/providers``, ``/releases``, ``/families`` (as their ``orch ...
list --json``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from orchestrator.server.deps import SECURED, StoreDep, WorkspaceDep
from orchestrator.state.info import workspace_info

router = APIRouter(tags=["workspace"], dependencies=SECURED)


@router.get("/info")
def info(ws: WorkspaceDep, db: StoreDep) -> dict[str, Any]:
    """Nodes by state, family and provider, jobs by state, totals (as `orch info --json`)."""
    return workspace_info(ws, db)


@router.get("/providers")
def providers(ws: WorkspaceDep, db: StoreDep) -> list[dict[str, Any]]:
    """The registered providers (credential references, never values), as `orch provider list --json`."""
    from orchestrator.config import load_workspace_config
    from orchestrator.provision.cooldowns import active_cooldowns

    cfg = load_workspace_config(ws)
    if cfg.errors and not cfg.providers:
        cfg.raise_first()
    cooling = active_cooldowns(db)
    out = []
    for config in sorted(cfg.providers.values(), key=lambda p: (p.priority, p.name)):
        mine = {k.split("/", 1)[1]: v for k, v in cooling.items() if k.split("/", 1)[0] == config.name}
        out.append({**config.model_dump(mode="json"), "cooldowns": mine})
    return out


@router.get("/releases")
def releases(db: StoreDep) -> list[dict[str, Any]]:
    """Uploaded releases, as `orch release list --json`."""
    return [{"release": r.ref, "name": r.name, "version": r.version, "sha256": r.sha256, "size": r.size,
             "uploaded_at": r.uploaded_at} for r in db.list_releases()]


@router.get("/families")
def families(ws: WorkspaceDep, db: StoreDep) -> list[dict[str, Any]]:
    """Node families with their live node counts, as `orch family list --json`."""
    from orchestrator.config import load_workspace_config

    cfg = load_workspace_config(ws)
    if cfg.errors and not cfg.families:
        cfg.raise_first()
    running: dict[str, int] = {}
    for node in db.list_nodes():
        if node.state.live:
            running[node.family] = running.get(node.family, 0) + 1
    return [{**f.model_dump(mode="json"), "nodes": running.get(f.name, 0)}
            for f in sorted(cfg.families.values(), key=lambda f: f.name)]
