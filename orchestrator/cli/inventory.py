"""``orch inventory``: the ready nodes for Ansible (a YAML inventory) or OpenSSH (an
ssh_config), host keys pinned."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
import yaml

from orchestrator.cli.common import LabelsOpt, TargetsArg, console, err_console, open_store, target_nodes, workspace
from orchestrator.cli.lazy import lazy
from orchestrator.errors import InputError
from orchestrator.state import NodeState

if TYPE_CHECKING:
    from orchestrator.remote import inventory as engine_inventory
else:
    engine_inventory = lazy("orchestrator.remote.inventory")


class InventoryFormat(enum.StrEnum):
    ansible = "ansible"
    ssh_config = "ssh-config"


def inventory(
    ctx: typer.Context,
    names: TargetsArg = None,
    labels: LabelsOpt = None,
    family: Annotated[str | None, typer.Option("--family", "-f", help="Only this family's ready nodes.")] = None,
    fmt: Annotated[InventoryFormat, typer.Option(
        "--format", help="ansible: a YAML inventory grouped by family; ssh-config: one `Host NODE_ID` "
                         "block per node, for ssh -F / scp -F.")] = InventoryFormat.ansible,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Write the inventory to this file instead of printing it.",
                     dir_okay=False),
    ] = None,
) -> None:
    """Print the ready nodes (all, or the TARGETs and labels chosen) as an Ansible YAML inventory
    or an ssh_config.

    Rewrites .orch/known_hosts, the pinned keys of the nodes that are up, for ssh to check strictly.
    """
    ws = workspace(ctx)
    with open_store(ws) as store:
        up = store.list_nodes(states=list(engine_inventory.UP_STATES))
        chosen = target_nodes(ws, store, names or [], labels, states=(NodeState.READY,))
    ready = [n for n in chosen if family is None or n.family == family]
    if fmt is InventoryFormat.ssh_config:
        text = engine_inventory.ssh_config(ws, ready)  # checks every node before a file is written
    else:
        text = yaml.safe_dump(engine_inventory.ansible_inventory(ws, ready), sort_keys=False,
                              default_flow_style=False)
    known_hosts = engine_inventory.write_known_hosts(ws, up)
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
