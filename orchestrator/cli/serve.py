"""``orch serve``, ``orch info`` and ``orch events``: the control plane and what it shows.

    orch serve [--host 127.0.0.1] [--port N|0]     REST API + metrics + job runner (foreground)
    orch info [--json]                             nodes and jobs by state, totals
    orch events [--after ID] [--follow] [--json]   the store's events, oldest first
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from orchestrator.cli.common import JsonFlag, console, err_console, open_store, print_json, print_table, workspace
from orchestrator.cli.lazy import lazy
from orchestrator.state.info import event_dict, workspace_info

if TYPE_CHECKING:
    from orchestrator.server import serve as server
else:
    server = lazy("orchestrator.server.serve")


def serve(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Address to listen on; not loopback means HTTPS with the "
                                      "workspace CA's certificate.")] = "127.0.0.1",
    port: Annotated[int | None, typer.Option(help="Port (default: one from the workspace id, 10000-19999; "
                                             "0: any free port).")] = None,
    health_grace: Annotated[float, typer.Option(min=0.1, help="Seconds a ready node's agent may be silent "
                                                "before the node is marked lost (and replaced).")] = 10.0,
    max_body_bytes: Annotated[int, typer.Option(min=1, help="The largest request body the API reads; "
                                                "a larger one is refused (413).")] = 1 << 20,
) -> None:
    """Serve the REST API, /metrics and the job runner in the foreground (Ctrl-C stops)."""
    ws = workspace(ctx)

    def ready(endpoint: Any) -> None:
        err_console.print(f"orch serve: {endpoint.url} (pid {endpoint.pid}); token in "
                          f"{ws.relative(ws.runtime_dir / 'api-token')}; Ctrl-C stops", markup=False)

    server.serve(ws, host=host, port=port, on_ready=ready, health_grace=health_grace, max_body_bytes=max_body_bytes)
    err_console.print("orch serve: stopped", markup=False)


def info(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Nodes by state, family and provider; jobs by state; totals (as GET /info)."""
    ws = workspace(ctx)
    with open_store(ws) as store:
        data = workspace_info(ws, store)
    if as_json:
        print_json(data)
        return
    nodes, totals = data["nodes"], data["totals"]
    console.print(f"workspace {data['workspace']['root']} (id {data['workspace']['id']})", markup=False)
    console.print(f"nodes: {totals['live_nodes']} live, {totals['ready_nodes']} ready, {totals['nodes']} recorded; "
                  f"jobs: {totals['jobs']}; releases: {totals['releases']}; providers: {totals['providers']}",
                  markup=False)
    rows = [(state, count) for state, count in nodes["by_state"].items() if count]
    rows += [(f"family {name}", count) for name, count in nodes["by_family"].items()]
    rows += [(f"provider {name}", count) for name, count in nodes["by_provider"].items()]
    print_table("nodes", ["", "count"], rows, empty="no nodes")
    jobs = [(state, count) for state, count in data["jobs"]["by_state"].items() if count]
    print_table("jobs", ["state", "count"], jobs, empty="no jobs")


def events(
    ctx: typer.Context,
    after: Annotated[int, typer.Option(min=0, max=2**62, help="Only events after this id.")] = 0,  # (as the API)
    limit: Annotated[int, typer.Option(min=1, max=1_000_000, help="At most this many (per poll with --follow).")
                     ] = 1000,
    job: Annotated[str | None, typer.Option(help="Only this job's events.")] = None,
    node: Annotated[str | None, typer.Option(help="Only this node's events.")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep polling for new events (Ctrl-C stops).")
                      ] = False,
    interval: Annotated[float, typer.Option(min=0.05, help="Seconds between polls with --follow.")] = 1.0,
    as_json: JsonFlag = False,
) -> None:
    """The store's events, oldest first; with --follow, new ones as they come (--json: a list,
    or with --follow one JSON object a line)."""
    with open_store(workspace(ctx)) as store:
        while True:
            batch = [event_dict(e) for e in store.events(after=after, limit=limit, job=job, node=node)]
            if as_json and not follow:
                print_json(batch)
                return
            for event in batch:
                if as_json:  # one JSON object a line, so --follow can be piped
                    typer.echo(json.dumps(event, sort_keys=True))
                else:
                    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event["at"]))
                    where = " ".join(f"{k}={event[k]}" for k in ("node", "family", "job", "provider") if event[k])
                    console.print(f"{event['id']:>6} {when} {event['kind']} {where} {event['reason']}".rstrip(),
                                  markup=False)
            if batch:
                after = batch[-1]["id"]
            if not follow:
                return
            if not batch:
                time.sleep(interval)


def register(app: typer.Typer) -> None:
    app.command()(serve)
    app.command()(info)
    app.command()(events)
