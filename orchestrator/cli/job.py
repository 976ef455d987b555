"""``orch job``: run C work across the fleet, and look after jobs.

    orch job run primes:count_primes --input 0:10000000 --follow
    orch job status JOB | result JOB | list | delete JOB | resume JOB
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from orchestrator.cli.common import (
    JsonFlag,
    console,
    err_console,
    open_store,
    print_fields,
    print_json,
    print_table,
    workspace,
)
from orchestrator.cli.lazy import lazy

if TYPE_CHECKING:
    from orchestrator.scheduler import jobs
    from orchestrator.scheduler.run import Outcome
else:
    jobs = lazy("orchestrator.scheduler.jobs")

app = typer.Typer(help="Run C work across the fleet (jobs), and look after jobs.", no_args_is_help=True)


@app.command("run")
def run(
    ctx: typer.Context,
    work: Annotated[str, typer.Argument(help="RELEASE[@VERSION]:FUNCTION, e.g. primes:count_primes.")],
    input: Annotated[str, typer.Option("--input", "-i", help="The work module's input: START:END for range, "
                                       "a file for lines and chunks.")],
    family: Annotated[str | None, typer.Option(help="Run on this family's ready nodes only.")] = None,
    sink: Annotated[str | None, typer.Option(help="file:PATH | sqlite:PATH | postgresql://... "
                                              "(default: file:.orch/jobs/JOB.out).")] = None,
    work_module: Annotated[str | None, typer.Option("--work-module", help="Override the function's work module.")
                           ] = None,
    option: Annotated[list[str] | None, typer.Option("--option", "-o", help="Work module option KEY=VALUE "
                                                     "(e.g. max_span=100000); repeatable.")] = None,
    target_task_seconds: Annotated[float | None, typer.Option(help="Task time each node's task size adapts to.")
                                   ] = None,
    task_size: Annotated[float | None, typer.Option(help="A fixed task size in (0, 1]: no adaptation.")] = None,
    task_timeout: Annotated[float | None, typer.Option(help="Seconds before a task's port is killed.")] = None,
    max_attempts: Annotated[int | None, typer.Option(help="Tries of a task before it fails.")] = None,
    on_task_failure: Annotated[str | None, typer.Option(help="continue (default) or fail the job.")] = None,
    isolate_failures: Annotated[bool | None, typer.Option(
        "--isolate-failures/--no-isolate-failures",
        help="Cut a task that failed every attempt in halves that run again, down to --isolate-floor items, "
             "so only the failing pieces are lost (range, lines, chunks; default on).")] = None,
    isolate_floor: Annotated[int | None, typer.Option(
        help="The most items (numbers, lines, bytes) a failing piece holds without being cut again "
             "(default 1).")] = None,
    ports_per_node: Annotated[int | None, typer.Option(help="Ports per node (default: the node's cpus).")] = None,
    follow: Annotated[bool, typer.Option("--follow/--detach", help="Run it here with a live progress bar "
                                         "(default); --detach only queues it.")] = True,
    as_json: JsonFlag = False,
) -> None:
    """Submit a job and (with --follow, the default) run it to its end here."""
    ws = workspace(ctx)
    options = {k: v for k, v in {
        "target_task_seconds": target_task_seconds, "task_size": task_size, "task_timeout": task_timeout,
        "max_attempts": max_attempts, "on_task_failure": on_task_failure, "ports_per_node": ports_per_node,
        "isolate_failures": isolate_failures, "isolate_floor": isolate_floor,
    }.items() if v is not None}
    with open_store(ws) as store:
        ref = jobs.submit(ws, store, work, input=input, sink=sink, family=family, work_module=work_module,
                          module_options=_options(option or []), **options)
        if not as_json:
            err_console.print(f"job {ref.id}: {ref.release}:{ref.function} queued", markup=False)
        if not follow:
            if as_json:
                print_json({"job": ref.id, "state": "queued"})
            return
        from orchestrator.server import client

        if client.running(ws) is not None:  # the server holds the scheduler: it runs the job, we watch
            outcome = _follow_in_server(store, ref.id, quiet=as_json)
        else:
            outcome = _run_with_progress(ws, store, ref.id, quiet=as_json)
    _finish(ref.id, outcome, as_json)


def _follow_in_server(store: Any, job_id: str, *, quiet: bool) -> Outcome:
    """Watch a job that the running `orch serve` runs, until it ends."""
    from orchestrator.scheduler.run import Outcome
    from orchestrator.state import JobState

    started = time.monotonic()
    if not quiet:
        err_console.print(f"job {job_id}: run by the workspace's `orch serve`", markup=False)
    last = ""
    while True:
        info = jobs.status(store, job_id)
        if info["state"] not in ("queued", "running"):
            return Outcome(JobState(info["state"]), info["reason"], info["counters"], time.monotonic() - started)
        line = f"{info['state']}: {info['written']} tasks written"
        if not quiet and line != last and time.monotonic() - started > 1:
            err_console.print(line, markup=False)
            last = line
        time.sleep(0.2)


@app.command("resume")
def resume(ctx: typer.Context, job: Annotated[str, typer.Argument(help="The job id.")], as_json: JsonFlag = False
           ) -> None:
    """Run a queued, suspended, failed or orphaned job on to its end (finished tasks are
    kept); while `orch serve` runs, it queues the job there again and follows it."""
    ws = workspace(ctx)
    from orchestrator.server import client

    endpoint = client.running(ws)
    with open_store(ws) as store:
        if endpoint is not None:  # the server holds the scheduler's port: it runs the job, we watch
            store.get_job(job)  # an unknown job: the usual one-line error
            client.call(ws, endpoint, "POST", f"/jobs/{job}/resume")
            outcome = _follow_in_server(store, job, quiet=as_json)
        else:
            outcome = _run_with_progress(ws, store, job, quiet=as_json)
    _finish(job, outcome, as_json)


@app.command("status")
def status(ctx: typer.Context, job: Annotated[str, typer.Argument(help="The job id.")], as_json: JsonFlag = False
           ) -> None:
    """Where a job stands: queued | running (where) | done | suspended (why) | failed (why)."""
    with open_store(workspace(ctx)) as store:
        info = jobs.status(store, job)
    if as_json:
        print_json(info)
        return
    counters = info["counters"]
    state = info["state"] + (f" ({info['reason']})" if info["reason"] else "")
    if info["scheduler_pid"]:
        state += f" in scheduler pid {info['scheduler_pid']}"
    print_fields(f"job {info['id']}", [
        ("work", f"{info['release']}:{info['function']}"),
        ("state", state),
        ("input", f"{info['spec']['work_module']} {info['spec']['input']}"),
        ("sink", info["spec"]["sink"]),
        ("nodes", ", ".join(f"{node} ({where}{_size(info, node)})" for node, where in sorted(info["nodes"].items()))
         or "-"),
        ("tasks written", info["written"]),
        ("tasks made", info["generated"]),
        ("done / failed", f"{counters.get('done', 0)} / {counters.get('failed', 0)}"),
        ("retried", counters.get("retried", 0)),
        ("failed pieces", _pieces_line(info["failed_pieces"], counters.get("split", 0))),
        ("port deaths", counters.get("port_deaths", 0)),
        ("nodes lost", counters.get("nodes_lost", 0)),
        ("late results discarded", counters.get("discarded", 0)),
    ])
    for seq, error in info["failed_tasks"][:20]:
        console.print(f"  failed task {seq}: {error}", markup=False)
    for piece in info["failed_pieces"][:50]:
        console.print(f"  failed piece {piece['text']} (task {piece['task']}): {piece['error']}", markup=False)
    if len(info["failed_pieces"]) > 50:
        console.print(f"  ... {len(info['failed_pieces']) - 50} more failed pieces (`orch job status "
                      f"{info['id']} --json`)", markup=False)


@app.command("result")
def result(
    ctx: typer.Context,
    job: Annotated[str, typer.Argument(help="The job id.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the output here instead of stdout.")] = None,
) -> None:
    """The job's output, in task order (failed tasks are left out; see `orch job status`)."""
    ws = workspace(ctx)
    with open_store(ws) as store:
        records = jobs.result(ws, store, job)
        if out is not None:
            with out.open("wb") as fh:
                for record in records:
                    if record.ok:
                        fh.write(record.payload)
            return
        stream = sys.stdout.buffer
        for record in records:
            if record.ok:
                stream.write(record.payload)
        stream.flush()


