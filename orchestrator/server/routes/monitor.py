"""Watching the server and its workspace: the dashboard page (``GET /``, no token), the
liveness probe (``/healthz``, no token), Prometheus ``/metrics`` and the event log
(``/events``, which the dashboard polls)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from fastapi.responses import HTMLResponse

from orchestrator import __version__
from orchestrator.server.deps import SECURED, MetricsDep, StoreDep
from orchestrator.server.metrics import CONTENT_TYPE_LATEST
from orchestrator.state.info import event_dict

DASHBOARD = Path(__file__).parent.parent / "static" / "dashboard.html"

router = APIRouter()


@router.get("/", include_in_schema=False)
def dashboard() -> HTMLResponse:
    """The dashboard: a static page whose script calls this API with the token it is
    given in the URL fragment (``/#token=...``, which browsers never send)."""
    return HTMLResponse(DASHBOARD.read_text(encoding="utf-8"))


@router.get("/healthz", tags=["health"])
def healthz() -> dict[str, Any]:
    """Liveness; no token needed."""
    return {"ok": True, "version": __version__}


@router.get("/metrics", tags=["health"], dependencies=SECURED, response_class=Response)
def metrics_(metrics: MetricsDep) -> Response:
    """Prometheus text format."""
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/events", tags=["events"], dependencies=SECURED)
def events(db: StoreDep, after: Annotated[int, Query(ge=0, le=2**62)] = 0,
           limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
           job: str | None = None, node: str | None = None, kind: str | None = None) -> list[dict[str, Any]]:
    """Events after id ``after``, oldest first (poll with the last id you saw)."""
    return [event_dict(e) for e in db.events(after=after, limit=limit, job=job, node=node, kind=kind)]
