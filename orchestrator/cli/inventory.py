"""``orch inventory``: the ready nodes as an Ansible inventory, host keys pinned."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
import yaml

from orchestrator.cli.common import console, err_console, open_store, workspace
from orchestrator.cli.lazy import lazy
from orchestrator.errors import InputError
from orchestrator.state import NodeState

if TYPE_CHECKING:
    from orchestrator import fleet as engine
    from orchestrator.remote import inventory as engine_inventory
else:
    engine, engine_inventory = lazy("orchestrator.fleet"), lazy("orchestrator.remote.inventory")


def inventory(
    ctx: typer.Context,
    family: Annotated[str | None, typer.Option("--family", "-f", help="Only this family's ready nodes.")] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Write the inventory to this file instead of printing it.",
                     dir_okay=False),
    ] = None,
) -> None:
    """Print an Ansible YAML inventory of the ready nodes, grouped by family.

    Rewrites .orch/known_hosts, the pinned keys of the nodes that are up, for ssh to check strictly.
    """
    ws = workspace(ctx)
    with open_store(ws) as store:
        up = engine.select_nodes(store, all_nodes=True, states=engine.UP)
    known_hosts = engine_inventory.write_known_hosts(ws, up)
    ready = [n for n in up if n.state == NodeState.READY and (family is None or n.family == family)]
    text = yaml.safe_dump(engine_inventory.ansible_inventory(ws, ready, known_hosts=known_hosts),
                          sort_keys=False, default_flow_style=False)
    if not ready:
        which = f"of family {family!r} " if family else ""
        err_console.print(f"note: no ready node {which}to list; see `orch nodes`", markup=False)
    if output is None:
        typer.echo(text, nl=False)
        return
    try:
        engine_inventory.write_text_atomically(output, text)
    except OSError as exc:
        raise InputError(f"cannot write the inventory to {output}: {exc.strerror or exc}",
                         hint="choose a writable --output path") from exc
    console.print(f"wrote {len(ready)} host(s) to {output}; pinned host keys in {ws.relative(known_hosts)}",
                  markup=False)


def register(app: typer.Typer) -> None:
    app.command()(inventory)
