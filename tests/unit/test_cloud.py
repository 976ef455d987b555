"""The Python cloud API without nodes: ``Cloud.mutate_store`` above all (commit, fail,
rollback, own writes, job scopes, bad values, conflicts), and the acceptance test: two
concurrent mutators, threads or processes, each adding 1 to one counter 1,000 times,
end at exactly 2,000."""

from __future__ import annotations

import contextlib
import multiprocessing
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import orchestrator
from orchestrator.deploy.releases import upload_release
from orchestrator.errors import ConflictError, InputError, NotFoundError, StateError, WorkspaceError
from orchestrator.scheduler.jobs import JobRef
from orchestrator.sdk import GLOBAL_SCOPE, Cloud, KVTransaction, MutationFailed, job_scope
from orchestrator.state import Store
from orchestrator.workspace import Workspace

INCREMENTS = 1000


@pytest.fixture
def cloud(ws: Workspace) -> Any:
    with Cloud(ws.root) as made:
        yield made


@pytest.fixture
def job(cloud: Cloud, ws: Workspace) -> JobRef:
    upload_release(ws, cloud.store, ws.releases_src_dir / "primes")
    return cloud.add_job("primes:count_primes", input="0:1000")


def kv(ws: Workspace, scope: str) -> dict[str, Any]:
    """What is committed in ``scope``, read through a connection of its own."""
    with Store.open(ws.state_db) as store:
        return store.kv_items(scope=scope)


# -- commit, fail, rollback ---------------------------------------------------------------------------


def test_returning_commits_and_mutate_store_returns_what_fn_returned(cloud: Cloud, ws: Workspace) -> None:
    def fn(tx: KVTransaction) -> str:
        tx.store(None, "a", {"x": [1, 2]})
        tx.store(None, "b", "text")
        return "done"

    assert cloud.mutate_store(fn) == "done"
    assert kv(ws, GLOBAL_SCOPE) == {"a": {"x": [1, 2]}, "b": "text"}
    assert cloud.mutate_store(lambda tx: tx.fetch(None, "a")) == {"x": [1, 2]}


def test_commit_applies_at_once_and_ends_the_transaction(cloud: Cloud, ws: Workspace) -> None:
    seen: dict[str, Any] = {}

    def fn(tx: KVTransaction) -> None:
        tx.store(None, "k", 1)
        tx.commit()
        seen["committed"] = kv(ws, GLOBAL_SCOPE)
        with pytest.raises(StateError, match="already committed"):
            tx.store(None, "k", 2)
        with pytest.raises(StateError, match="already committed"):
            tx.fetch(None, "k")

    cloud.mutate_store(fn)
    assert seen["committed"] == {"k": 1}
    assert kv(ws, GLOBAL_SCOPE) == {"k": 1}


def test_fail_rolls_back_everything_and_raises(cloud: Cloud, ws: Workspace) -> None:
    cloud.mutate_store(lambda tx: tx.store(None, "kept", 1))
    calls = []

    def fn(tx: KVTransaction) -> None:
        calls.append(1)
        tx.store(None, "kept", 2)
        tx.store(None, "new", 3)
        tx.fail("not today")

    with pytest.raises(MutationFailed, match="not today") as info:
        cloud.mutate_store(fn)
    assert info.value.reason == "not today"
    assert calls == [1], "a failed transaction is not retried"
    assert kv(ws, GLOBAL_SCOPE) == {"kept": 1}


def test_fail_stays_failed_even_when_fn_swallows_it(cloud: Cloud, ws: Workspace) -> None:
    def fn(tx: KVTransaction) -> str:
        tx.store(None, "k", 1)
        with contextlib.suppress(MutationFailed):
            tx.fail("changed my mind")
        with pytest.raises(StateError, match="already failed"):
            tx.store(None, "k", 2)
        return "ignored"

    with pytest.raises(MutationFailed, match="changed my mind"):
        cloud.mutate_store(fn)
    assert kv(ws, GLOBAL_SCOPE) == {}


