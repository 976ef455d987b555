"""Remote command execution across the fleet (``orch exec``, ``POST /nodes/exec``):
which nodes a command is for (``matching``), its fan-out over SSH (``exec_on``), and the
choice per node between a connected agent and SSH (``exec_nodes``).

The agents' connections are held above this layer (the server's ``SchedulerService``);
``exec_nodes`` reaches them only through ``AgentChannel``, so ``remote`` imports neither
the scheduler nor the server.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from orchestrator.errors import RemoteError
from orchestrator.remote.pool import FanOutResult, SSHPool
from orchestrator.remote.ssh import Result, SSHTarget
from orchestrator.state import NodeRecord
from orchestrator.workspace import Workspace


@dataclass(frozen=True)
class ExecOutcome:
    """Per node: its Result (any exit code) or the error that kept it from running."""

    nodes: dict[str, Result | RemoteError]

    @property
    def succeeded(self) -> dict[str, Result]:
        return {k: v for k, v in self.nodes.items() if isinstance(v, Result) and v.ok}

    @property
    def failed(self) -> dict[str, Result | RemoteError]:
        return {k: v for k, v in self.nodes.items() if k not in self.succeeded}


def ssh_target(ws: Workspace, node: NodeRecord) -> SSHTarget:
    if not (node.address and node.ssh_user and node.host_key):
        raise RemoteError(f"node {node.id} has no address or pinned host key", hint="wait for it to boot")
    return SSHTarget(name=node.id, host=node.address, port=node.port or 22, user=node.ssh_user,
                     host_key=node.host_key, key_file=ws.ssh_key)


def exec_on(ws: Workspace, nodes: Sequence[NodeRecord], command: str, *, timeout: float | None = None,
            max_parallel: int = 64, pool: SSHPool | None = None) -> ExecOutcome:
    """Run ``command`` on every node in parallel over SSH (host keys pinned)."""
    own = pool is None
    pool = pool or SSHPool()
    try:
        results: dict[str, Result | RemoteError] = {}
        targets = []
        for node in nodes:
            try:
                targets.append(ssh_target(ws, node))
            except RemoteError as exc:
                results[node.id] = exc
        fan: FanOutResult = pool.run_many(targets, command, timeout=timeout, max_parallel=max_parallel)
        results.update(fan)
        return ExecOutcome({n.id: results[n.id] for n in nodes})
    finally:
        if own:
            pool.close_all()


class AgentChannel(Protocol):
    """Commands through the nodes' agents (what ``SchedulerService`` offers)."""

    def connected(self) -> Collection[str]:
        """The ids of the nodes whose agent is connected now (only membership is asked:
        ``SchedulerService`` answers node id -> seconds since last heard)."""
        ...

    def exec(self, nodes: Sequence[NodeRecord], command: str, *, timeout: float | None = None
             ) -> Mapping[str, dict[str, Any]]:
        """``command`` through the agents of ``nodes``, in parallel: node id -> ``{exit,
        stdout, stderr}`` or ``{error}``; a node whose agent is gone is left out."""
        ...


def exec_nodes(ws: Workspace, agents: AgentChannel | None, nodes: Sequence[NodeRecord], command: str, *,
               timeout: float | None = None) -> dict[str, dict[str, Any]]:
    """``command`` on ``nodes``: through ``agents`` where one is connected, over SSH for the
    rest (in parallel); node id -> ``{exit, stdout, stderr}`` or ``{error}`` (the shape of
    ``orch exec --json``), in the order of ``nodes``."""
    answers: dict[str, dict[str, Any]] = {}
    rest = list(nodes)
    if agents is not None:
        connected = agents.connected()
        through = [n for n in nodes if n.id in connected]
        rest = [n for n in nodes if n.id not in connected]
        if through:
            answers.update(agents.exec(through, command, timeout=timeout))
            rest += [n for n in through if n.id not in answers]  # gone meanwhile: SSH
    if rest:
        outcome = exec_on(ws, rest, command, timeout=timeout)
        answers.update({name: ({"exit": r.exited, "stdout": r.stdout, "stderr": r.stderr}
                               if isinstance(r, Result) else {"error": str(r)})
                        for name, r in outcome.nodes.items()})
    return {n.id: answers[n.id] for n in nodes}
