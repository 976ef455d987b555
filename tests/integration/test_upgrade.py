"""Upgrades in place on real local nodes: `orch release deploy` and `orch release rollback`.

One workspace with four local nodes serves the module: the sample release is copied in
and uploaded as 1.1.0, then the copy's release.yaml says 1.2.0 (and another description)
and it is uploaded again.  The family ``workers`` starts pinned to primes@1.1.0 and rolls
two nodes at a time.  While a long job runs on one release, the family moves to the
other: the job must finish on the release it was submitted with, with the exact result
and no task failed, retried or lost to the roll; the nodes must be the same nodes, their
agents the same processes (not restarted), with ``current`` on the new release and the
old one's folder still there; and a job submitted afterwards must run on the new one
(its release, and each agent's LOAD of the new folder in its log).  Bad input changes
nothing.  Every node is stopped at the end, whatever happened.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from orchestrator import fleet
from orchestrator.deploy.releases import upload_release
from orchestrator.scheduler import jobs
from orchestrator.state import NodeRecord, NodeState, Store
from orchestrator.workspace import Workspace
from tests.helpers.cli import ORCH, orch
from tests.helpers.cluster import LIVE, agents_of, home
from tests.helpers.cluster import Cluster as BaseCluster
from tests.helpers.primes import primes_below
from tests.helpers.processes import alive
from tests.helpers.workspace import add_primes_source, file_digest, stop_everything

pytestmark = [pytest.mark.sshd, pytest.mark.slow]

NODES = 4
LONG = 50_000_000
"""count_primes over 0:LONG runs long enough for a whole roll (here ~10 s against 2-3 s)."""
SHORT = 2_000_000

FAMILY = """\
# Workers for the upgrade tests: one port each, rolled two at a time.
release: primes@1.1.0   # deploy and rollback rewrite this value, nothing else
count: 4
workers_per_node: 1
placement:
  providers: [local]    # this machine
bootstrap:
  strategy: rolling
  batch_size: 2
"""
SPARE = "release: primes\ncount: 1\nplacement:\n  providers: [local]\n"
"""A family that is never spawned: it has no release history."""


class Cluster(BaseCluster):
    """The module's workspace and the family ``workers``, seen from outside (the store,
    /proc, the nodes' files)."""

    def __init__(self, ws: Workspace) -> None:
        super().__init__(ws, family="workers")

    def nodes(self, states: list[NodeState] | None = None) -> list[NodeRecord]:
        return super().nodes(states or LIVE)

    def history(self) -> list[tuple[str, str]]:
        with self.store() as store:
            return [(e.release, e.cause) for e in fleet.history(store, "workers")]

    def events(self, kind: str, after: float) -> list[tuple[float, str]]:
        with self.store() as store:
            return [(e.at, e.node or "") for e in store.events(kind=kind, limit=100_000) if e.at >= after]


def current(node: NodeRecord) -> str:
    return os.readlink(home(node) / "orch" / "current")


def agent_processes(node: NodeRecord) -> tuple[int, int]:
    """(supervisor pid, agent pid): the pid in agent.pid and its one live child."""
    supervisor, children = agents_of(node)
    assert len(children) == 1, f"supervisor {supervisor} of {node.id} has children {children}"
    return supervisor, children[0]


def agent_log(node: NodeRecord) -> str:
    return (home(node) / "orch" / "agent" / "agent.log").read_text(errors="replace")


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def most_at_once(starts: list[tuple[float, str]], ends: list[tuple[float, str]], nodes: set[str]) -> int:
    """The most of ``nodes`` that were between a start and the next end at one moment."""
    moments = sorted([(at, 1) for at, node in starts if node in nodes] + [(at, -1) for at, node in ends
                                                                          if node in nodes])
    most = level = 0
    for _at, step in moments:
        level += step
        most = max(most, level)
    return most


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    ws = Workspace.init(tmp_path_factory.mktemp("upgrade") / "ws")
    try:
        source = add_primes_source(ws)
        (ws.providers_dir / "local.yaml").write_text("driver: local\nmax_nodes: 8\n")
        (ws.families_dir / "workers.yaml").write_text(FAMILY)
        (ws.families_dir / "spare.yaml").write_text(SPARE)
        manifest = source / "release.yaml"
        with Store.open(ws.state_db) as store:
            assert upload_release(ws, store, source).record.ref == "primes@1.1.0"
            text = manifest.read_text()
            assert "version: 1.1.0" in text
            manifest.write_text(text.replace("version: 1.1.0", "version: 1.2.0")
                                .replace("description: ", "description: (1.2.0) "))
            assert upload_release(ws, store, source).record.ref == "primes@1.2.0"
            report = fleet.spawn(ws, store, "workers")
            assert report.ok and len(report.ready) == NODES, report
        yield Cluster(ws)
    finally:
        stop_everything(ws)