def test_an_exception_rolls_back_and_propagates_unchanged(cloud: Cloud, ws: Workspace) -> None:
    cloud.mutate_store(lambda tx: tx.store(None, "kept", 1))

    def fn(tx: KVTransaction) -> None:
        tx.store(None, "kept", 2)
        tx.store(None, "new", 3)
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        cloud.mutate_store(fn)
    assert kv(ws, GLOBAL_SCOPE) == {"kept": 1}


def test_fetch_sees_its_own_uncommitted_writes_and_others_do_not(cloud: Cloud, ws: Workspace) -> None:
    def fn(tx: KVTransaction) -> list[Any]:
        seen = [tx.fetch(None, "k", "absent")]
        tx.store(None, "k", [1])
        seen.append(tx.fetch(None, "k"))
        seen.append(kv(ws, GLOBAL_SCOPE).get("k", "uncommitted"))
        value = tx.fetch(None, "k")
        value.append(2)  # a fetched value is a copy
        seen.append(tx.fetch(None, "k"))
        return seen

    assert cloud.mutate_store(fn) == ["absent", [1], "uncommitted", [1]]


# -- scopes and values ----------------------------------------------------------------------------------


def test_values_are_scoped_per_job_and_job_refs_are_refs_or_ids(cloud: Cloud, ws: Workspace, job: JobRef) -> None:
    other = cloud.add_job("primes:count_primes", input="0:10")

    def fn(tx: KVTransaction) -> None:
        tx.store(job, "n", 1)
        tx.store(other.id, "n", 2)
        tx.store(None, "n", 3)

    cloud.mutate_store(fn)
    assert kv(ws, f"job:{job.id}") == {"n": 1}
    assert kv(ws, job_scope(other)) == {"n": 2}
    assert kv(ws, GLOBAL_SCOPE) == {"n": 3}
    fetched = cloud.mutate_store(lambda tx: [tx.fetch(job.id, "n"), tx.fetch(other, "n"), tx.fetch(None, "n")])
    assert fetched == [1, 2, 3]

    cloud.delete_job(job)
    assert kv(ws, job_scope(job)) == {}, "deleting a job deletes its values"
    assert kv(ws, job_scope(other)) == {"n": 2}
    with pytest.raises(NotFoundError, match=job.id):
        cloud.mutate_store(lambda tx: tx.fetch(job, "n"))
    with pytest.raises(NotFoundError, match="nope"):
        cloud.mutate_store(lambda tx: tx.store("nope", "n", 1))
    with pytest.raises(InputError, match="not a job"):
        cloud.mutate_store(lambda tx: tx.store(42, "n", 1))  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [object(), {1, 2}, float("nan"), float("inf"), b"bytes", {"deep": [object()]}])
def test_a_value_that_is_not_json_is_an_input_error_naming_the_key(cloud: Cloud, ws: Workspace, value: Any) -> None:
    def fn(tx: KVTransaction) -> None:
        tx.store(None, "fine", 1)
        tx.store(None, "the-bad-key", value)

    with pytest.raises(InputError, match=r"the-bad-key.*not JSON-able"):
        cloud.mutate_store(fn)
    assert kv(ws, GLOBAL_SCOPE) == {}, "nothing of the transaction was written"


@pytest.mark.parametrize("key", ["", 3, None])
def test_keys_are_non_empty_strings(cloud: Cloud, key: Any) -> None:
    with pytest.raises(InputError, match="keys are non-empty strings"):
        cloud.mutate_store(lambda tx: tx.store(None, key, 1))


# -- conflicts ---------------------------------------------------------------------------------------------


def test_a_conflicting_write_reruns_fn_with_the_new_value(cloud: Cloud, ws: Workspace) -> None:
    cloud.store.kv_put("n", 10, scope=GLOBAL_SCOPE)
    seen = []

    def fn(tx: KVTransaction) -> int:
        value = tx.fetch(None, "n")
        seen.append(value)
        if len(seen) == 1:
            with Store.open(ws.state_db) as other:  # another writer gets in between
                other.kv_put("n", 100, scope=GLOBAL_SCOPE)
        tx.store(None, "n", value + 1)
        return int(value + 1)

    assert cloud.mutate_store(fn) == 101
    assert seen == [10, 100]
    assert kv(ws, GLOBAL_SCOPE) == {"n": 101}


