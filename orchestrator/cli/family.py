"""``orch family``: the node families defined under ``node_families/``."""

from __future__ import annotations

from collections import Counter
from typing import Annotated

import typer

from orchestrator.cli.common import JsonFlag, console, print_fields, print_json, print_table, workspace
from orchestrator.cli.workspace_cmds import existing_store
from orchestrator.config import load_family, load_workspace_config

app = typer.Typer(help="Inspect node families (YAML under node_families/).", no_args_is_help=True)


@app.command("list")
def list_(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """List node families with their desired and current node counts."""
    ws = workspace(ctx)
    cfg = load_workspace_config(ws)
    if cfg.errors and not cfg.families:
        cfg.raise_first()
    with existing_store(ws) as store:
        nodes = store.list_nodes() if store else []
    running = Counter(n.family for n in nodes if n.state.live)
    families = sorted(cfg.families.values(), key=lambda f: f.name)
    if as_json:
        print_json([{**f.model_dump(mode="json"), "nodes": running[f.name]} for f in families])
        return
    rows = [(f.name, f.release, f.count, running[f.name], f.placement.policy,
             ", ".join(f.placement.providers) or "any", f.bootstrap.strategy) for f in families]
    print_table("node families", ["name", "release", "count", "nodes", "placement", "providers", "bootstrap"],
                rows, empty="no node families; add node_families/NAME.yaml")


@app.command("show")
def show(ctx: typer.Context, name: Annotated[str, typer.Argument(help="Family name.")],
         as_json: JsonFlag = False) -> None:
    """Show one family's definition."""
    family = load_family(workspace(ctx), name)
    if as_json:
        print_json(family)
        return
    data = family.model_dump(mode="json")
    print_fields(f"node family {name}", [(k, v) for k, v in data.items() if v not in ({}, [], None)])
    if not family.scaling:
        console.print("scaling: fixed count")
