"""A module's workspace and its local nodes, seen from outside: the store, the jobs
API, /proc and the nodes' own files (the integration tests of jobs and upgrades)."""

from __future__ import annotations

from pathlib import Path

from orchestrator.scheduler import jobs
from orchestrator.state import NodeRecord, NodeState, Store
from orchestrator.workspace import Workspace

LIVE = [s for s in NodeState if s.live]


class Cluster:
    """``family``: the family whose nodes these are, and which jobs go to (None: any)."""

    def __init__(self, ws: Workspace, family: str | None = None) -> None:
        self.ws, self.family = ws, family

    def store(self) -> Store:
        return Store.open(self.ws.state_db)

    def nodes(self, states: list[NodeState] | None = None) -> list[NodeRecord]:
        """The family's nodes in ``states`` (default: ready)."""
        with self.store() as store:
            return store.list_nodes(family=self.family, states=states or [NodeState.READY])

    def submit(self, work: str, input: str, **options: object) -> str:
        if self.family is not None:
            options.setdefault("family", self.family)
        with self.store() as store:
            return jobs.submit(self.ws, store, work, input=input, **options).id  # type: ignore[arg-type]

    def run(self, job: str) -> jobs.Outcome:
        with self.store() as store:
            return jobs.run(self.ws, store, job)

    def status(self, job: str) -> dict[str, object]:
        with self.store() as store:
            return jobs.status(store, job)

    def output(self, job: str) -> bytes:
        """The job's output, every ok record's payload in seq order."""
        with self.store() as store:
            return b"".join(r.payload for r in jobs.result(self.ws, store, job) if r.ok)

    def total(self, job: str) -> int:
        """The sum of a count_primes job's output lines."""
        return sum(int(line) for line in self.output(job).split())


def home(node: NodeRecord) -> Path:
    """The local node's home folder (its ``~``) on this machine."""
    return Path(node.extra["node_dir"]) / "home"


def agents_of(node: NodeRecord) -> tuple[int, list[int]]:
    """(supervisor pid, its live children): the pid in the node's agent.pid, and the
    agent process(es) it runs, found in /proc."""
    supervisor = int((home(node) / "orch" / "agent" / "agent.pid").read_text().split()[0])
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == supervisor and fields[0] not in "ZX":
            children.append(int(stat.parent.name))
    return supervisor, children
