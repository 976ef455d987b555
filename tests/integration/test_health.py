"""Node health in ``orch serve`` for real: a server with ``--health-grace 2`` and three
local nodes (the YAML says two) runs a long job through the API; one node is SIGKILLed
mid-job (its sshd, agent supervisor, agent and ports: every process carrying its
ORCH_NODE_ID, and their descendants).  The server must mark it lost (``node.down``),
destroy it, spawn a replacement so the family has three ready nodes again (stopping
none), and the job must still finish with the right result.  Teardown stops the server and every node whether the test
passed or not, and checks that no process of any node is left.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.state import NodeState, Store
from orchestrator.workspace import Workspace
from tests.helpers.primes import primes_below
from tests.helpers.processes import processes_of
from tests.helpers.serving import Server, serving, wait_until
from tests.helpers.workspace import primes_workspace

pytestmark = [pytest.mark.sshd, pytest.mark.slow]
GRACE = 2.0
N = 20_000_000


def kill_node(provider_node_id: str, node_dir: Path) -> list[int]:
    """SIGKILL every process of the node until none is left; the pids killed."""
    killed: set[int] = set()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pids = processes_of(provider_node_id, node_dir)
        if not pids:
            return sorted(killed)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    left = processes_of(provider_node_id, node_dir)
    raise AssertionError(f"processes of node {provider_node_id} survive SIGKILL: {left}")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    ws = primes_workspace(tmp_path / "ws", count=2)
    try:
        with serving(ws, "--health-grace", str(GRACE)) as srv:
            yield srv
    finally:
        with Store.open(ws.state_db) as store:
            nodes = store.list_nodes()
        root = ws.runtime_dir / "drivers" / "local" / "local"
        left = {n.id: processes_of(n.provider_node_id, root / n.provider_node_id) for n in nodes if n.provider_node_id}
        assert not any(left.values()), f"processes left: {left}"


def ready_nodes(ws: Workspace) -> dict[str, Any]:
    with Store.open(ws.state_db) as store:
        return {n.id: n for n in store.list_nodes(family="workers", states=[NodeState.READY])}


def test_a_killed_node_is_lost_replaced_and_its_job_still_finishes(server: Server) -> None:
    ws = server.ws
    # three nodes where the YAML says two: the replacement restores three, not the YAML's count
    spawned = server.post("/nodes/spawn", {"family": "workers", "count": 3})
    assert spawned.status_code == 200 and spawned.json()["ok"], spawned.text
    first = set(spawned.json()["ready"])
    assert len(first) == 3
    submitted = server.post("/jobs", {"work": "primes:count_primes", "input": f"0:{N}",
                                      "target_task_seconds": 0.05})
    assert submitted.status_code == 201, submitted.text
    job = submitted.json()["job"]
    wait_until(lambda: set(server.get("/agents").json()) == first, 60, "the three agents connected")
    wait_until(lambda: server.get(f"/jobs/{job}").json()["counters"].get("done", 0) >= 10, 60, "tasks done")
    time.sleep(1.5)  # the health monitor looks every second: let it see the agents connected
    status = server.get(f"/jobs/{job}").json()
    assert status["state"] == "running", status

    victim = ready_nodes(ws)[sorted(first)[0]]
    node_dir = ws.runtime_dir / "drivers" / "local" / "local" / victim.provider_node_id
    killed_at = time.monotonic()
    assert kill_node(victim.provider_node_id, node_dir), "the node had no processes"

    def lost() -> bool:
        with Store.open(ws.state_db) as store:
            kinds = {e.kind for e in store.events(node=victim.id)}
        return {"node.lost", "node.down"} <= kinds

    wait_until(lost, GRACE + 8, "the killed node marked lost with a node.down event")
    print(f"(lost after {time.monotonic() - killed_at:.1f} s)")
    with Store.open(ws.state_db) as store:
        down = [e for e in store.events(node=victim.id, kind="node.down")]
        assert len(down) == 1 and "silent" in down[0].reason and down[0].data["connected"], down
        assert store.get_node(victim.id).state in (NodeState.LOST, NodeState.STOPPING, NodeState.STOPPED)

    wait_until(lambda: len(ready_nodes(ws)) == 3 and victim.id not in ready_nodes(ws), 120,
               "a replacement node ready")
    now = set(ready_nodes(ws))
    assert len(now - first) == 1 and (first - {victim.id}) <= now, (first, now)
    with Store.open(ws.state_db) as store:  # nothing else was stopped on the way
        assert {n.id for n in store.list_nodes(states=[NodeState.STOPPED])} == {victim.id}
    def replaced_events() -> list[Any]:
        with Store.open(ws.state_db) as store:
            return store.events(kind="node.replaced")

    # (the monitor records the event once its spawn returns, after the new node is ready)
    wait_until(lambda: bool(replaced_events()), 30, "the node.replaced event")
    with Store.open(ws.state_db) as store:
        replaced = replaced_events()
        assert replaced[-1].node == victim.id and (now - first).pop() in replaced[-1].reason, replaced
        assert store.get_node(victim.id).state == NodeState.STOPPED  # destroyed before the replacement

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        status = server.get(f"/jobs/{job}").json()
        if status["state"] not in ("queued", "running"):
            break
        time.sleep(0.2)
    assert status["state"] == "done", status
    counts = [int(x) for x in server.get(f"/jobs/{job}/result").content.split()]
    assert len(counts) == status["written"] and sum(counts) == primes_below(N)

    # A job submitted afterwards runs on the family as it is now, the replacement included.
    again = server.post("/jobs", {"work": "primes:count_primes", "input": "0:200000"})
    assert again.status_code == 201, again.text
    second = again.json()["job"]
    wait_until(lambda: server.get(f"/jobs/{second}").json()["state"] not in ("queued", "running"), 120,
               "the second job ends")
    status = server.get(f"/jobs/{second}").json()
    assert status["state"] == "done", status
    assert sum(int(x) for x in server.get(f"/jobs/{second}/result").content.split()) == primes_below(200_000)
    assert victim.id not in status["nodes"]


# -- the monitor's rules, in process (a fake scheduler service, a fake clock) ------------------


class FakeService:
    def __init__(self) -> None:
        self.agents: dict[str, float] = {}
        self.broken = False

    def connected(self) -> dict[str, float]:
        if self.broken:
            raise RuntimeError("boom")
        return dict(self.agents)


def ready_node(store: Store, node_id: str) -> None:
    store.add_node(node_id, family="gone-family", provider="nowhere", provider_node_id=f"p-{node_id}")
    for state in (NodeState.CREATING, NodeState.BOOTING, NodeState.READY):
        store.set_node_state(node_id, state)


def test_the_monitors_rules(tmp_path: Path) -> None:
    from orchestrator.server.health import HealthMonitor

    ws = Workspace.init(tmp_path / "ws")
    ws.ensure_runtime()
    now = [100.0]
    service = FakeService()
    monitor = HealthMonitor(ws, service, grace=2.0, clock=lambda: now[0])  # type: ignore[arg-type]
    with Store.open(ws.state_db) as store:
        for node_id in ("quiet", "gone", "never", "fine", "stopping"):
            ready_node(store, node_id)
        service.agents = {"quiet": 0.0, "gone": 0.0, "fine": 0.0, "stopping": 0.0}
        assert monitor.check(store) == []
        now[0] += 1.5
        service.agents = {"quiet": 1.5, "fine": 0.1}  # "gone" disconnected; "stopping" being stopped
        store.set_node_state("stopping", NodeState.STOPPING, reason="orch stop")
        assert monitor.check(store) == []  # within the grace period
        now[0] += 1.0
        service.agents = {"quiet": 2.5, "fine": 0.2}
        # "never" never connected and its provider cannot be asked: left alone, not lost.
        assert sorted(monitor.check(store)) == ["gone", "quiet"]
        states = {n.id: n.state for n in store.list_nodes()}
        assert states == {"quiet": NodeState.LOST, "gone": NodeState.LOST, "never": NodeState.READY,
                          "fine": NodeState.READY, "stopping": NodeState.STOPPING}
        down = {e.node: e for e in store.events(kind="node.down")}
        assert set(down) == {"quiet", "gone"}
        assert "silent for 2.5 s" in down["quiet"].reason and "(disconnected)" in down["gone"].reason
        assert all(e.data["connected"] and "provider check failed" in e.reason for e in down.values())
        assert not store.events(kind="node.replaced")  # no such family: nothing to replace
        now[0] += 10
        assert monitor.check(store) == []  # each node is lost once; "never" is still left alone
        assert len(store.events(kind="node.down")) == 2

    # Nothing raised in a round ends the thread.
    service.broken = True
    monitor = HealthMonitor(ws, service, grace=2.0, interval=0.05)  # type: ignore[arg-type]
    monitor.start()
    try:
        time.sleep(0.3)
        assert monitor._thread is not None and monitor._thread.is_alive()
    finally:
        monitor.stop()
    assert monitor._thread is None
