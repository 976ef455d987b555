"""The API's request wrapper and store pool, in process (no lifespan: no scheduler, no
runner thread): what a bug in a route answers, what the token check refuses, and
that requests reuse stores instead of opening one each."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from orchestrator.errors import StateError
from orchestrator.server.app import create_app
from orchestrator.state import Store, StorePool
from orchestrator.workspace import Workspace

TOKEN = "t0ken-for-the-test"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # what uvicorn runs the app on


async def _call(ws: Workspace, path: str, *, token: str | None = TOKEN, broken: bool = False) -> httpx.Response:
    app = create_app(ws, token=TOKEN)
    if broken:
        def boom() -> None:
            raise RuntimeError("a bug in a route")

        app.add_api_route("/boom", boom)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://orch") as client:
            response = await client.get(path, headers=headers)
            metrics = await client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    finally:
        app.state.stores.close()
    response.extensions["metrics"] = metrics.text
    return response


@pytest.mark.anyio
async def test_a_bug_in_a_route_is_one_json_line_with_500_and_counted(ws: Workspace) -> None:
    Store.open(ws.state_db).close()
    response = await _call(ws, "/boom", broken=True)
    assert response.status_code == 500
    assert response.json() == {"error": "internal error: RuntimeError: a bug in a route",
                               "hint": "a bug in orch; see the log"}
    assert 'orch_http_requests_total{method="GET",route="/boom",status="500"} 1.0' in response.extensions["metrics"]


@pytest.mark.anyio
@pytest.mark.parametrize("token", [None, "wrong"])
async def test_without_the_token_401_and_the_route_never_runs(ws: Workspace, token: str | None) -> None:
    response = await _call(ws, "/boom", token=token, broken=True)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"] == "missing or wrong API token"
    assert 'route="/boom",status="401"} 1.0' in response.extensions["metrics"]
    assert "status=\"500\"" not in response.extensions["metrics"]


@pytest.mark.anyio
async def test_healthz_needs_no_token(ws: Workspace) -> None:
    response = await _call(ws, "/healthz", token=None)
    assert response.status_code == 200 and response.json()["ok"] is True


def test_the_pool_lends_each_store_to_one_holder_and_reuses_it(tmp_path: Path) -> None:
    pool = StorePool(tmp_path / "state.db", keep=1)
    with pool.store() as first, pool.store() as second:  # the first is lent: another is opened
        assert second is not first
        second.record_event("note", reason="from the second")
    with pytest.raises(StateError, match="closed database"):
        first.events()  # given back second, past keep=1: closed
    with pool.store() as again:  # the one kept is given again
        assert again is second
        assert [e.reason for e in again.events()] == ["from the second"]
    pool.close()
    with pytest.raises(StateError, match="closed database"):
        second.events()
