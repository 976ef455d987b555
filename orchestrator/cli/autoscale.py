"""``orch autoscale status``: each family's scaling rules, its live nodes, and the
autoscaler's latest decision (from the events ``orch serve`` records)."""

from __future__ import annotations

from typing import Any

import typer

from orchestrator.cli.common import JsonFlag, open_store, print_json, print_table, workspace

app = typer.Typer(help="Autoscaling of node families (done by `orch serve`).", no_args_is_help=True)
KINDS = ("autoscale.up", "autoscale.down", "autoscale.hold", "autoscale.done", "autoscale.failed")


@app.command("status")
def status(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Families with `scaling:` rules: bounds, live nodes, the latest decision and why."""
    from orchestrator import fleet

    ws = workspace(ctx)
    rows: list[dict[str, Any]] = []
    with open_store(ws) as store:
        cfg = fleet.load_config(ws, store)
        for name, family in sorted(cfg.families.items()):
            if family.scaling is None:
                continue
            latest = None
            for kind in KINDS:
                for event in store.events(kind=kind, limit=1_000_000):
                    if event.family == name and (latest is None or event.id > latest.id):
                        latest = event
            live = sum(1 for n in store.list_nodes(family=name) if n.state.live)
            rows.append({"family": name, "min": family.scaling.min, "max": family.scaling.max, "live": live,
                         "last": latest.kind.removeprefix("autoscale.") if latest else None,
                         "reason": latest.reason if latest else "", "at": latest.at if latest else None})
    if as_json:
        print_json(rows)
        return
    print_table("autoscaling", ["family", "min", "max", "live", "last decision", "why"],
                [(r["family"], r["min"], r["max"], r["live"], r["last"] or "-", r["reason"]) for r in rows],
                empty="no family has `scaling:` rules")


def register(parent: typer.Typer) -> None:
    parent.add_typer(app, name="autoscale")
