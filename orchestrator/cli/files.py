"""File commands: ``orch push TARGET... LOCAL REMOTE`` and ``orch pull TARGET... REMOTE LOCAL_DIR``,
over SFTP to every chosen node in parallel (``orchestrator.remote.transfer``)."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from orchestrator.cli.common import (
    JsonFlag,
    LabelsOpt,
    console,
    err_console,
    open_store,
    print_json,
    print_table,
    target_nodes,
    workspace,
)
from orchestrator.cli.lazy import lazy
from orchestrator.errors import InputError, RemoteError
from orchestrator.state import NodeRecord
from orchestrator.state import targets as targets_syntax

if TYPE_CHECKING:
    from orchestrator.remote import transfer
else:
    transfer = lazy("orchestrator.remote.transfer")

ParallelOpt = Annotated[int, typer.Option("--parallel", "-p", min=1, help="Nodes served at once.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar, only the results.")]


def push(
    ctx: typer.Context,
    args: Annotated[list[str], typer.Argument(
        metavar="TARGET... LOCAL REMOTE", show_default=False,
        help="The nodes (" + targets_syntax.TARGET_HELP + "), then the local file or folder, then where it "
             "goes on each node: into REMOTE when it is a folder or ends with /, else as REMOTE (relative: "
             "from the login folder).")],
    label: LabelsOpt = None,
    parallel: ParallelOpt = 16,
    quiet: QuietOpt = False,
    as_json: JsonFlag = False,
) -> None:
    """Copy a file or folder (recursively, modes kept) to every chosen node, in parallel over SFTP;
    exit non-zero if any node fails."""
    names, (local, remote) = _split(args, "LOCAL REMOTE")
    ws = workspace(ctx)
    nodes = _nodes(ws, names, label)
    source = Path(local)
    title = f"push {source.name or local} to {len(nodes)} node(s)"
    with _progress(title, quiet=quiet or as_json) as events:
        report = transfer.push(ws, nodes, source, remote, events=events, max_parallel=parallel)
    _report(report, "pushed", as_json=as_json)


def pull(
    ctx: typer.Context,
    args: Annotated[list[str], typer.Argument(
        metavar="TARGET... REMOTE LOCAL_DIR", show_default=False,
        help="The nodes (" + targets_syntax.TARGET_HELP + "), then the file or folder on each node (relative: "
             "from the login folder), then the local folder that gets LOCAL_DIR/NODE/NAME per node.")],
    label: LabelsOpt = None,
    parallel: ParallelOpt = 16,
    quiet: QuietOpt = False,
    as_json: JsonFlag = False,
) -> None:
    """Copy a file or folder (recursively, modes kept) from every chosen node into LOCAL_DIR/NODE/,
    in parallel over SFTP; exit non-zero if any node fails."""
    names, (remote, local_dir) = _split(args, "REMOTE LOCAL_DIR")
    ws = workspace(ctx)
    nodes = _nodes(ws, names, label)
    with _progress(f"pull {remote} from {len(nodes)} node(s)", quiet=quiet or as_json) as events:
        report = transfer.pull(ws, nodes, remote, Path(local_dir), events=events, max_parallel=parallel)
    _report(report, "pulled", as_json=as_json)


def _split(args: Sequence[str], last: str) -> tuple[list[str], tuple[str, str]]:
    if len(args) < 3:
        raise InputError(f"give TARGET... {last}: at least one target and two paths ({len(args)} given)",
                         hint="e.g. `orch push workers ./conf etc/` or `orch pull all logs ./logs`")
    return list(args[:-2]), (args[-2], args[-1])


def _nodes(ws: Any, names: list[str], label: list[str] | None) -> list[NodeRecord]:
    with open_store(ws) as store:
        return target_nodes(ws, store, names, label)


@contextmanager
def _progress(title: str, *, quiet: bool) -> Iterator[transfer.TransferEvents]:
    """A rich progress bar of the bytes moved across all nodes, on a terminal only."""
    if quiet or not console.is_terminal:
        yield transfer.TransferEvents()
        return
    progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                        TransferSpeedColumn(), TimeRemainingColumn(), console=console, transient=True)
    task = progress.add_task(title, total=0)
    lock = threading.Lock()
    totals = {"bytes": 0}

    def total(node: str, nbytes: int) -> None:
        with lock:
            totals["bytes"] += nbytes
            progress.update(task, total=totals["bytes"])

    with progress:
        yield transfer.TransferEvents(total=total, advance=lambda node, nbytes: progress.advance(task, nbytes))


def _report(report: transfer.TransferReport, verb: str, *, as_json: bool) -> None:
    """Per node results (a table, or JSON), then the command's outcome as `orch exec` has it."""
    results = report.nodes
    if as_json:
        print_json({node: _json(t) for node, t in results.items()})
    else:
        rows = [(t.node, "ok" if t.ok else "failed", t.files, t.folders, _mib(t.bytes), f"{t.seconds:.2f}",
                 t.destination) for t in results.values()]
        print_table(f"{verb} {_mib(report.bytes)} MiB in {report.seconds:.2f} s",
                    ["node", "result", "files", "folders", "MiB", "seconds", "destination"], rows, empty="no nodes")
        if len(results) > 1:
            for t in report.failed.values():
                err_console.print(f"{t.node}: {t.error}", markup=False)
    failed = sorted(report.failed)
    if not failed:
        return
    if len(results) == 1 and (error := results[failed[0]].error) is not None:
        raise error  # a single node's error is the command's error
    raise RemoteError(f"{len(failed)} of {len(results)} node(s) failed: {', '.join(failed)}")


def _json(t: transfer.NodeTransfer) -> dict[str, Any]:
    return {"ok": t.ok, "source": t.source, "destination": t.destination, "files": t.files, "folders": t.folders,
            "bytes": t.bytes, "seconds": t.seconds, "error": None if t.error is None else str(t.error)}


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.1f}"


def register(app: typer.Typer) -> None:
    app.command()(push)
    app.command()(pull)
