"""``orch ssh NODE [-- CMD...]``: OpenSSH's own ``ssh`` to one node, its host key pinned.

orch does not relay the session: it rewrites ``.orch/known_hosts`` from the store (the
keys of every node that is up, as ``orch inventory`` does) and replaces itself with
``ssh`` (``os.execv``), so the terminal, its window size (SIGWINCH), escapes, agent
forwarding and the exit status are OpenSSH's own.  The options orch gives ssh are on its
command line (``StrictHostKeyChecking yes``, that known_hosts file alone, the fleet key
alone), where they beat anything in the user's ssh_config.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from typing import TYPE_CHECKING, Annotated

import typer

from orchestrator.cli.common import LabelsOpt, open_store, target_nodes, workspace
from orchestrator.cli.lazy import lazy
from orchestrator.errors import InputError, NotFoundError, RemoteError
from orchestrator.state import targets

if TYPE_CHECKING:
    from orchestrator.remote import inventory as engine_inventory
else:
    engine_inventory = lazy("orchestrator.remote.inventory")

_SHOWN_IDS = 5


def ssh(
    ctx: typer.Context,
    node: Annotated[str, typer.Argument(metavar="NODE", show_default=False,
                                        help="The node: " + targets.TARGET_HELP + "; it must name exactly one.")],
    command: Annotated[list[str] | None, typer.Argument(
        metavar="CMD", show_default=False,
        help="After --: run this once, as `ssh host CMD` does (its words joined by spaces for the remote "
             "shell), and exit with its status; without it, a login shell.")] = None,
    labels: LabelsOpt = None,
) -> None:
    """Open a shell on one node (or run CMD there) with OpenSSH, its pinned host key and the fleet key.

    The node may be ready or still booting or bootstrapping. Needs OpenSSH's client (`ssh`).
    """
    remote_command = list(command or ())
    if remote_command[:1] == ["--"]:  # the `--` after NODE (options end at NODE, as ssh's do)
        remote_command = remote_command[1:]
    ws = workspace(ctx)
    with open_store(ws) as store:
        try:
            chosen = target_nodes(ws, store, [node], labels, states=engine_inventory.UP_STATES)
        except NotFoundError as exc:
            raise NotFoundError(f"{exc.message}: orch ssh needs exactly one node, 0 matched", hint=exc.hint) from exc
        if len(chosen) != 1:
            ids = ", ".join(n.id for n in chosen[:_SHOWN_IDS]) + (", ..." if len(chosen) > _SHOWN_IDS else "")
            raise InputError(f"target {node!r} matches {len(chosen)} nodes ({ids or 'none up'}); "
                             "orch ssh needs exactly one",
                             hint="name one node by its id; see `orch nodes`")
        up = store.list_nodes(states=list(engine_inventory.UP_STATES))
    program = shutil.which("ssh")
    if program is None:
        raise RemoteError("OpenSSH's client `ssh` is not installed (not found on PATH)",
                          hint="install openssh-client (Debian: apt install openssh-client)")
    argv = engine_inventory.ssh_command(ws, chosen[0], remote_command, ssh="ssh")
    engine_inventory.write_known_hosts(ws, up)  # after every check: a refused command writes nothing
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # Python ignores it, and exec would pass that on
    os.execv(program, argv)


def register(app: typer.Typer) -> None:
    app.command(context_settings={"allow_interspersed_args": False})(ssh)