def test_a_conflict_at_an_explicit_commit_reruns_fn(cloud: Cloud, ws: Workspace) -> None:
    attempts = []

    def fn(tx: KVTransaction) -> None:
        attempts.append(tx.fetch(None, "n", 0))
        if len(attempts) == 1:
            cloud.store.kv_put("n", 5, scope=GLOBAL_SCOPE)
        tx.store(None, "n", attempts[-1] + 1)
        try:
            tx.commit()
        except Exception:  # pragma: no cover - the conflict is not an Exception
            raise AssertionError("the conflict leaked into fn as an Exception") from None

    cloud.mutate_store(fn)
    assert attempts == [0, 5]
    assert kv(ws, GLOBAL_SCOPE) == {"n": 6}


def test_a_key_deleted_and_made_again_with_another_value_is_a_conflict(cloud: Cloud) -> None:
    store = cloud.store
    store.kv_put("k", "a", scope=GLOBAL_SCOPE)
    seen = store.kv_read("k", scope=GLOBAL_SCOPE)
    assert seen == ('"a"', 1)
    store.kv_delete("k", scope=GLOBAL_SCOPE)
    store.kv_put("k", "b", scope=GLOBAL_SCOPE)  # version 1 again
    assert not store.kv_apply({(GLOBAL_SCOPE, "k"): seen}, {(GLOBAL_SCOPE, "k"): '"c"'})
    assert store.kv_get("k", scope=GLOBAL_SCOPE) == "b"
    assert not store.kv_apply({(GLOBAL_SCOPE, "absent"): None, (GLOBAL_SCOPE, "k"): seen},
                              {(GLOBAL_SCOPE, "x"): "1"}), "all or nothing"
    assert store.kv_get("x", scope=GLOBAL_SCOPE) is None
    assert store.kv_apply({(GLOBAL_SCOPE, "absent"): None}, {(GLOBAL_SCOPE, "x"): "1"})
    assert store.kv_get("x", scope=GLOBAL_SCOPE) == 1


def test_endless_conflicts_give_up_with_a_conflict_error(cloud: Cloud) -> None:
    def fn(tx: KVTransaction) -> None:
        value = tx.fetch(None, "n", 0)
        cloud.store.kv_put("n", value + 1, scope=GLOBAL_SCOPE)
        tx.store(None, "n", -1)

    with pytest.raises(ConflictError, match="conflicted with other writers 5 times"):
        cloud.mutate_store(fn, max_attempts=5)
    assert cloud.store.kv_get("n", scope=GLOBAL_SCOPE) == 5


# -- the acceptance test: 2 x 1,000 increments -------------------------------------------------------------


def increment(tx: KVTransaction) -> None:
    tx.store(None, "counter", tx.fetch(None, "counter", 0) + 1)


def increment_loop(root: str, count: int, start: Any = None) -> None:
    """One mutator: its own Cloud on the workspace; ``count`` increments."""
    with Cloud(root) as cloud:
        if start is not None:
            start.wait()
        for _ in range(count):
            cloud.mutate_store(increment)


def test_two_threads_incrementing_1000_times_each_end_at_2000(ws: Workspace) -> None:
    with Cloud(ws.root) as cloud:
        start = threading.Barrier(2)
        attempts = [0, 0]

        def loop(index: int) -> None:
            def counted(tx: KVTransaction) -> None:
                attempts[index] += 1
                increment(tx)

            start.wait()
            for _ in range(INCREMENTS):
                cloud.mutate_store(counted)  # one Cloud, a store per thread

        threads = [threading.Thread(target=loop, args=(i,)) for i in range(2)]
        began = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        elapsed = time.monotonic() - began
        assert not any(t.is_alive() for t in threads)
        assert cloud.mutate_store(lambda tx: tx.fetch(None, "counter")) == 2 * INCREMENTS
    print(f"2 threads x {INCREMENTS} increments: {elapsed:.2f} s, {sum(attempts) - 2 * INCREMENTS} conflicts re-run")
    assert elapsed < 20