def roll_under_a_job(cluster: Cluster, command: list[str], old: str, new: str) -> None:
    """Run a long job on ``old``; while it runs, ``orch COMMAND`` moves the family to
    ``new``.  Checks the job, the roll, the nodes, the agents and a job afterwards."""
    ws = cluster.ws
    old_folder, new_folder = (f"primes-{ref.split('@')[1]}" for ref in (old, new))
    before = cluster.nodes()
    assert {(n.state, n.release) for n in before} == {(NodeState.READY, old)} and len(before) == NODES
    assert {current(n) for n in before} == {f"releases/{old_folder}"}
    agents = {n.id: agent_processes(n) for n in before}
    family_file = ws.families_dir / "workers.yaml"
    family_text = family_file.read_text()

    job = cluster.submit("primes:count_primes", f"0:{LONG}", target_task_seconds=0.05,
                         module_options={"max_span": 50_000}, agent_wait_seconds=15)
    assert cluster.status(job)["release"] == old, "a bare name is the version the family's nodes run"
    runner = subprocess.Popen([*ORCH, "job", "resume", job, "--json"], cwd=ws.root, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        def running_everywhere() -> bool:
            info = cluster.status(job)
            nodes = info["nodes"]
            assert runner.poll() is None, f"the job ended early: {runner.communicate()}"
            return info["state"] == "running" and isinstance(nodes, dict) and len(nodes) == NODES and \
                set(nodes.values()) == {"running"} and int(info["written"]) > 0  # type: ignore[call-overload]

        wait_until(running_everywhere, 120, f"job {job} to run on all {NODES} nodes")
        rolled_from = time.time()
        moved = orch(ws, *command)
        rolled_to = time.time()
        during = cluster.status(job)
        assert moved.returncode == 0, moved.stdout + moved.stderr
        assert runner.poll() is None and during["state"] == "running", \
            f"the job must still run when the roll is over ({during['written']} tasks written)"
        out, err = runner.communicate(timeout=280)
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()

    # The roll: the family's file changed in its release value only, and the command said
    # so, with each node's stages as `orch spawn` prints them.
    assert family_file.read_text() == family_text.replace(f"release: {old}", f"release: {new}", 1)
    assert f"node_families/workers.yaml: release {old} -> {new}" in moved.stdout
    assert f"workers: {NODES}/{NODES} ready; created 0, rolled {NODES}, removed 0, failed attempts 0" in moved.stdout
    for node in before:
        assert f"  {node.id}  ready" in moved.stdout, moved.stdout

    # The job: done on the old release, the exact result, nothing failed, retried or lost.
    outcome = json.loads(out)
    assert runner.returncode == 0 and outcome["state"] == "done", (out, err)
    counters = outcome["counters"]
    assert (counters["failed"], counters["retried"], counters["port_deaths"], counters["nodes_lost"]) == (0, 0, 0, 0), \
        counters
    assert cluster.status(job)["release"] == old
    assert cluster.total(job) == primes_below(LONG)

    # Rolled in place, by the family's strategy (two at a time), while the job ran.
    after = cluster.nodes()
    assert sorted(n.id for n in after) == sorted(n.id for n in before), "the same nodes, none replaced"
    assert {(n.state, n.release) for n in after} == {(NodeState.READY, new)}
    ids = {n.id for n in before}
    starts = [e for e in cluster.events("node.bootstrapping", rolled_from) if e[0] <= rolled_to]
    ends = [e for e in cluster.events("node.ready", rolled_from) if e[0] <= rolled_to]
    assert {node for _, node in starts} == ids and {node for _, node in ends} == ids
    assert most_at_once(starts, ends, ids) == 2, (starts, ends)
    for node in after:
        assert current(node) == f"releases/{new_folder}"
        assert (home(node) / "orch" / "releases" / old_folder / ".orch-sha256").is_file(), "the old release stays"
        assert agent_processes(node) == agents[node.id], f"the agent of {node.id} was restarted"
        assert f"loaded {job}: {old_folder} count_primes" in agent_log(node)
    assert cluster.history()[-1] == (new, command[1])

    # A job submitted now runs on the new release: its agents LOAD the new folder.
    second = cluster.submit("primes:count_primes", f"0:{SHORT}")
    assert cluster.status(second)["release"] == new
    with cluster.store() as store:
        ran = jobs.run(ws, store, second)
    assert ran.state.value == "done" and ran.counters["failed"] == 0, ran
    assert cluster.total(second) == primes_below(SHORT)
    for node in after:
        assert f"loaded {second}: {new_folder} count_primes" in agent_log(node)
        assert agent_processes(node) == agents[node.id]
        assert alive(agents[node.id][1])


def test_deploy_upgrades_running_nodes_in_place_and_jobs_keep_their_release(cluster: Cluster) -> None:
    assert cluster.history() == [("primes@1.1.0", "spawn")]
    roll_under_a_job(cluster, ["release", "deploy", "workers", "1.2.0"], "primes@1.1.0", "primes@1.2.0")
    assert cluster.history() == [("primes@1.1.0", "spawn"), ("primes@1.2.0", "deploy")]


def test_rollback_returns_the_same_nodes_to_the_release_they_ran_before(cluster: Cluster) -> None:
    if cluster.history()[-1][0] != "primes@1.2.0":  # run alone: deploy first
        assert orch(cluster.ws, "release", "deploy", "workers", "1.2.0", "-q").returncode == 0
    shown = json.loads(orch(cluster.ws, "release", "history", "workers", "--json").stdout)
    assert shown["rollback_to"] == "primes@1.1.0"
    roll_under_a_job(cluster, ["release", "rollback", "workers"], "primes@1.2.0", "primes@1.1.0")
    assert cluster.history()[-2:] == [("primes@1.2.0", "deploy"), ("primes@1.1.0", "rollback")]
    # A rollback after a rollback goes forward again (as `cd -` does).
    shown = json.loads(orch(cluster.ws, "release", "history", "workers", "--json").stdout)
    assert shown["rollback_to"] == "primes@1.2.0"


@pytest.mark.parametrize(("args", "expect"), [
    (["deploy", "workers", "9.9.9"],
     r"release primes has no version '9\.9\.9' \(known: 1\.1\.0, 1\.2\.0\) \(see `orch release list`\)"),
    (["deploy", "workers", "other@1.2.0"], r"family workers runs release primes, not other"),
    (["deploy", "nope", "1.2.0"], r"no node family 'nope' \(see `orch family list`\)"),
    (["deploy", "../workers", "1.2.0"], r"no node family '\.\./workers'"),
    (["rollback", "spare"], r"family spare has no release history: nothing to roll back to"),
    (["rollback", "nope"], r"no node family 'nope'"),
])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(cluster: Cluster, args: list[str], expect: str) -> None:
    ws = cluster.ws
    watched = [ws.state_db, *sorted(ws.families_dir.iterdir())]
    digests = {path: file_digest(path) for path in watched}
    nodes = [(n.id, n.state, n.release, n.config_hash) for n in cluster.nodes()]
    result = orch(ws, "release", *args)
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert re.search(expect, lines[0]), lines[0]
    assert result.stdout == ""
    assert {path: file_digest(path) for path in watched} == digests
    assert sorted(ws.families_dir.iterdir()) == watched[1:], "no file left beside the families"
    assert [(n.id, n.state, n.release, n.config_hash) for n in cluster.nodes()] == nodes


def test_a_failed_deploy_leaves_the_nodes_serving_their_release_and_rollback_restores_the_file(
        cluster: Cluster) -> None:
    """A roll that fails before a node switches releases (here the new release's setup)
    neither destroys the node nor moves it: it stays ready on what it ran, the rolling
    strategy stops at the failed batch, and the family's history is unchanged."""
    ws = cluster.ws
    before = cluster.nodes()
    old = before[0].release
    assert old is not None and {(n.state, n.release) for n in before} == {(NodeState.READY, old)}
    agents = {n.id: agent_processes(n) for n in before}
    history = cluster.history()
    source = ws.releases_src_dir / "primes"
    manifest = (source / "release.yaml").read_text()
    version = manifest.split("version: ", 1)[1].split()[0]
    manifest = manifest.replace(f"version: {version}", "version: 1.3.0")
    (source / "release.yaml").write_text(manifest.replace("setup: []", "setup:\n  - \"false\"")
                                         if "setup: []" in manifest else manifest + "setup:\n  - \"false\"\n")
    assert orch(ws, "release", "upload", str(source)).returncode == 0

    failed = orch(ws, "release", "deploy", "workers", "1.3.0")
    assert failed.returncode == 1, failed
    assert f"node_families/workers.yaml: release {old} -> primes@1.3.0" in failed.stdout
    assert "could not be rolled and still run their old release" in failed.stderr
    assert "bootstrap step 'setup' failed" in failed.stderr
    after = cluster.nodes()
    assert sorted(n.id for n in after) == sorted(agents), "no node destroyed or added"
    assert {(n.state, n.release) for n in after} == {(NodeState.READY, old)}
    assert sum("roll to primes@1.3.0 failed at setup" in n.reason for n in after) == 2, "one batch of two tried"
    for node in after:
        assert current(node) == f"releases/primes-{old.split('@')[1]}"
        assert json.loads((home(node) / "orch" / "node.json").read_text())["release"] == old
        assert agent_processes(node) == agents[node.id]
    assert cluster.history() == history, "a roll that did not go through is not history"

    # The file names 1.3.0, the nodes run `old`: a rollback goes back to what they run.
    shown = json.loads(orch(ws, "release", "history", "workers", "--json").stdout)
    assert shown["rollback_to"] == old
    back = orch(ws, "release", "rollback", "workers")
    assert back.returncode == 0, back
    assert f"release primes@1.3.0 -> {old}" in back.stdout
    assert f"workers: {NODES}/{NODES} ready; created 0, rolled 0, removed 0" in back.stdout  # they run it already
    assert {(n.state, n.release) for n in cluster.nodes()} == {(NodeState.READY, old)}
    assert f"release: {old}   #" in (ws.families_dir / "workers.yaml").read_text()
