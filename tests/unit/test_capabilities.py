"""Provider catalogues cached in the store, merged with the registration."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator.config import load_provider
from orchestrator.provision.catalogue import CAPABILITIES_SCOPE
from orchestrator.provision.handle import ProviderHandle
from orchestrator.state import Store
from orchestrator.workspace import Workspace
from tests.helpers.cli import Run
from tests.helpers.workspace import file_digest

DUMMY = "driver: dummy\ncredentials: {key: env:ORCH_TEST_DUMMY}\nprices: {'1': 9.5}\nlabels: [lab]\n"


@pytest.fixture
def dummy_ws(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> Workspace:
    monkeypatch.setenv("ORCH_TEST_DUMMY", "0")
    (ws.providers_dir / "lab.yaml").write_text(DUMMY)
    (ws.families_dir / "workers.yaml").write_text("release: primes\ncount: 2\nplacement: {providers: [lab]}\n")
    return ws


def test_catalogue_is_cached_until_it_expires(dummy_ws: Workspace) -> None:
    handle = ProviderHandle(dummy_ws, load_provider(dummy_ws, "lab"))
    with Store.open(dummy_ws.state_db) as store:
        first = handle.offers(store)
        assert store.kv_get("lab", scope=CAPABILITIES_SCOPE)["catalogue"]["fetched_at"] == first.fetched_at
        assert ProviderHandle(dummy_ws, handle.config).offers(store).fetched_at == first.fetched_at
        expired = ProviderHandle(dummy_ws, handle.config).offers(store, ttl=0)
        assert expired.fetched_at > first.fetched_at
        caps = handle.capabilities(store)
    assert {s.id: s.hourly_price for s in caps.sizes}["1"] == 9.5, "the registration's price wins"
    assert caps.labels == frozenset({"lab"}) and caps.locations


def test_refresh_caches_and_plan_writes_nothing(dummy_ws: Workspace, orch: Callable[..., Run]) -> None:
    assert orch("provider", "refresh", "--json", cwd=dummy_ws.root).code == 0
    with Store.open(dummy_ws.state_db) as store:
        store.kv_put("lab", {"driver": "other", "catalogue": {}}, scope=CAPABILITIES_SCOPE)  # stale: refetched
    before = file_digest(dummy_ws.state_db)
    planned = orch("plan", "workers", "--json")
    assert planned.code == 0, planned.err
    assert file_digest(dummy_ws.state_db) == before


def test_plan_without_any_state_creates_none(dummy_ws: Workspace, orch: Callable[..., Run], tmp_path: Path) -> None:
    for leftover in dummy_ws.runtime_dir.rglob("*"):
        if leftover.is_file():
            leftover.unlink()
    dummy_ws.state_db.parent.mkdir(exist_ok=True)
    result = orch("plan", "workers", cwd=dummy_ws.root)
    assert result.code == 0, result.err
    assert not dummy_ws.state_db.exists()
