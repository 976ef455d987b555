"""API auth (orchestrator/server/auth.py, middleware.py, deps.py): the token file, the
bearer check and the middleware around every request, exactly.  Written to kill the
mutants that survived in docs/mutation.md."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import ssl
import stat
from collections.abc import AsyncIterator, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from orchestrator.agent import protocol as P
from orchestrator.deploy import pki
from orchestrator.errors import (
    ConflictError,
    InputError,
    NotFoundError,
    OrchError,
    ProviderError,
    RemoteError,
    StateError,
)
from orchestrator.scheduler.service import SchedulerService
from orchestrator.server.app import create_app
from orchestrator.server.auth import api_token, bearer_ok, token_path
from orchestrator.server.middleware import UnsupportedMediaType, status_for
from orchestrator.state import NodeState, Store
from orchestrator.workspace import Workspace
from tests.helpers.net import free_port

TOKEN = "s3cret-token_value"


@pytest.mark.parametrize(("header", "ok"), [
    (None, False), ("", False), (f"Bearer {TOKEN}", True), (f"bearer {TOKEN}", True), (f"BEARER {TOKEN}", True),
    (f"  Bearer   {TOKEN}  ", True), (f"Basic {TOKEN}", False), ("Bearer", False), ("Bearer ", False),
    (f"Bearer {TOKEN}x", False), (f"Bearer {TOKEN[:-1]}", False), (f"Bearer{TOKEN}", False), (TOKEN, False),
    (f"Token {TOKEN}", False), (f"Bearer {TOKEN} {TOKEN}", False),
])
def test_bearer_ok(header: str | None, ok: bool) -> None:
    assert bearer_ok(header, TOKEN) is ok


def test_the_token_is_made_once_0600_and_kept(ws: Workspace) -> None:
    token = api_token(ws)
    path = token_path(ws)
    assert path == ws.root / ".orch" / "api-token"
    assert len(token) == 43 and set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert path.read_text() == token + "\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert api_token(ws) == token, "a second call made another token"
    assert sorted(p.name for p in path.parent.iterdir() if "api-token" in p.name) == ["api-token"]  # no temp left


def test_a_token_already_there_is_never_replaced(ws: Workspace) -> None:
    ws.ensure_runtime()
    path = token_path(ws)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"  made-by-another-process \n")
    os.close(fd)
    assert api_token(ws) == "made-by-another-process"
    assert path.read_bytes() == b"  made-by-another-process \n"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_a_token_others_can_read_is_refused(ws: Workspace, mode: int) -> None:
    api_token(ws)
    token_path(ws).chmod(mode)
    with pytest.raises(StateError) as caught:
        api_token(ws)
    assert (caught.value.message, caught.value.hint) == (
        f".orch/api-token is readable by others (mode {mode:o})", "chmod 600 .orch/api-token")


def test_an_empty_token_file_is_refused(ws: Workspace) -> None:
    api_token(ws)
    token_path(ws).write_text(" \n")
    with pytest.raises(StateError) as caught:
        api_token(ws)
    assert (caught.value.message, caught.value.hint) == (
        ".orch/api-token is empty", "remove it; the next `orch serve` makes a new one")


@pytest.fixture
def umask_0() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_the_token_is_0600_from_its_first_byte(ws: Workspace, umask_0: None,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Even with a umask of 0: the temporary file the token is written into is made 0600,
    so no other user can read the token in the moment before the (second) chmod."""
    seen: list[tuple[str, int, str]] = []  # (name, mode, content) of each file chmod is called on
    real_chmod = os.chmod

    def chmod(path: str | os.PathLike[str], mode: int) -> None:
        with open(path) as written:
            seen.append((os.path.basename(path), stat.S_IMODE(os.stat(path).st_mode), written.read()))
        real_chmod(path, mode)

    monkeypatch.setattr(os, "chmod", chmod)
    token = api_token(ws)
    assert seen == [(f".api-token.{os.getpid()}.tmp", 0o600, token + "\n")]
    assert stat.S_IMODE(token_path(ws).stat().st_mode) == 0o600


