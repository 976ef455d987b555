"""What the routes share, as FastAPI dependencies, so a route module needs nothing but
its ``APIRouter``: the request's own store (lent by the app's ``StorePool``) and what
``create_app`` puts on ``app.state`` (``ws``, ``runner``, ``service``, ``metrics``;
``stores`` is the pool).  ``SECURED`` is the bearer scheme every route but the open
ones declares.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request, params
from fastapi.security import HTTPBearer

from orchestrator.scheduler.runner import JobRunner
from orchestrator.scheduler.service import SchedulerService
from orchestrator.server.metrics import Metrics
from orchestrator.state import Store, StorePool
from orchestrator.workspace import Workspace

# Declares the scheme in the OpenAPI description; the middleware (Guard) enforces it.
SECURED: list[params.Depends] = [Depends(HTTPBearer(auto_error=False))]


def _store(request: Request) -> Iterator[Store]:
    """A store of the request's own until the response (lent by the app's pool)."""
    stores: StorePool = request.app.state.stores
    with stores.store() as lent:
        yield lent


# The app.state readers are async: a plain attribute read has no business taking a
# trip through the thread pool that FastAPI runs a sync dependency in.

async def _workspace(request: Request) -> Workspace:
    ws: Workspace = request.app.state.ws
    return ws


async def _runner(request: Request) -> JobRunner:
    runner: JobRunner = request.app.state.runner
    return runner


async def _service(request: Request) -> SchedulerService | None:
    service: SchedulerService | None = request.app.state.service
    return service


async def _metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


StoreDep = Annotated[Store, Depends(_store)]
WorkspaceDep = Annotated[Workspace, Depends(_workspace)]
RunnerDep = Annotated[JobRunner, Depends(_runner)]
ServiceDep = Annotated[SchedulerService | None, Depends(_service)]  # None: no scheduler (tests, bare apps)
MetricsDep = Annotated[Metrics, Depends(_metrics)]
