"""Fleet commands: spawn, stop, nodes, exec."""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from orchestrator.cli.common import (
    JsonFlag,
    LabelsOpt,
    TargetArg,
    TargetsArg,
    console,
    err_console,
    open_store,
    print_json,
    print_table,
    target_nodes,
    workspace,
)
from orchestrator.cli.lazy import lazy
from orchestrator.cli.progress import NodeProgress
from orchestrator.cli.workspace_cmds import existing_store
from orchestrator.errors import FleetIncomplete, InputError, RemoteError
from orchestrator.state import NodeState, Store

if TYPE_CHECKING:
    from orchestrator import fleet as engine
    from orchestrator.remote import fanout as remote
    from orchestrator.remote import ssh
else:
    engine = lazy("orchestrator.fleet")
    remote, ssh = lazy("orchestrator.remote.fanout"), lazy("orchestrator.remote.ssh")

QuietFlag = Annotated[bool, typer.Option("--quiet", "-q", help="No live progress, only the summary.")]


def spawn(
    ctx: typer.Context,
    family: Annotated[str, typer.Argument(help="Node family to bring up (node_families/FAMILY.yaml).")],
    count: Annotated[int | None, typer.Option("--count", "-n", help="Nodes wanted (default: the family's).")] = None,
    keep_failed: Annotated[bool, typer.Option("--keep-failed", help="Keep nodes whose bootstrap failed.")] = False,
    quiet: QuietFlag = False,
    as_json: JsonFlag = False,
) -> None:
    """Create, bootstrap and roll out a family's nodes until it has its count."""
    ws = workspace(ctx)
    with open_store(ws) as store, NodeProgress(f"spawn {family}", quiet=quiet or as_json) as progress:
        report = engine.spawn(ws, store, family, count=count, keep_failed=keep_failed, events=progress.events())
    if as_json:
        print_json(spawn_json(report))
    else:
        print_spawn_summary(report)
    raise_unless_ok(report)


def spawn_json(report: engine.SpawnReport) -> dict[str, Any]:
    return {"family": report.family, "target": report.target, "ready": report.ready,
            "created": report.created, "rolled": report.rolled, "removed": report.removed,
            "stale": report.stale, "failures": [str(f) for f in report.failures], "ok": report.ok}


def print_spawn_summary(report: engine.SpawnReport) -> None:
    stale = f", not rolled {len(report.stale)}" if report.stale else ""
    console.print(f"{report.family}: {len(report.ready)}/{report.target} ready; created {len(report.created)}, "
                  f"rolled {len(report.rolled)}{stale}, removed {len(report.removed)}, "
                  f"failed attempts {len(report.failures)}")


def raise_unless_ok(report: engine.SpawnReport) -> None:
    """The last failures (with their log tails) on stderr, and FleetIncomplete, unless ok."""
    if report.ok:
        return
    for failure in report.failures[-3:]:
        err_console.print(f"{failure}", markup=False)
        tail = getattr(failure, "tail", "")
        if tail:
            err_console.print(tail, markup=False)
    family = report.family
    if len(report.ready) < report.target:
        raise FleetIncomplete(f"family {family} has {len(report.ready)} of {report.target} nodes ready",
                              hint="see the logs under .orch/logs/")
    raise FleetIncomplete(f"family {family}: {len(report.stale)} node(s) could not be rolled and still run their "
                          f"old release: {', '.join(report.stale[:5])}",
                          hint=f"see the logs under .orch/logs/, then `orch spawn {family}` again")


def stop(
    ctx: typer.Context,
    targets: TargetsArg = None,
    all_nodes: Annotated[bool, typer.Option("--all", help="Stop every node of the workspace.")] = False,
    label: LabelsOpt = None,
    quiet: QuietFlag = False,
) -> None:
    """Destroy nodes through their providers and mark them stopped."""
    ws = workspace(ctx)
    names = ["all"] if all_nodes or (label and not targets) else targets or []
    if not names:  # stopping everything is never a default
        raise InputError("name a TARGET (a family, node ids, paths: see --help), pass -l SELECTOR or --all",
                         hint="see `orch nodes`")
    with open_store(ws) as store:
        nodes = target_nodes(ws, store, names, label, states=[s for s in NodeState if s.live])
        with NodeProgress("stop", quiet=quiet) as progress:
            stopped = engine.stop(ws, store, nodes, events=progress.events())
    console.print(f"stopped {len(stopped)} node(s)")