def test_a_token_another_process_makes_meanwhile_wins(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two `orch serve` starting at once: the other process's token appears after this one
    saw none and before it links its own; this one takes the other's, replacing nothing."""
    path = token_path(ws)
    real = secrets.token_urlsafe

    def token_urlsafe(nbytes: int | None = None) -> str:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # the other process, first
        os.write(fd, b"the-other-processes-token\n")
        os.close(fd)
        return real(nbytes)

    monkeypatch.setattr(secrets, "token_urlsafe", token_urlsafe)
    assert api_token(ws) == "the-other-processes-token"
    assert path.read_bytes() == b"the-other-processes-token\n"
    assert sorted(p.name for p in path.parent.iterdir() if "api-token" in p.name) == ["api-token"]  # no temp left


# -- the middleware around every request (Guard), in process through httpx ------------------


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # what uvicorn runs the app on


@contextlib.asynccontextmanager
async def client(ws: Workspace, *, token: str | None = TOKEN) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The app of ``ws`` (no lifespan: no runner thread), and a client sending ``token``."""
    Store.open(ws.state_db).close()
    app = create_app(ws, token=TOKEN)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://orch", headers=headers) as http:
            yield app, http
    finally:
        app.state.stores.close()


async def metrics(http: httpx.AsyncClient) -> str:
    response = await http.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200
    return response.text


def count(text: str, method: str, route: str, status: int) -> float:
    line = f'orch_http_requests_total{{method="{method}",route="{route}",status="{status}"}} '
    found = [float(row[len(line):]) for row in text.splitlines() if row.startswith(line)]
    return found[0] if found else 0.0


@pytest.mark.parametrize(("error", "status"), [
    (UnsupportedMediaType("x"), 415), (NotFoundError("x"), 404), (ConflictError("x"), 409), (StateError("x"), 409),
    (InputError("x"), 400), (ProviderError("x"), 502), (RemoteError("x"), 502), (OrchError("x"), 409),
])
def test_status_for(error: OrchError, status: int) -> None:
    assert status_for(error) == status


@pytest.mark.anyio
async def test_a_401_is_one_json_line_counted_under_the_routes_template(ws: Workspace) -> None:
    async with client(ws, token="wrong") as (_, http):
        refused = await http.get("/jobs/j0123456789")
        unknown = await http.get("/no/such/route")
        text = await metrics(http)
    for response in (refused, unknown):
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        assert response.json() == {"error": "missing or wrong API token",
                                   "hint": "send `Authorization: Bearer <token>`; the token is in .orch/api-token"}
    assert count(text, "GET", "/jobs/{job_id}", 401) == 1.0
    assert count(text, "GET", "unmatched", 401) == 1.0


@pytest.mark.anyio
async def test_with_the_token_routes_get_the_workspace_the_runner_and_the_body(ws: Workspace) -> None:
    async with client(ws) as (_, http):
        assert (await http.get("/info")).status_code == 200  # the workspace
        deleted = await http.delete("/jobs/jnope")  # the runner is asked first, then the job is not found
        assert (deleted.status_code, deleted.json()["error"]) == (404, "no job 'jnope'")
        put = await http.put("/kv/colour", json={"value": "blue"})  # the body reaches the route
        assert put.status_code == 200, put.text
        assert (await http.get("/kv/colour")).json()["value"] == {"value": "blue"}
        text = await metrics(http)
    assert count(text, "PUT", "/kv/{key}", 200) == 1.0


@pytest.mark.anyio
async def test_a_bug_is_logged_with_the_request(ws: Workspace, caplog: pytest.LogCaptureFixture) -> None:
    async with client(ws) as (app, http):
        def boom() -> None:
            raise RuntimeError("a bug in a route")

        app.add_api_route("/boom", boom)
        with caplog.at_level(logging.ERROR, logger="orch.serve"):
            response = await http.get("/boom")
    assert response.status_code == 500
    [record] = [r for r in caplog.records if r.name == "orch.serve"]
    assert record.getMessage() == "GET /boom failed" and record.exc_info is not None


@pytest.mark.anyio
async def test_a_failure_after_the_response_started_is_not_answered_twice(ws: Workspace) -> None:
    async with client(ws) as (app, http):
        def chunks() -> Iterator[bytes]:
            yield b"first part\n"
            raise RuntimeError("failed half way")

        app.add_api_route("/stream", lambda: StreamingResponse(chunks()))
        response = await http.get("/stream")  # the stream breaks off; no second (500) response is sent
        text = await metrics(http)
    assert (response.status_code, response.content) == (200, b"first part\n")
    assert count(text, "GET", "/stream", 500) == 0.0


@pytest.mark.anyio
async def test_the_lifespan_passes_through_the_guard(ws: Workspace) -> None:
    """Other ASGI scopes than http (the lifespan: the runner starts and stops) go to the
    app untouched and need no token."""
    Store.open(ws.state_db).close()
    app = create_app(ws, token=TOKEN)
    sent: list[str] = []
    started = asyncio.Event()
    steps = iter(["lifespan.startup", "lifespan.shutdown"])

    async def receive() -> dict[str, Any]:
        kind = next(steps)
        if kind == "lifespan.shutdown":
            await started.wait()
        return {"type": kind}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message["type"])
        if message["type"] == "lifespan.startup.complete":
            started.set()

    try:
        await asyncio.wait_for(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send), 30)
    finally:
        app.state.stores.close()
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


@pytest.mark.anyio
async def test_routes_get_the_scheduler_service(ws: Workspace, tmp_path: Path) -> None:
    """GET /agents answers from the app's scheduler service (``orch serve`` passes one):
    the connected agents, each with the seconds since it was last heard from.  A real
    SchedulerService on a free port, and a node's agent side over mutual TLS (its HELLO)."""
    port = free_port()
    ws.settings_file.write_text(ws.settings_file.read_text() + f"scheduler_port: {port}\n")
    with Store.open(ws.state_db) as store:  # a ready node of the workspace, so the scheduler admits it
        store.add_node("w-1", family="workers", provider="local")
        for state in (NodeState.CREATING, NodeState.BOOTING, NodeState.READY):
            store.set_node_state("w-1", state)
    cert, key = pki.issue_node_cert(ws, "w-1")
    (tmp_path / "w-1.crt").write_bytes(cert)
    (tmp_path / "w-1.key").write_bytes(key)
    context = pki.client_ssl_context(pki.ca_cert_path(ws), tmp_path / "w-1.crt", tmp_path / "w-1.key")
    service = SchedulerService(ws)
    service.start()
    try:
        async with client(ws) as (app, http):
            assert (await http.get("/agents")).json() == {}  # no service: no agents
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                "127.0.0.1", port, ssl=context, server_hostname=P.SCHEDULER_NAME), 10)
            writer.write(P.control(P.HELLO, node="w-1", name="w-1", slots=1, releases=[],
                                   version=P.PROTOCOL_VERSION, pid=os.getpid()))
            kind, _ = await asyncio.wait_for(P.read_message(reader), 10)
            assert kind == P.WELCOME
            app.state.service = service
            response = await http.get("/agents")
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()
    finally:
        service.stop()
    assert response.status_code == 200 and list(response.json()) == ["w-1"], response.json()
    assert 0 <= response.json()["w-1"] < 5
