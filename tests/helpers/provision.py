"""Nodes made the way ``orch spawn`` makes them (intent in the store first, then the
provider), for tests that drive the provision room directly."""

from __future__ import annotations

import json
from pathlib import Path

from orchestrator.config import load_provider
from orchestrator.provision.handle import ProviderHandle
from orchestrator.provision.nodes import create_node
from orchestrator.provision.placement import NodeRequest
from orchestrator.provision.registry import sync_registrations
from orchestrator.state import NodeRecord, Store
from orchestrator.workspace import Workspace


def workspace_with_provider(folder: Path, provider: dict[str, object], *, name: str = "p") -> tuple[Workspace, Store]:
    """A new workspace in ``folder`` whose provider ``name`` is ``provider`` (as YAML's
    JSON subset), registered in its store (the caller closes the store)."""
    ws = Workspace.init(folder)
    write_provider(ws, provider, name=name)
    store = Store.open(ws.state_db)
    sync_registrations(store, {name: load_provider(ws, name)})
    return ws, store


def write_provider(ws: Workspace, provider: dict[str, object], *, name: str = "p") -> None:
    (ws.providers_dir / f"{name}.yaml").write_text(json.dumps(provider) + "\n")


def cheapest_request(handle: ProviderHandle, store: Store) -> NodeRequest:
    """The provider's cheapest size in its first location, on its image."""
    caps = handle.capabilities(store)
    size = min(caps.sizes, key=lambda s: (s.hourly_price, s.cpus, s.ram_mb, s.id))
    return NodeRequest(provider=handle.name, location=caps.locations[0], size=size.id, image=caps.image,
                       hourly_price=size.hourly_price, cpus=size.cpus, ram_mb=size.ram_mb)


def create_as_spawn(handle: ProviderHandle, store: Store, node_id: str, *, family: str = "w") -> NodeRecord:
    """One node as ``orch spawn`` creates it: a ``requested`` record, then the provider;
    returns the record ``booting``."""
    request = cheapest_request(handle, store)
    record = store.add_node(node_id, family=family, provider=handle.name, location=request.location,
                            size=request.size, image=request.image)
    return create_node(handle, store, record, request)


if __name__ == "__main__":  # a child `orch` that creates one node when told to, to be killed half way
    import sys

    ws = Workspace(Path(sys.argv[1]))
    with Store.open(ws.state_db) as opened:
        child_handle = ProviderHandle(ws, load_provider(ws, "p"))
        child_handle.capabilities(opened)
        print("ready", flush=True)
        sys.stdin.readline()
        create_as_spawn(child_handle, opened, sys.argv[2])
        print("created", flush=True)
