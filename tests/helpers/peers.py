"""The end of a cloud's protocol peer (``tests/peers``) in a test module's fixture."""

from __future__ import annotations

from pathlib import Path

from tests.helpers.processes import commands_with
from tests.peers.process import PeerProcess


def stop_peer(peer: PeerProcess, nodes: Path) -> None:
    """Stop the peer by its pid and check that it ended and took its backing nodes along:
    no node's folder left in ``nodes``, no process naming that folder (a node's sshd)."""
    peer.stop()
    assert peer.process.poll() is not None, "the peer survived its stop"
    left = [p.name for p in nodes.iterdir() if p.is_dir() and not p.name.startswith(".")] if nodes.exists() else []
    assert left == [], f"backing nodes outlived the peer: {left}"
    assert commands_with(str(nodes)) == [], "processes of the peer's nodes outlived it"
