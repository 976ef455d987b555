"""What wraps every request of ``orch serve``, and how errors look on the wire.

``Guard`` is the one ASGI middleware: the token check (401 without it; ``OPEN_PATHS``
need none), one JSON line for a bug (500, logged), and the request counted in
``/metrics``.  ``status_for`` maps an ``OrchError`` to its HTTP status (404, 409, 400,
415, 502: never a 5xx for bad input) and ``error_response`` is the one-line
``{"error", "hint"}`` body of every error the API answers itself, from this middleware
or from the app's ``OrchError`` handler (a body of the wrong shape keeps FastAPI's 422).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, MutableMapping
from typing import Any

import fastapi.routing
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orchestrator.errors import (
    ConflictError,
    InputError,
    NotFoundError,
    OrchError,
    ProviderError,
    RemoteError,
    StateError,
)
from orchestrator.server.auth import bearer_ok
from orchestrator.server.metrics import Metrics

log = logging.getLogger("orch.serve")
OPEN_PATHS = frozenset({"/healthz", "/"})  # "/": the dashboard's static page; its data calls need the token


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


def error_response(status: int, message: str, hint: str | None) -> JSONResponse:
    """The one-line body of every error the API answers itself."""
    return JSONResponse({"error": message, "hint": hint}, status_code=status)


def _route_path(app: FastAPI, scope: MutableMapping[str, Any]) -> str:
    """The template of the route a request is for (``/jobs/{job_id}``), or ``unmatched``."""
    route = scope.get("route")
    if route is None:  # a 401 never reached the router: match it here, so ids make no new series
        for candidate in _every_route(app):
            match, _ = candidate.matches(scope)
            if match == Match.FULL:
                route = candidate
                break
    return str(getattr(route, "path", "unmatched"))


def _every_route(app: FastAPI) -> Iterable[Any]:
    """The app's routes, those of its included routers too.  Since FastAPI 0.137 an
    included router is one node of ``app.router.routes`` (with no ``path``), which the
    public ``iter_route_contexts`` (0.137.2) flattens; before, ``include_router`` copied
    the routes in, and the list is flat."""
    flatten = getattr(fastapi.routing, "iter_route_contexts", None)
    return app.router.routes if flatten is None else flatten(app.router.routes)


class Guard:
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
            response = error_response(401, "missing or wrong API token",
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
                await error_response(500, f"internal error: {type(exc).__name__}: {exc}",
                                     "a bug in orch; see the log")(scope, receive, sending)
        self.metrics.count_request(scope["method"], _route_path(self.routes, scope), status)
