"""The REST API of ``orch serve``: ``create_app(ws)``.

Every route calls the same engine functions as the matching ``orch`` command and
answers JSON; the OpenAPI description is at ``/openapi.json``.  Every route but
``GET /healthz`` wants ``Authorization: Bearer <token>`` (``.orch/api-token``).

Errors: an ``OrchError`` becomes one line ``{"error": ..., "hint": ...}`` with
404 (not found), 409 (conflict, or a state that does not allow it now), 400 (any
other bad input), 502 (a provider or a node failed); FastAPI's own 422 for a body or
parameter of the wrong shape.  Bad input never gets a 5xx.

Each request has a store of its own while it runs, lent by a ``StorePool`` (FastAPI
runs the plain ``def`` routes in a thread pool; a store is used by one thread at a
time), and queued jobs run in a ``JobRunner`` thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import Body, Depends, FastAPI, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.datastructures import Headers
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orchestrator import __version__
from orchestrator.errors import (
    ConflictError,
    InputError,
    NotFoundError,
    OrchError,
    ProviderError,
    RemoteError,
    StateError,
)
from orchestrator.scheduler.runner import JobRunner
from orchestrator.scheduler.service import SERVER_STOPPED, SchedulerService
from orchestrator.server.auth import api_token, bearer_ok
from orchestrator.server.autoscaler import Autoscaler
from orchestrator.server.health import DEFAULT_GRACE, HealthMonitor
from orchestrator.server.metrics import CONTENT_TYPE_LATEST, Metrics
from orchestrator.state import JobState, NodeRecord, NodeState, Store, StorePool
from orchestrator.state.info import event_dict, workspace_info
from orchestrator.workspace import Workspace

log = logging.getLogger("orch.serve")
DASHBOARD = Path(__file__).with_name("static") / "dashboard.html"
OPEN_PATHS = frozenset({"/healthz", "/"})  # "/": the dashboard's static page; its data calls need the token
_MISSING = object()


# -- request bodies ---------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SpawnRequest(_Body):
    family: str = Field(min_length=1, description="the node family (node_families/FAMILY.yaml)")
    count: int | None = Field(default=None, ge=0, le=10_000, description="nodes wanted (default: the family's)")


class StopRequest(_Body):
    family: str | None = Field(default=None, min_length=1, description="stop this family's nodes")
    nodes: list[str] | None = Field(default=None, min_length=1, description="node ids or resource-path prefixes")
    all: bool = Field(default=False, description="stop every node of the workspace")

    @model_validator(mode="after")
    def _one_target(self) -> StopRequest:
        if sum((self.family is not None, self.nodes is not None, self.all)) != 1:
            raise ValueError("give exactly one of family, nodes, all")
        return self


class ExecRequest(_Body):
    command: str = Field(min_length=1, description="the shell command run on each node")
    family: str | None = Field(default=None, min_length=1, description="run on this family's ready nodes")
    nodes: list[str] | None = Field(default=None, min_length=1, description="node ids or resource-path prefixes")
    timeout: float | None = Field(default=None, gt=0, le=86_400, description="seconds each node may take")

    @model_validator(mode="after")
    def _one_target(self) -> ExecRequest:
        if (self.family is None) == (self.nodes is None):
            raise ValueError("give exactly one of family, nodes")
        return self


class JobRequest(_Body):
    work: str = Field(description="RELEASE[@VERSION]:FUNCTION, e.g. primes:count_primes")
    input: str = Field(description="the work module's input: START:END for range, a file for lines and chunks")
    family: str | None = None
    sink: str | None = None
    work_module: str | None = None
    module_options: dict[str, int | float | str] = Field(default_factory=dict)
    target_task_seconds: float | None = None
    task_size: float | None = None
    task_timeout: float | None = None
    max_attempts: int | None = None
    on_task_failure: str | None = None
    ports_per_node: int | None = None


def _store(request: Request) -> Iterator[Store]:
    """A store of the request's own until the response (lent by the app's pool)."""
    stores: StorePool = request.app.state.stores
    with stores.store() as lent:
        yield lent


StoreDep = Annotated[Store, Depends(_store)]


def _route_path(app: FastAPI, scope: MutableMapping[str, Any]) -> str:
    """The template of the route a request is for (``/jobs/{job_id}``), or ``unmatched``."""
    route = scope.get("route")
    if route is None:
        for candidate in app.router.routes:
            match, _ = candidate.matches(scope)
            if match == Match.FULL:
                route = candidate
                break
    return str(getattr(route, "path", "unmatched"))


# -- the app ---------------------------------------------------------------------------------


def create_app(ws: Workspace, *, runner: JobRunner | None = None, token: str | None = None,
               on_shutdown: Callable[[], None] | None = None, stop_timeout: float = 10.0,
               service: SchedulerService | None = None, health_grace: float | None = None) -> FastAPI:
    """The API of workspace ``ws``; the runner (made when not given) starts and stops
    with the app's lifespan; ``on_shutdown`` runs last (``serve`` removes serve.json).
    With ``service`` (what ``orch serve`` passes), jobs run on its long-lived engine,
    a shutdown suspends the running job, and exec goes through connected agents, and a
    ``HealthMonitor`` marks nodes lost whose agents are silent past ``health_grace``."""
    token = token or api_token(ws)
    runner = runner or JobRunner(ws, run_job=service.run_job if service is not None else None)
    health = None if service is None else HealthMonitor(ws, service, grace=health_grace or DEFAULT_GRACE)
    scaler = None if service is None else Autoscaler(ws, service)
    metrics = Metrics(ws)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if service is not None:
            await asyncio.to_thread(service.start)
        if health is not None:
            health.start()
        if scaler is not None:
            scaler.start()
        if service is not None:
            await asyncio.to_thread(_requeue_suspended, app.state.stores)
        runner.start()
        try:
            yield
        finally:
            if scaler is not None:
                await asyncio.to_thread(scaler.stop)
            if health is not None:
                await asyncio.to_thread(health.stop)
            if service is not None:
                service.suspend(SERVER_STOPPED)
            if not await asyncio.to_thread(runner.stop, stop_timeout):
                log.warning("job %s still runs; `orch job resume %s` finishes it", runner.current, runner.current)
            if service is not None:
                await asyncio.to_thread(service.stop)
            app.state.stores.close()
            if on_shutdown is not None:
                on_shutdown()

    app = FastAPI(title="orch", version=__version__, lifespan=lifespan,
                  description="The control plane of an orch workspace: fleet, jobs, key-value, events, metrics.")
    app.state.ws = ws
    app.state.stores = StorePool(ws.state_db)
    app.state.runner = runner
    app.state.service = service
    app.state.metrics = metrics

    app.add_middleware(_Guard, token=token, metrics=metrics, routes=app)

    @app.exception_handler(OrchError)
    async def orch_error(_: Request, exc: OrchError) -> JSONResponse:
        return _error(status_for(exc), exc.message, exc.hint)

    _routes(app, ws, runner, metrics, service)
    return app


def _requeue_suspended(stores: StorePool) -> None:
    """Queue again the jobs an earlier server suspended as it stopped (SERVER_STOPPED)."""
    from orchestrator.scheduler import jobs

    with stores.store() as store:
        for job in store.list_jobs(states=[JobState.SUSPENDED]):
            if job.reason == SERVER_STOPPED:
                jobs.requeue(store, job.id, reason="queued again: suspended when the server stopped")
                log.info("job %s: queued again (suspended when the last server stopped)", job.id)


class _Guard:
    """Around every request: the token check (401 without it), one JSON line for a bug
    (500, logged), and the request counted in ``/metrics``.  Plain ASGI: starlette's
    ``BaseHTTPMiddleware`` costs a task group and two memory streams a request."""

    def __init__(self, app: ASGIApp, *, token: str, metrics: Metrics, routes: FastAPI) -> None:
        self.app, self.token, self.metrics, self.routes = app, token, metrics, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = False

        async def sending(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = int(message["status"]), True
            await send(message)

        if scope["path"] not in OPEN_PATHS and not bearer_ok(Headers(scope=scope).get("authorization"), self.token):
            response = _error(401, "missing or wrong API token",
                              "send `Authorization: Bearer <token>`; the token is in .orch/api-token")
            response.headers["WWW-Authenticate"] = "Bearer"
            await response(scope, receive, sending)
        else:
            try:
                await self.app(scope, receive, sending)
            except Exception as exc:  # a bug: still one JSON line, and logged
                log.exception("%s %s failed", scope["method"], scope["path"])
                if started:
                    raise
                await _error(500, f"internal error: {type(exc).__name__}: {exc}",
                             "a bug in orch; see the log")(scope, receive, sending)
        self.metrics.count_request(scope["method"], _route_path(self.routes, scope), status)


class UnsupportedMediaType(InputError):
    """A body sent with a content type the route does not read."""


def status_for(exc: OrchError) -> int:
    """The HTTP status of an orch error: never 5xx for bad input."""
    if isinstance(exc, UnsupportedMediaType):
        return 415
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, ConflictError | StateError):
        return 409
    if isinstance(exc, InputError):
        return 400
    if isinstance(exc, ProviderError | RemoteError):
        return 502
    return 409  # e.g. FleetIncomplete: the request was fine, the fleet is not there yet


def _error(status: int, message: str, hint: str | None) -> JSONResponse:
    return JSONResponse({"error": message, "hint": hint}, status_code=status)


def _routes(app: FastAPI, ws: Workspace, runner: JobRunner, metrics: Metrics,
            service: SchedulerService | None) -> None:
    # Declares the scheme in the OpenAPI description; the middleware enforces it.
    secured = [Depends(HTTPBearer(auto_error=False))]

    @app.get("/", include_in_schema=False)
    def dashboard() -> HTMLResponse:
        """The dashboard: a static page whose script calls this API with the token it is
        given in the URL fragment (``/#token=...``, which browsers never send)."""
        return HTMLResponse(DASHBOARD.read_text(encoding="utf-8"))

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, Any]:
        """Liveness; no token needed."""
        return {"ok": True, "version": __version__}

    @app.get("/agents", tags=["fleet"], dependencies=secured)
    def agents() -> dict[str, float]:
        """Node id -> seconds since its connected agent was last heard from (the server's
        scheduler holds the connections between jobs; empty without it)."""
        return {node: round(age, 3) for node, age in sorted(service.connected().items())} if service else {}

    @app.get("/info", tags=["workspace"], dependencies=secured)
    def info(db: StoreDep) -> dict[str, Any]:
        """Nodes by state, family and provider, jobs by state, totals (as `orch info --json`)."""
        return workspace_info(ws, db)

    @app.get("/metrics", tags=["health"], dependencies=secured, response_class=Response)
    def metrics_() -> Response:
        """Prometheus text format."""
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/providers", tags=["workspace"], dependencies=secured)
    def providers(db: StoreDep) -> list[dict[str, Any]]:
        """The registered providers (credential references, never values), as `orch provider list --json`."""
        from orchestrator.config import load_workspace_config
        from orchestrator.provision import nodes as provision

        cfg = load_workspace_config(ws)
        if cfg.errors and not cfg.providers:
            cfg.raise_first()
        cooling = provision.cooldowns(db)
        out = []
        for config in sorted(cfg.providers.values(), key=lambda p: (p.priority, p.name)):
            mine = {k.split("/", 1)[1]: v for k, v in cooling.items() if k.split("/", 1)[0] == config.name}
            out.append({**config.model_dump(mode="json"), "cooldowns": mine})
        return out

    @app.get("/releases", tags=["workspace"], dependencies=secured)
    def releases(db: StoreDep) -> list[dict[str, Any]]:
        """Uploaded releases, as `orch release list --json`."""
        return [{"release": r.ref, "name": r.name, "version": r.version, "sha256": r.sha256, "size": r.size,
                 "uploaded_at": r.uploaded_at} for r in db.list_releases()]

    @app.get("/families", tags=["workspace"], dependencies=secured)
    def families(db: StoreDep) -> list[dict[str, Any]]:
        """Node families with their live node counts, as `orch family list --json`."""
        from orchestrator.config import load_workspace_config

        cfg = load_workspace_config(ws)
        if cfg.errors and not cfg.families:
            cfg.raise_first()
        running: dict[str, int] = {}
        for node in db.list_nodes():
            if node.state.live:
                running[node.family] = running.get(node.family, 0) + 1
        return [{**f.model_dump(mode="json"), "nodes": running.get(f.name, 0)}
                for f in sorted(cfg.families.values(), key=lambda f: f.name)]

    @app.get("/nodes", tags=["fleet"], dependencies=secured)
    def nodes(db: StoreDep, family: str | None = None,
              all: Annotated[bool, Query(description="include stopped nodes")] = False) -> list[dict[str, Any]]:
        """Nodes, as `orch nodes --json`."""
        return [_node(n) for n in db.list_nodes(family=family) if all or n.state.live]

    @app.post("/nodes/spawn", tags=["fleet"], dependencies=secured)
    def spawn(request: SpawnRequest, db: StoreDep) -> dict[str, Any]:
        """Create and bootstrap a family's nodes until it has its count (as `orch spawn --json`)."""
        from orchestrator import fleet

        report = fleet.spawn(ws, db, request.family, count=request.count)
        return {"family": report.family, "target": report.target, "ready": report.ready,
                "created": report.created, "rolled": report.rolled, "removed": report.removed,
                "failures": [str(f) for f in report.failures], "ok": report.ok}

    @app.post("/nodes/stop", tags=["fleet"], dependencies=secured)
    def stop(request: StopRequest, db: StoreDep) -> dict[str, Any]:
        """Destroy nodes through their providers (as `orch stop`)."""
        from orchestrator import fleet

        if request.family is not None:
            chosen = fleet.select_nodes(db, family=request.family)
        else:
            chosen = fleet.select_nodes(db, node_ids=request.nodes or [], all_nodes=request.all)
        return {"stopped": fleet.stop(ws, db, chosen) if chosen else []}

    @app.post("/nodes/exec", tags=["fleet"], dependencies=secured)
    def exec_(request: ExecRequest, db: StoreDep) -> dict[str, Any]:
        """Run a command on ready nodes in parallel, through their agents when connected, else
        over SSH; per node `{exit, stdout, stderr}` or `{error}` (as `orch exec --json`)."""
        from orchestrator import fleet

        ready = fleet.select_nodes(db, all_nodes=True, states=[NodeState.READY])
        if request.family is not None:
            chosen = [n for n in ready if n.family == request.family]
        else:
            names = request.nodes or []
            chosen = [n for n in ready if any(name == n.id or (name.startswith("/") and n.path.startswith(name))
                                              for name in names)]
        if not chosen:
            raise InputError(f"no ready node matches {request.family or ', '.join(request.nodes or [])!r}",
                             hint="see GET /nodes")
        return exec_nodes(ws, service, chosen, request.command, request.timeout)

    @app.get("/jobs", tags=["jobs"], dependencies=secured)
    def list_jobs(db: StoreDep) -> list[dict[str, Any]]:
        """Jobs, oldest first, as `orch job list --json`."""
        from orchestrator.scheduler import jobs

        return [{"job": r.id, "work": f"{r.release}:{r.function}", "state": r.state.value, "reason": r.reason,
                 "written": db.job_progress(r.id).get("next_write", 0), "created_at": r.created_at}
                for r in jobs.list_jobs(db)]

    @app.post("/jobs", tags=["jobs"], dependencies=secured, status_code=201)
    def submit(request: JobRequest, db: StoreDep) -> dict[str, Any]:
        """Submit a job; the server's job runner runs queued jobs oldest first, one at a time."""
        from orchestrator.scheduler import jobs

        options = request.model_dump(exclude_none=True, exclude={"work", "input", "family", "sink", "work_module",
                                                                 "module_options"})
        ref = jobs.submit(ws, db, request.work, input=request.input, sink=request.sink, family=request.family,
                          work_module=request.work_module, module_options=dict(request.module_options), **options)
        runner.wake()
        return {"job": ref.id, "release": ref.release, "function": ref.function, "state": "queued"}

    @app.get("/jobs/{job_id}", tags=["jobs"], dependencies=secured)
    def job_status(job_id: str, db: StoreDep) -> dict[str, Any]:
        """Where a job stands (as `orch job status --json`)."""
        from orchestrator.scheduler import jobs

        return jobs.status(db, job_id)

    @app.get("/jobs/{job_id}/result", tags=["jobs"], dependencies=secured, response_class=Response)
    def job_result(job_id: str, db: StoreDep) -> Response:
        """The job's output so far, in task order, failed tasks left out (as `orch job result`)."""
        from orchestrator.scheduler import jobs

        body = b"".join(r.payload for r in jobs.result(ws, db, job_id) if r.ok)
        return Response(body, media_type="application/octet-stream")

    @app.post("/jobs/{job_id}/resume", tags=["jobs"], dependencies=secured)
    def job_resume(job_id: str, db: StoreDep) -> dict[str, Any]:
        """Queue a suspended, failed or orphaned job again (finished tasks are kept; as
        `orch job resume` while this server runs); one queued or running is left be."""
        from orchestrator.scheduler import jobs

        job = jobs.requeue(db, job_id, reason="queued again by `orch job resume`")
        runner.wake()
        return {"job": job.id, "state": job.state.value}

    @app.delete("/jobs/{job_id}", tags=["jobs"], dependencies=secured)
    def job_delete(job_id: str, db: StoreDep) -> dict[str, Any]:
        """Delete a job and every trace of it (refused while it runs)."""
        from orchestrator.scheduler import jobs

        if runner.current == job_id:
            raise ConflictError(f"job {job_id} is running in this server", hint="wait for it to end")
        jobs.delete(ws, db, job_id)
        return {"job": job_id, "deleted": True}

    @app.get("/kv", tags=["kv"], dependencies=secured)
    def kv_list(db: StoreDep, prefix: str = "") -> dict[str, Any]:
        """Every key (with its value) that starts with ``prefix``."""
        return db.kv_items(prefix=prefix)

    @app.get("/kv/{key}", tags=["kv"], dependencies=secured)
    def kv_get(key: str, db: StoreDep) -> dict[str, Any]:
        """A key's value."""
        value = db.kv_get(key, default=_MISSING)
        if value is _MISSING:
            raise NotFoundError(f"no key {key!r}", hint="see GET /kv")
        return {"key": key, "value": value}

    @app.put("/kv/{key}", tags=["kv"], dependencies=secured)
    def kv_put(key: str, db: StoreDep, request: Request,
               value: Annotated[Any, Body(description="any JSON value", media_type="application/json")]
               ) -> dict[str, Any]:
        """Store a JSON value (sent as application/json) under ``key``; answers the key's new version."""
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            raise UnsupportedMediaType(f"the value must be sent as application/json, not {media or 'no type'}",
                                       hint="set `Content-Type: application/json`")
        return {"key": key, "version": db.kv_put(key, value)}

    @app.delete("/kv/{key}", tags=["kv"], dependencies=secured)
    def kv_delete(key: str, db: StoreDep) -> dict[str, Any]:
        """Remove a key."""
        if not db.kv_delete(key):
            raise NotFoundError(f"no key {key!r}", hint="see GET /kv")
        return {"key": key, "deleted": True}

    @app.get("/events", tags=["events"], dependencies=secured)
    def events(db: StoreDep, after: Annotated[int, Query(ge=0, le=2**62)] = 0,
               limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
               job: str | None = None, node: str | None = None, kind: str | None = None) -> list[dict[str, Any]]:
        """Events after id ``after``, oldest first (poll with the last id you saw)."""
        return [event_dict(e) for e in db.events(after=after, limit=limit, job=job, node=node, kind=kind)]


