"""Workspace-wide commands: init, validate, schema."""

from __future__ import annotations

import enum
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from orchestrator.cli.common import JsonFlag, console, print_json, workspace
from orchestrator.config import SCHEMAS, load_workspace_config
from orchestrator.errors import ValidationFailed
from orchestrator.state import Store
from orchestrator.workspace import Workspace


class SchemaKind(enum.StrEnum):
    provider = "provider"
    family = "family"
    release = "release"
    workspace = "workspace"


@contextmanager
def existing_store(ws: Workspace) -> Iterator[Store | None]:
    """The store when the workspace has one; never creates it (read-only commands)."""
    if not ws.state_db.exists():
        yield None
        return
    with Store.open(ws.state_db, migrate=False) as store:
        yield store if not store.pending_migrations() else None


def init(
    directory: Annotated[Path, typer.Argument(help="Folder to make a workspace in.")] = Path("."),
) -> None:
    """Make a workspace: config folders, .orch/, a workspace id and the fleet's SSH key."""
    ws = Workspace.init(directory)
    with Store.open(ws.state_db) as store:
        wid = store.workspace_id
    console.print(f"workspace {ws.root} (id {wid}) is ready")


def validate(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Check every provider, node family and release manifest of the workspace."""
    ws = workspace(ctx)
    with existing_store(ws) as store:
        known = {r.name for r in store.list_releases()} if store else set()
    cfg = load_workspace_config(ws, known_releases=known)
    if cfg.errors:
        raise ValidationFailed(cfg.errors)
    summary = {
        "providers": sorted(cfg.providers),
        "families": sorted(cfg.families),
        "releases": sorted(cfg.release_sources),
    }
    if as_json:
        print_json({"ok": True, **summary})
        return
    console.print(
        f"workspace OK: {len(cfg.providers)} provider(s), {len(cfg.families)} node family(ies), "
        f"{len(cfg.release_sources)} release source(s)"
    )


def schema(kind: Annotated[SchemaKind, typer.Argument(help="Which file's schema.")]) -> None:
    """Print the JSON Schema of a YAML file kind, for editors."""
    typer.echo(json.dumps(SCHEMAS[kind.value].model_json_schema(), indent=2))


def register(app: typer.Typer) -> None:
    app.command()(init)
    app.command()(validate)
    app.command()(schema)
