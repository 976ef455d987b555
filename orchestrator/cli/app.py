"""The ``orch`` command: the top-level app, its sub-apps, and the one place where
errors become messages and exit codes."""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated

import typer
from typer.exceptions import TyperException

from orchestrator import __version__
from orchestrator.cli import (
    autoscale,
    family,
    files,
    fleet,
    inventory,
    job,
    provider,
    release,
    serve,
    ssh_cmds,
    workspace_cmds,
)
from orchestrator.cli.common import CliState, err_console
from orchestrator.errors import InputError, OrchError

INTERNAL_ERROR = 70  # EX_SOFTWARE: a bug in orch, not in the input

app = typer.Typer(
    name="orch",
    help="Multi-cloud deployment orchestrator: providers, releases, node families and C work across the fleet.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(provider.app, name="provider")
app.add_typer(release.app, name="release")
app.add_typer(family.app, name="family")
workspace_cmds.register(app)
fleet.register(app)
files.register(app)
inventory.register(app)
ssh_cmds.register(app)
job.register(app)
serve.register(app)
autoscale.register(app)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"orch {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    workspace: Annotated[
        Path | None,
        typer.Option("--workspace", "-w", envvar="ORCH_WORKSPACE",
                     help="Workspace folder (default: found by walking up from here)."),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Multi-cloud deployment orchestrator."""
    state = ctx.ensure_object(CliState)  # main's, when it runs the command
    state.workspace = workspace


def one_line(text: str) -> str:
    """``text`` with each unprintable character escaped (``\\n``, ``\\x1b``...): an error
    echoes the user's input, which may hold a newline, and must stay one line."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run a command and turn every outcome into an exit code."""
    command = typer.main.get_command(app)
    state = CliState()
    try:
        result = command.main(args=argv, prog_name="orch", standalone_mode=False, obj=state)
    except OrchError as exc:
        problems = exc.problems
        if state.json and isinstance(exc, InputError):  # bad input with --json: the problems as objects too
            typer.echo(json.dumps({"ok": False, "error": str(exc), "exit_code": exc.exit_code,
                                   "problems": [p.to_dict() for p in problems]}, indent=2))
        for problem in problems:  # one line each; several get a summary line
            err_console.print(f"error: {one_line(str(problem))}", markup=False)
        if len(problems) > 1:
            err_console.print(f"error: {one_line(str(exc))}", markup=False)
        code = exc.exit_code
    except typer.Abort:
        err_console.print("aborted", markup=False)
        code = 130
    except typer.Exit as exc:
        code = exc.exit_code
    except TyperException as exc:  # usage errors: typer's (vendored click) exceptions
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError":
            return 2  # typer has printed the help already
        ctx_help = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        err_console.print(f"error: {one_line(message)}{ctx_help}", markup=False)
        code = int(getattr(exc, "exit_code", 2))
    except KeyboardInterrupt:
        err_console.print("interrupted", markup=False)
        code = 130
    except Exception as exc:
        if os.environ.get("ORCH_DEBUG"):
            traceback.print_exc()
        err_console.print(
            f"internal error: {type(exc).__name__}: {one_line(str(exc))} "
            "(a bug in orch; rerun with ORCH_DEBUG=1 for the traceback)",
            markup=False,
        )
        code = INTERNAL_ERROR
    else:
        code = result if isinstance(result, int) else 0
    return code


def run() -> None:  # pragma: no cover - the console script
    sys.exit(main())
