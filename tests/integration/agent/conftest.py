"""Fixtures for the node agent's tests: the agent as it runs on a node, a real process
(Debian's python3 when there is one, from a copy of orchestrator/agent/ named
``orch_agent``, as bootstrap installs it), real ports (worker_native/build/orch-port with
the fault library), real mutual TLS, against a real protocol peer
(tests/helpers/agent_peer.py).  The helpers are in tests/helpers/agent.py.

Every process a test starts carries a marker in its environment; teardown kills
whatever still carries it and the tests that care check that nothing did.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.deploy import pki
from orchestrator.workspace import Workspace
from tests.helpers.agent import Home, MakeHome, end_home, new_home
from tests.helpers.agent_peer import AgentPeer
from tests.helpers.native import build_native


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    """orch-port and libfaults.so, built in place."""
    build_native()


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    """A fresh workspace (its CA signs the agents' and the peer's certificates)."""
    return Workspace.init(tmp_path / "ws")


@pytest.fixture
def make_home(tmp_path: Path) -> Iterator[MakeHome]:
    """``make_home(ws, scheduler, **options)``: a new agent's home (see
    ``tests.helpers.agent.new_home``); teardown kills every process of every home made."""
    homes: list[Home] = []

    def make(ws: Workspace, scheduler: str, **options: Any) -> Home:
        home = new_home(tmp_path / f"home-{len(homes)}", ws, scheduler, **options)
        homes.append(home)
        return home

    try:
        yield make
    finally:
        for home in homes:
            end_home(home)


@pytest.fixture
def peer(ws: Workspace) -> Iterator[AgentPeer]:
    """A scheduler stand-in for ``ws`` (heartbeat 0.5 s)."""
    with AgentPeer(pki.server_ssl_context(ws), heartbeat=0.5) as running:
        yield running