def _node(n: NodeRecord) -> dict[str, Any]:
    return {"id": n.id, "family": n.family, "provider": n.provider, "location": n.location, "address": n.address,
            "port": n.port, "state": n.state.value, "release": n.release, "size": n.size, "path": n.path,
            "ready_at": n.ready_at, "reason": n.reason}


def exec_nodes(ws: Workspace, service: SchedulerService | None, nodes: list[NodeRecord], command: str,
               timeout: float | None) -> dict[str, Any]:
    """``command`` on ``nodes``: through the agents the service has connected, over SSH
    for the rest (in parallel); node id -> ``{exit, stdout, stderr}`` or ``{error}``."""
    from orchestrator.remote import fanout as remote
    from orchestrator.remote import ssh

    answers: dict[str, Any] = {}
    rest = nodes
    if service is not None:
        connected = service.connected()
        through = [n for n in nodes if n.id in connected]
        rest = [n for n in nodes if n.id not in connected]
        if through:
            answers.update(service.exec(through, command, timeout=timeout))
            rest += [n for n in through if n.id not in answers]  # gone meanwhile: SSH
    if rest:
        outcome = remote.exec_on(ws, rest, command, timeout=timeout)
        answers.update({name: ({"exit": r.exited, "stdout": r.stdout, "stderr": r.stderr}
                               if isinstance(r, ssh.Result) else {"error": str(r)})
                        for name, r in outcome.nodes.items()})
    return {n.id: answers[n.id] for n in nodes}