@app.command("list")
def list_(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """List jobs."""
    with open_store(workspace(ctx)) as store:
        records = jobs.list_jobs(store)
        progress = {r.id: store.job_progress(r.id) for r in records}
    if as_json:
        print_json([{"job": r.id, "work": f"{r.release}:{r.function}", "state": r.state.value, "reason": r.reason,
                     "written": progress[r.id].get("next_write", 0), "created_at": r.created_at} for r in records])
        return
    rows = [(r.id, f"{r.release}:{r.function}", r.state.value, progress[r.id].get("next_write", 0),
             time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created_at)), r.reason) for r in records]
    print_table("jobs", ["job", "work", "state", "tasks written", "created", "reason"], rows,
                empty="no jobs; run one with `orch job run primes:count_primes --input 0:1000000`")


@app.command("delete")
def delete(ctx: typer.Context, job: Annotated[str, typer.Argument(help="The job id.")]) -> None:
    """Delete a job and every trace of it: output, tasks, events."""
    ws = workspace(ctx)
    with open_store(ws) as store:
        jobs.delete(ws, store, job)
    console.print(f"job {job} deleted", markup=False)


# -- helpers ------------------------------------------------------------------------------------


def _options(pairs: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{pair!r}: expected KEY=VALUE", param_hint="--option")
        try:
            options[key] = int(value)
        except ValueError:
            try:
                options[key] = float(value)
            except ValueError:
                options[key] = value
    return options


def _run_with_progress(ws: Any, store: Any, job_id: str, *, quiet: bool) -> Outcome:
    if quiet:
        return jobs.run(ws, store, job_id)
    live = console.is_terminal
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("{task.fields[nodes]}"),
                        console=err_console, disable=not live, transient=False)
    bar = progress.add_task(job_id, total=None, rate="", nodes="")
    last_line = [0.0]

    def on_event(kind: str, data: dict[str, Any]) -> None:
        if kind == "job.tick":
            written = data.get("written", 0)
            seconds = max(data.get("seconds", 0.0), 1e-9)
            sizes = " ".join(f"{n['name']}:{n['size']:.3g}" for n in data.get("nodes", {}).values()
                             if n.get("size") and not n.get("lost"))
            done, total = data.get("input_done"), data.get("input_total")
            estimate = None
            if total and done and data.get("generated"):
                estimate = int(data["generated"] * total / done)
            progress.update(bar, completed=written, total=estimate, rate=f"{written / seconds:,.0f} tasks/s",
                            nodes=sizes)
            if not live and time.monotonic() - last_line[0] >= 5:
                last_line[0] = time.monotonic()
                err_console.print(f"{seconds:7.1f}s  {written} tasks written  {written / seconds:,.0f}/s  {sizes}",
                                  markup=False)
        elif kind in ("port.died", "node.lost", "task.failed", "node.slow", "agent.excluded", "piece.failed",
                      "job.isolation_stopped"):
            text = data.get("reason", "")
            where = data.get("node", "")
            err_console.print(f"{kind}: {where} {text}".rstrip(), markup=False)

    with progress:
        return jobs.run(ws, store, job_id, on_event=on_event)


