"""What wraps every request of ``orch serve``, and how errors look on the wire.

``Guard`` is the one ASGI middleware: the token check (401 without it; ``OPEN_PATHS``
need none), the body limit (413 for a body over ``max_body`` bytes: by its
Content-Length before a byte of it is read, or counted as a chunked body arrives, which
is then handed to the route from memory), one JSON line for a bug (500, logged), and
the request counted in ``/metrics``.  ``status_for`` maps an ``OrchError`` to its HTTP
status (404, 409, 400, 413, 415, 502: never a 5xx for bad input) and ``error_response``
is the one-line ``{"error", "hint"}`` body of every error the API answers itself, from
this middleware or from the app's ``OrchError`` handler (``orch_error_response``; a
configuration with several problems adds ``problems``, one object each; a body of the
wrong shape keeps FastAPI's 422).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, MutableMapping
from typing import Any

import fastapi.routing
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect
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
DEFAULT_MAX_BODY = 1 << 20
"""The largest request body (1 MiB) unless ``orch serve --max-body-bytes`` says otherwise."""


class UnsupportedMediaType(InputError):
    """A body sent with a content type the route does not read."""


class BodyTooLarge(InputError):
    """A request body over the server's limit."""


def status_for(exc: OrchError) -> int:
    """The HTTP status of an orch error: never 5xx for bad input."""
    if isinstance(exc, UnsupportedMediaType):
        return 415
    if isinstance(exc, BodyTooLarge):
        return 413
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, ConflictError | StateError):
        return 409
    if isinstance(exc, InputError):
        return 400
    if isinstance(exc, ProviderError | RemoteError):
        return 502
    return 409  # e.g. FleetIncomplete: the request was fine, the fleet is not there yet


def error_response(status: int, message: str, hint: str | None, *,
                   problems: list[dict[str, object]] | None = None) -> JSONResponse:
    """The one-line body of every error the API answers itself (with ``problems`` when
    there are several)."""
    body: dict[str, object] = {"error": message, "hint": hint}
    if problems:
        body["problems"] = problems
    return JSONResponse(body, status_code=status)


def orch_error_response(exc: OrchError) -> JSONResponse:
    """An ``OrchError`` as the API answers it: one line, and each problem when several."""
    problems = exc.problems
    listed = [p.to_dict() for p in problems] if len(problems) > 1 else None
    return error_response(status_for(exc), exc.message, exc.hint, problems=listed)


def _too_large(limit: int) -> JSONResponse:
    error = BodyTooLarge(f"request body larger than {limit} bytes (the limit)",
                         hint="send less; `orch serve --max-body-bytes N` sets the limit")
    response = error_response(413, error.message, error.hint)
    response.headers["Connection"] = "close"  # what the client still sends is not read
    return response


async def _read_capped(receive: Receive, limit: int) -> list[Message] | None:
    """A chunked body's messages, or None as soon as it passes ``limit`` bytes."""
    messages: list[Message] = []
    size = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages
        size += len(message.get("body", b""))
        if size > limit:
            return None
        if not message.get("more_body", False):
            return messages


def _replaying(messages: list[Message], receive: Receive) -> Receive:
    async def replayed() -> Message:
        return messages.pop(0) if messages else await receive()
    return replayed


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

    def __init__(self, app: ASGIApp, *, token: str, metrics: Metrics, routes: FastAPI,
                 max_body: int = DEFAULT_MAX_BODY) -> None:
        self.app, self.token, self.metrics, self.routes = app, token, metrics, routes
        self.max_body = max_body

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
        elif (limited := await self._within_limit(scope, receive)) is None:
            await _too_large(self.max_body)(scope, _nothing, sending)
        else:
            try:
                await self.app(scope, limited, sending)
            except ClientDisconnect:  # the client left in the middle of a streamed answer
                log.debug("%s %s: the client disconnected", scope["method"], scope["path"])
            except Exception as exc:  # a bug: still one JSON line, and logged
                log.exception("%s %s failed", scope["method"], scope["path"])
                if started:
                    raise
                await error_response(500, f"internal error: {type(exc).__name__}: {exc}",
                                     "a bug in orch; see the log")(scope, receive, sending)
        self.metrics.count_request(scope["method"], _route_path(self.routes, scope), status)

    async def _within_limit(self, scope: Scope, receive: Receive) -> Receive | None:
        """``receive`` for the app, or None when the body is over the limit: by its
        Content-Length (nothing read), or counted while a chunked one is read."""
        headers = Headers(scope=scope)
        length = headers.get("content-length")
        if length is not None:
            try:
                return None if int(length) > self.max_body else receive
            except ValueError:
                return receive  # the HTTP server refuses it
        if "chunked" in headers.get("transfer-encoding", "").lower():
            messages = await _read_capped(receive, self.max_body)
            return None if messages is None else _replaying(messages, receive)
        return receive


async def _nothing() -> Message:
    return {"type": "http.disconnect"}
