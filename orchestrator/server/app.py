"""The REST API of ``orch serve``: ``create_app(ws)`` builds it and owns its life.

Every route calls the same engine functions as the matching ``orch`` command and
answers JSON; the OpenAPI description is at ``/openapi.json``.  Every route but
``GET /healthz`` (and the dashboard page ``/``) wants ``Authorization: Bearer <token>``
(``.orch/api-token``).  The routes are in ``routes/``, their bodies in ``bodies.py``,
the token check and the error mapping in ``middleware.py``; here the app is made, the
lifespan starts and stops what runs beside the routes, and the routers are wired.

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
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from orchestrator import __version__
from orchestrator.errors import OrchError
from orchestrator.scheduler.runner import JobRunner
from orchestrator.scheduler.service import SERVER_STOPPED, SchedulerService
from orchestrator.server.auth import api_token
from orchestrator.server.autoscaler import Autoscaler
from orchestrator.server.health import DEFAULT_GRACE, HealthMonitor
from orchestrator.server.metrics import Metrics
from orchestrator.server.middleware import DEFAULT_MAX_BODY, Guard, orch_error_response
from orchestrator.server.routes import fleet, jobs, kv, monitor, workspace
from orchestrator.state import JobState, StorePool
from orchestrator.workspace import Workspace

log = logging.getLogger("orch.serve")


def create_app(ws: Workspace, *, runner: JobRunner | None = None, token: str | None = None,
               on_shutdown: Callable[[], None] | None = None, stop_timeout: float = 10.0,
               service: SchedulerService | None = None, health_grace: float | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY) -> FastAPI:
    """The API of workspace ``ws``; the runner (made when not given) starts and stops
    with the app's lifespan; ``on_shutdown`` runs last (``serve`` removes serve.json).
    With ``service`` (what ``orch serve`` passes), jobs run on its long-lived engine,
    a shutdown suspends the running job, and exec goes through connected agents, and a
    ``HealthMonitor`` marks nodes lost whose agents are silent past ``health_grace``.
    A request body over ``max_body_bytes`` is refused (413)."""
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
    # What the routes reach through server.deps (the names are that module's contract).
    app.state.ws = ws
    app.state.stores = StorePool(ws.state_db)
    app.state.runner = runner
    app.state.service = service
    app.state.metrics = metrics

    app.add_middleware(Guard, token=token, metrics=metrics, routes=app, max_body=max_body_bytes)

    @app.exception_handler(OrchError)
    async def orch_error(_: Request, exc: OrchError) -> JSONResponse:
        return orch_error_response(exc)

    for routes in (monitor, workspace, fleet, jobs, kv):
        app.include_router(routes.router)
    return app


def _requeue_suspended(stores: StorePool) -> None:
    """Queue again the jobs an earlier server suspended as it stopped (SERVER_STOPPED)."""
    from orchestrator.scheduler.jobs import requeue

    with stores.store() as store:
        for job in store.list_jobs(states=[JobState.SUSPENDED]):
            if job.reason == SERVER_STOPPED:
                requeue(store, job.id, reason="queued again: suspended when the server stopped")
                log.info("job %s: queued again (suspended when the last server stopped)", job.id)