def _finish(job_id: str, outcome: Outcome, as_json: bool) -> None:
    counters = outcome.counters
    if as_json:
        print_json({"job": job_id, "state": outcome.state.value, "reason": outcome.reason, "counters": counters,
                    "seconds": outcome.seconds})
    else:
        err_console.print(
            f"job {job_id} {outcome.state.value} in {outcome.seconds:.2f} s: {counters.get('done', 0)} tasks done, "
            f"{counters.get('failed', 0)} failed, {counters.get('retried', 0)} retried"
            + (f", {counters['pieces_failed']} failed pieces (see `orch job status {job_id}`)"
               if counters.get("pieces_failed") else "")
            + (f"; {outcome.reason}" if outcome.reason else ""), markup=False)
    if outcome.state.value != "done":
        raise typer.Exit(1)


def register(parent: typer.Typer) -> None:
    parent.add_typer(app, name="job")


def _pieces_line(pieces: list[dict[str, Any]], splits: int) -> str:
    """The failed pieces in one line: how many, and the first few by their place in the input."""
    if not pieces:
        return f"none ({splits} tasks cut in pieces)" if splits else "none"
    shown = ", ".join(p["text"] for p in pieces[:5]) + (", ..." if len(pieces) > 5 else "")
    return f"{len(pieces)}: {shown}"


def _size(info: dict[str, Any], node: str) -> str:
    size = info.get("sizes", {}).get(node)
    return f", task size {size:.3g}" if size is not None else ""
