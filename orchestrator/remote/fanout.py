"""Remote command execution across the fleet (``orch exec``): fan-out and its results."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from orchestrator.errors import RemoteError
from orchestrator.remote.ssh import FanOutResult, Result, SSHPool, SSHTarget
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
