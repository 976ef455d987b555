"""The Python cloud API on real local nodes: grow a family through ``Cloud.add_node``,
run a job in-process, check its output against a direct computation, look at
``status`` and ``info``, remove a node, delete the job without a trace."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import fleet
from orchestrator.errors import NotFoundError
from orchestrator.sdk import Cloud, KVTransaction, job_scope
from orchestrator.state import JobState, NodeState, Store
from orchestrator.workspace import Workspace
from tests.helpers.primes import primes_below
from tests.helpers.processes import processes_of
from tests.helpers.workspace import primes_workspace

pytestmark = [pytest.mark.sshd, pytest.mark.slow]
PRIMES_BELOW_200000 = 17984


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    return primes_workspace(tmp_path / "ws", max_nodes=4, upload=False)


def test_nodes_and_a_job_through_the_cloud_api(workspace: Workspace) -> None:
    assert primes_below(200_000) == PRIMES_BELOW_200000
    nodes = []
    try:
        with Cloud(workspace.root) as cloud:
            [first] = cloud.add_node("workers")
            [second] = cloud.add_node("workers", count=1)  # grows by one: 1 -> 2
            assert first.id != second.id
            assert {n.id for n in cloud.nodes()} == {first.id, second.id}
            assert all(n.state == NodeState.READY for n in cloud.nodes())

            job = cloud.add_job("primes:count_primes", input="0:200000")
            assert cloud.status(job)["state"] == "queued"
            outcome = cloud.run(job)
            assert outcome.state == JobState.DONE, outcome
            output = cloud.result(job)
            counts = [int(line) for line in output.split()]
            assert sum(counts) == PRIMES_BELOW_200000
            assert len(counts) == outcome.counters["done"]
            status = cloud.status(job.id)
            assert status["state"] == "done" and status["written"] == len(counts)
            assert status["failed_tasks"] == []

            info = cloud.info()
            assert info["totals"]["live_nodes"] == info["totals"]["ready_nodes"] == 2
            assert {k: v for k, v in info["nodes"]["by_state"].items() if v} == {"ready": 2}
            assert info["nodes"]["by_family"] == {"workers": 2}
            assert info["nodes"]["by_provider"] == {"local": 2}
            assert {k: v for k, v in info["jobs"]["by_state"].items() if v} == {"done": 1}
            assert info["totals"]["jobs"] == 1

            def note(tx: KVTransaction) -> None:
                tx.store(job, "primes", sum(counts))

            cloud.mutate_store(note)
            assert cloud.mutate_store(lambda tx: tx.fetch(job, "primes")) == PRIMES_BELOW_200000

            removed = cloud.remove_node(first.id)
            assert removed.state == NodeState.STOPPED
            assert processes_of(first.provider_node_id, first.extra["node_dir"]) == []
            assert [n.id for n in cloud.nodes()] == [second.id]
            info = cloud.info()
            assert info["totals"]["live_nodes"] == 1 and info["totals"]["nodes"] == 2
            assert {k: v for k, v in info["nodes"]["by_state"].items() if v} == {"ready": 1, "stopped": 1}
            assert info["nodes"]["by_family"] == {"workers": 1}
            with pytest.raises(NotFoundError):
                cloud.remove_node(first.id)

            sink = workspace.root / ".orch" / "jobs" / f"{job.id}.out"
            assert sink.exists()
            cloud.delete_job(job)
            with pytest.raises(NotFoundError, match=job.id):
                cloud.status(job)
            with pytest.raises(NotFoundError):
                cloud.result(job)
            assert cloud.jobs() == []
            assert not sink.exists()
            store = cloud.store
            assert store.events(job=job.id) == []
            assert store.kv_items(scope=job_scope(job)) == {}
            for table in ("jobs", "task_batches", "result_batches", "task_attempts"):
                column = "id" if table == "jobs" else "job"
                assert store._query(f"SELECT 1 FROM {table} WHERE {column}=?", (job.id,)) == [], table
            assert cloud.info()["totals"]["jobs"] == 0
    finally:
        with Store.open(workspace.state_db) as store:
            nodes = store.list_nodes()
            live = fleet.select_nodes(store, all_nodes=True)
            if live:
                fleet.stop(workspace, store, live)
    for node in nodes:
        assert processes_of(node.provider_node_id, node.extra.get("node_dir", "/nonexistent")) == [], node.id