def test_two_processes_incrementing_1000_times_each_end_at_2000(ws: Workspace) -> None:
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)
    procs = [context.Process(target=increment_loop, args=(str(ws.root), INCREMENTS, start)) for _ in range(2)]
    began = time.monotonic()
    for proc in procs:
        proc.start()
    try:
        for proc in procs:
            proc.join(60)
        elapsed = time.monotonic() - began
        assert [p.exitcode for p in procs] == [0, 0]
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
    with Cloud(ws.root) as cloud:
        assert cloud.mutate_store(lambda tx: tx.fetch(None, "counter")) == 2 * INCREMENTS
    print(f"2 processes x {INCREMENTS} increments: {elapsed:.2f} s (with start-up)")
    assert elapsed < 20


# -- the Cloud itself --------------------------------------------------------------------------------------


def test_the_workspace_is_found_like_the_cli_finds_it(ws: Workspace, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ORCH_WORKSPACE", raising=False)
    (ws.root / "deep" / "er").mkdir(parents=True)
    monkeypatch.chdir(ws.root / "deep" / "er")
    with Cloud() as cloud:
        assert cloud.workspace.root == ws.root
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ORCH_WORKSPACE", str(ws.root))
    with Cloud() as cloud:
        assert cloud.workspace.root == ws.root
    with pytest.raises(WorkspaceError, match="not an orch workspace"):
        Cloud(tmp_path / "nowhere")


def test_each_thread_has_its_own_store_and_close_closes_them(ws: Workspace) -> None:
    cloud = Cloud(ws.root)
    stores = [cloud.store]
    thread = threading.Thread(target=lambda: stores.append(cloud.store))
    thread.start()
    thread.join()
    assert stores[0] is cloud.store and stores[1] is not stores[0]
    cloud.close()
    with pytest.raises(StateError, match="closed"):
        cloud.mutate_store(increment)
    with pytest.raises(StateError, match="closed"):
        cloud.jobs()


def test_jobs_status_info_and_delete_without_nodes(cloud: Cloud, job: JobRef) -> None:
    assert [j.id for j in cloud.jobs()] == [job.id]
    assert cloud.status(job)["state"] == cloud.status(job.id)["state"] == "queued"
    info = cloud.info()
    assert info["workspace"] == {"id": cloud.store.workspace_id, "root": str(cloud.workspace.root)}
    assert info["jobs"]["by_state"] == {"queued": 1, "running": 0, "done": 0, "suspended": 0, "failed": 0}
    assert set(info["nodes"]["by_state"].values()) == {0}
    assert info["nodes"]["by_family"] == info["nodes"]["by_provider"] == {}
    assert info["totals"] == {"nodes": 0, "live_nodes": 0, "ready_nodes": 0, "jobs": 1, "releases": 1,
                              "providers": 0}
    assert cloud.nodes() == []
    with pytest.raises(InputError, match="no function 'nope'"):
        cloud.add_job("primes:nope", input="0:10")
    with pytest.raises(StateError, match="no ready nodes"):
        cloud.run(job)
    with pytest.raises(NotFoundError, match="no node matches target 'n-missing'"):
        cloud.remove_node("n-missing")
    with pytest.raises(InputError, match="count must be an integer >= 1"):
        cloud.add_node("workers", count=0)
    cloud.delete_job(job)
    assert cloud.jobs() == []
    with pytest.raises(NotFoundError):
        cloud.status(job)
    with pytest.raises(NotFoundError):
        cloud.delete_job(job)


def test_orchestrator_cloud_is_exported_lazily() -> None:
    assert orchestrator.Cloud is Cloud
    code = "import sys, orchestrator; assert 'orchestrator.sdk' not in sys.modules; assert orchestrator.Cloud"
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(AttributeError):
        orchestrator.Nope  # noqa: B018