def nodes(
    ctx: typer.Context,
    family: Annotated[str | None, typer.Option("--family", "-f", help="Only this family's nodes.")] = None,
    show_all: Annotated[bool, typer.Option("--all", "-a", help="Include stopped nodes.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """List nodes: id, family, provider, address, state, release, uptime, resource path."""
    with open_store(workspace(ctx)) as store:
        records = [n for n in store.list_nodes(family=family) if show_all or n.state.live]
    if as_json:
        print_json([{"id": n.id, "family": n.family, "provider": n.provider, "location": n.location,
                     "address": n.address, "port": n.port, "state": n.state.value, "release": n.release,
                     "size": n.size, "path": n.path, "ready_at": n.ready_at, "reason": n.reason}
                    for n in records])
        return
    now = time.time()
    rows = [(n.id, n.family, n.provider, f"{n.address}:{n.port}" if n.address else "", n.state.value,
             n.release or "", _age(now - n.ready_at) if n.ready_at and n.state.value == "ready" else "", n.path)
            for n in records]
    print_table("nodes", ["id", "family", "provider", "address", "state", "release", "uptime", "path"], rows,
                empty="no nodes; bring some up with `orch spawn FAMILY`")


def command_line(argv: list[str]) -> str:
    """What runs after ``--``: one argument is a shell command line as typed; several are an
    argument vector, each quoted (``-- touch 'a;b'`` makes one file, as ``kubectl exec`` does)."""
    return argv[0] if len(argv) == 1 else shlex.join(argv)


def exec_(
    ctx: typer.Context,
    target: TargetArg,
    command: Annotated[list[str], typer.Argument(help="After --: one argument is a shell command line; "
                                                      "more are a command and its arguments, each quoted.")],
    label: LabelsOpt = None,
    timeout: Annotated[float | None, typer.Option(help="Seconds each node may take.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Run a command on nodes in parallel (through their agents when `orch serve` runs, else
    over SSH); exit non-zero if any node fails."""
    ws = workspace(ctx)
    with open_store(ws) as store:  # the store alone: orchestrator.fleet (libcloud, paramiko) is 0.4 s to import
        chosen = target_nodes(ws, store, [target], label)
    if not chosen:
        raise InputError(f"no ready node matches {target!r}", hint="see `orch nodes`")
    from orchestrator.server import client

    line = command_line(command)
    server = client.running(ws)
    answers: dict[str, dict[str, Any]]
    if server is not None:  # the server holds the agents' connections: one request, no SSH
        answers = client.call(ws, server, "POST", "/nodes/exec",
                              {"nodes": [n.id for n in chosen], "command": line, "timeout": timeout})
    else:
        outcome = remote.exec_on(ws, chosen, line, timeout=timeout)
        if len(chosen) == 1 and isinstance(error := outcome.nodes[chosen[0].id], RemoteError):
            raise error  # a single node's error is the command's error
        answers = {name: ({"exit": r.exited, "stdout": r.stdout, "stderr": r.stderr} if isinstance(r, ssh.Result)
                          else {"error": str(r)}) for name, r in outcome.nodes.items()}
    if as_json:
        print_json(answers)
    else:
        for name, answer in answers.items():
            if "exit" in answer:
                mark = "ok" if answer["exit"] == 0 else f"exit {answer['exit']}"
                console.print(f"[bold]{name}[/bold] ({mark})")
                if answer["stdout"]:
                    console.print(answer["stdout"].rstrip("\n"), markup=False)
                if answer["stderr"]:
                    err_console.print(answer["stderr"].rstrip("\n"), markup=False)
            elif len(answers) > 1:  # a single node's error is the command's error, below
                err_console.print(f"{name}: {answer['error']}", markup=False)
    failed = sorted(name for name, answer in answers.items() if answer.get("exit") != 0)
    if failed:
        if len(answers) == 1 and "error" in answers[failed[0]]:
            raise RemoteError(answers[failed[0]]["error"])
        raise RemoteError(f"{len(failed)} of {len(answers)} node(s) failed: {', '.join(failed)}")


def _age(seconds: float) -> str:
    minutes, sec = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{sec:02d}s"


def register(app: typer.Typer) -> None:
    app.command()(spawn)
    app.command()(stop)
    app.command()(nodes)
    app.command("exec")(exec_)
    app.command()(plan)
    app.command()(reconcile)


def plan(
    ctx: typer.Context,
    family: Annotated[str, typer.Argument(help="Node family to plan for.")],
    count: Annotated[int | None, typer.Option("--count", "-n", help="Nodes wanted (default: the family's).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Show where spawn would put the missing nodes and what they cost; changes nothing."""
    ws = workspace(ctx)
    with existing_store(ws) as store:
        if store is None:  # nothing spawned yet: plan against an empty, throwaway store
            with Store.open(Path(":memory:")) as empty:
                result, up = engine.plan(ws, empty, family, count=count)
        else:
            result, up = engine.plan(ws, store, family, count=count)
    if as_json:
        print_json({"family": result.family, "up": up, "requests": result.requests,
                    "hourly_cost": result.hourly_cost, "rejected": [str(r) for r in result.rejected]})
        return
    rows = [(i + 1, r.provider, r.location, r.size, r.cpus, r.ram_mb, f"{r.hourly_price:.4f}")
            for i, r in enumerate(result.requests)]
    print_table(f"plan for {family}: {up} up, {len(result.requests)} to create",
                ["#", "provider", "location", "size", "cpus", "ram MB", "$/h"], rows,
                empty=f"{family}: nothing to create ({up} up)")
    console.print(f"total: ${result.hourly_cost:.4f}/h for the new nodes")
    if result.rejected:
        console.print("rejected:")
        for rejection in result.rejected:
            console.print(f"  {rejection}", markup=False)


def reconcile(
    ctx: typer.Context,
    apply: Annotated[bool, typer.Option("--apply", help="Settle the differences (default: only report).")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Compare every provider's nodes with the store: orphans, half-made and vanished nodes."""
    ws = workspace(ctx)
    notes: list[str] = []
    with open_store(ws) as store:
        outcome = engine.reconcile(ws, store, apply=apply, events=engine.FleetEvents(note=notes.append))
    if as_json:
        print_json({"applied": apply, "adopted": outcome.adopted, "orphans": outcome.orphans,
                    "vanished": outcome.vanished, "down": outcome.down})
        return
    for line in notes:
        console.print(line, markup=False)
    if not outcome.changes:
        console.print("every provider agrees with the store")
    elif not apply:
        console.print(f"{outcome.changes} difference(s); run `orch reconcile --apply` to settle them")
