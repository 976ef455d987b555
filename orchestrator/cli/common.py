"""Pieces every command shares: the workspace from the context, the store, output."""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from orchestrator.state import NodeRecord, NodeState, Store, targets
from orchestrator.workspace import Workspace


def _width() -> int | None:
    """Terminals report their width; logs and pipes get room for whole rows."""
    return None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", "0") or 0) or 200


console = Console(highlight=False, soft_wrap=True, width=_width())
err_console = Console(stderr=True, highlight=False, soft_wrap=True, width=_width())


def _json_chosen(ctx: typer.Context, value: bool) -> bool:
    """--json given: ``cli.app.main`` then prints bad input's problems as JSON too."""
    if value and isinstance(ctx.find_root().obj, CliState):
        ctx.find_root().obj.json = True
    return value


JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.", callback=_json_chosen)]
TargetArg = Annotated[str, typer.Argument(metavar="TARGET", help=targets.TARGET_HELP)]
TargetsArg = Annotated[list[str] | None, typer.Argument(metavar="[TARGET]...", help=targets.TARGET_HELP)]
LabelsOpt = Annotated[list[str] | None, typer.Option("--label", "-l", metavar="SELECTOR", help=targets.LABEL_HELP)]


@dataclasses.dataclass
class CliState:
    """What the top-level callback learned: set once, read by every command."""

    workspace: Path | None = None
    json: bool = False  # --json was given (set by its callback)


def workspace(ctx: typer.Context) -> Workspace:
    state: CliState = ctx.find_root().obj or CliState()
    return Workspace.find(explicit=state.workspace)


@contextmanager
def open_store(ws: Workspace) -> Iterator[Store]:
    ws.ensure_runtime()
    with Store.open(ws.state_db) as store:
        yield store


def to_jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    return value


def print_json(value: Any) -> None:
    typer.echo(json.dumps(to_jsonable(value), indent=2, sort_keys=True))


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], *, empty: str) -> None:
    if not rows:
        console.print(empty)
        return
    table = Table(title=title, title_justify="left", header_style="bold")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*("" if cell is None else str(cell) for cell in row))
    console.print(table)


def print_fields(title: str, fields: Sequence[tuple[str, Any]]) -> None:
    table = Table(title=title, title_justify="left", show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    for key, value in fields:
        table.add_row(key, "" if value is None else str(value))
    console.print(table)


def target_nodes(ws: Workspace, store: Store, names: Sequence[str], labels: Sequence[str] | None = None, *,
                 states: Sequence[NodeState] = (NodeState.READY,)) -> list[NodeRecord]:
    """The nodes in ``states`` that ``names`` (targets) and ``labels`` choose: one resolver
    for every command (see orchestrator.state.targets)."""
    from orchestrator.config import provider_labels  # pydantic: only when labels are asked for

    nodes = store.list_nodes(states=list(states))
    by_provider = provider_labels(ws, {n.provider for n in nodes}) if labels else None
    return targets.resolve(nodes, names, labels or (), provider_labels=by_provider)
