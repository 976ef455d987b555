from __future__ import annotations

import multiprocessing
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from orchestrator.errors import ConflictError, NotFoundError, StateError
from orchestrator.state import MIGRATIONS, NODE_TRANSITIONS, NodeState, Store


@pytest.fixture
def store(tmp_path: Path) -> Store:
    with Store.open(tmp_path / "state.db") as s:
        yield s


def test_opens_in_wal_mode_with_every_migration_recorded(store: Store) -> None:
    assert store._query("PRAGMA journal_mode")[0][0] == "wal"
    assert store.applied_migrations() == {m.version for m in MIGRATIONS}
    assert store.pending_migrations() == []
    assert len(store.workspace_id) == 12


def test_listing_pending_migrations_never_writes(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    with Store.open(db, migrate=False) as fresh:
        assert [m.version for m in fresh.pending_migrations()] == [m.version for m in MIGRATIONS]
        assert fresh.applied_migrations() == set()
    with sqlite3.connect(db) as raw:
        assert raw.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0


def test_a_failed_migration_leaves_neither_schema_nor_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.state import migrations
    from orchestrator.state import store as store_module
    from orchestrator.state.records import Migration

    broken = (*migrations.MIGRATIONS, Migration(99, "broken", "CREATE TABLE ok_table (x);\nSELECT * FROM nowhere;"))
    monkeypatch.setattr(store_module, "MIGRATIONS", broken)
    with pytest.raises(sqlite3.OperationalError):
        Store.open(tmp_path / "state.db")
    with sqlite3.connect(tmp_path / "state.db") as raw:
        tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "ok_table" not in tables and "nodes" not in tables


def test_node_lifecycle_is_enforced_and_logged(store: Store) -> None:
    node = store.add_node("n1", family="workers", provider="local", location="local", labels=["private"])
    assert node.state is NodeState.REQUESTED and node.labels == ["private"]
    for state in (NodeState.CREATING, NodeState.BOOTING, NodeState.BOOTSTRAPPING, NodeState.READY,
                  NodeState.STOPPING, NodeState.STOPPED):
        node = store.set_node_state("n1", state, reason=f"to {state}")
    assert node.path == "/local/local/workers/n1"
    kinds = [e.kind for e in store.events(node="n1")]
    assert kinds == ["node.requested", "node.creating", "node.booting", "node.bootstrapping", "node.ready",
                     "node.stopping", "node.stopped"]
    with pytest.raises(StateError, match="cannot go from stopped to ready"):
        store.set_node_state("n1", NodeState.READY)


def test_every_state_has_transitions_declared() -> None:
    assert set(NODE_TRANSITIONS) == set(NodeState)
    assert NODE_TRANSITIONS[NodeState.STOPPED] == frozenset()


def test_events_are_append_only(store: Store) -> None:
    store.record_event("note", reason="hello")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        store._conn.execute("UPDATE events SET reason='changed'")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        store._conn.execute("DELETE FROM events")


def test_release_records_are_idempotent_and_refuse_other_content(store: Store) -> None:
    _, changed = store.add_release("primes", "1.0.0", "a" * 64, 10, {"name": "primes"})
    assert changed
    _, changed = store.add_release("primes", "1.0.0", "a" * 64, 10, {"name": "primes"})
    assert not changed
    with pytest.raises(ConflictError, match="other content"):
        store.add_release("primes", "1.0.0", "b" * 64, 10, {"name": "primes"})
    record, changed = store.add_release("primes", "1.0.0", "b" * 64, 11, {"name": "primes"}, force=True)
    assert changed and record.sha256 == "b" * 64


def test_release_in_use_cannot_be_removed(store: Store) -> None:
    store.add_release("primes", "1.0.0", "a" * 64, 10, {})
    store.add_node("n1", family="w", provider="local", release="primes@1.0.0")
    with pytest.raises(ConflictError, match="running on 1 node"):
        store.remove_release("primes", "1.0.0")
    store.set_node_state("n1", NodeState.STOPPED)
    store.remove_release("primes", "1.0.0")
    with pytest.raises(NotFoundError):
        store.get_release("primes")


def test_transaction_rolls_back_everything_on_error(store: Store) -> None:
    with pytest.raises(RuntimeError), store.transaction():
        store.kv_put("a", 1)
        store.record_event("inside")
        raise RuntimeError("boom")
    assert store.kv_get("a") is None
    assert [e.kind for e in store.events(kind="inside")] == []


def test_kv_versions_and_prefix_listing(store: Store) -> None:
    assert store.kv_put("job/1/a", {"x": 1}) == 1
    assert store.kv_put("job/1/a", {"x": 2}) == 2
    store.kv_put("job/2/a", 3)
    store.kv_put("other", 4, scope="s")
    assert store.kv_items(prefix="job/1/") == {"job/1/a": {"x": 2}}
    assert store.kv_get("other") is None and store.kv_get("other", scope="s") == 4
    assert store.kv_delete("job/2/a") and not store.kv_delete("job/2/a")


def _hammer(db: str, worker: int, rounds: int) -> None:
    with Store.open(Path(db)) as s:
        for i in range(rounds):
            with s.transaction():
                s.kv_put("counter", s.kv_get("counter", default=0) + 1)
                s.record_event("tick", data={"worker": worker, "i": i})


def test_two_processes_writing_at_once_lose_nothing(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    Store.open(db).close()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_hammer, args=(str(db), w, 300)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    with Store.open(db) as s:
        assert s.kv_get("counter") == 600
        ticks = s.events(kind="tick", limit=10_000)
        assert len(ticks) == 600
        assert {(e.data["worker"], e.data["i"]) for e in ticks} == {(w, i) for w in range(2) for i in range(300)}
        assert s._query("PRAGMA integrity_check")[0][0] == "ok"


def _open_and_note(path: str, start: Any, index: int) -> None:
    start.wait()
    with Store.open(Path(path)) as store:
        store.record_event("note", reason=f"opened by {index}")


def test_processes_opening_a_new_store_at_once_all_get_it(tmp_path: Path) -> None:
    """The first opens race to create, switch to WAL and migrate the same new file."""
    context = multiprocessing.get_context("spawn")
    for attempt in range(3):
        path = tmp_path / f"state-{attempt}.db"
        start = context.Barrier(6)
        procs = [context.Process(target=_open_and_note, args=(str(path), start, i)) for i in range(6)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(60)
        assert [p.exitcode for p in procs] == [0] * 6
        with Store.open(path) as store:
            assert sorted(e.reason for e in store.events(kind="note")) == [f"opened by {i}" for i in range(6)]
