"""Workspaces for tests and benches: the repository's paths, the sample ``primes``
release copied in, a local ``workers`` family, and stopping every node at the end."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from orchestrator import fleet
from orchestrator.config import load_provider
from orchestrator.deploy.releases import upload_release
from orchestrator.provision.registry import make_driver
from orchestrator.state import NodeRecord, NodeState, Store
from orchestrator.workspace import Workspace

REPO = Path(__file__).resolve().parents[2]
PRIMES = REPO / "releases" / "primes"
"""The sample release's source."""
TESTLIB = REPO / "worker_native" / "testlib"
"""The test work library as a release (``faults``: echo, noop, crashes, hangs ...)."""


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "absent"


def add_primes_source(ws: Workspace) -> Path:
    """Copy the sample release's source (without build output) into ``releases/primes``."""
    target = ws.releases_src_dir / "primes"
    shutil.copytree(PRIMES, target, ignore=shutil.ignore_patterns("build", "*.o", "*.so"))
    return target


def family_yaml(count: int, *, workers_per_node: int | None = 1, providers: str = "local") -> str:
    """A ``primes`` family of ``count`` nodes placed on ``providers``."""
    ports = f"workers_per_node: {workers_per_node}\n" if workers_per_node is not None else ""
    return f"release: primes\ncount: {count}\n{ports}placement:\n  providers: [{providers}]\n"


def primes_workspace(root: Path, *, count: int = 1, max_nodes: int = 8, family_extra: str = "",
                     upload: bool = True, family: str = "workers", workers_per_node: int | None = 1) -> Workspace:
    """A workspace at ``root``: ``releases/primes`` (uploaded unless ``upload`` is
    false), the ``local`` provider, and the family ``family`` (``workers``) of ``count``
    nodes with ``workers_per_node`` ports each (None: the default) (``family_extra`` is
    appended to its YAML)."""
    ws = Workspace.init(root)
    add_primes_source(ws)
    (ws.providers_dir / "local.yaml").write_text(f"driver: local\nmax_nodes: {max_nodes}\n")
    (ws.families_dir / f"{family}.yaml").write_text(
        family_yaml(count, workers_per_node=workers_per_node) + family_extra)
    if upload:
        with Store.open(ws.state_db) as store:
            upload_release(ws, store, ws.releases_src_dir / "primes")
    return ws


def sample_workspace(root: Path) -> Workspace:
    """A workspace at ``root`` as the repository's own: ``releases/primes``,
    ``providers/local.yaml`` and ``node_families/workers.yaml`` copied in."""
    ws = Workspace.init(root)
    add_primes_source(ws)
    shutil.copy(REPO / "providers" / "local.yaml", ws.providers_dir / "local.yaml")
    shutil.copy(REPO / "node_families" / "workers.yaml", ws.families_dir / "workers.yaml")
    return ws


def stop_everything(ws: Workspace) -> None:
    """Stop every node the store knows; then destroy whatever each provider still lists
    (belt and braces: whatever the store missed) and check that none is left."""
    if ws.state_db.exists():
        with Store.open(ws.state_db) as store:
            live = fleet.select_nodes(store, all_nodes=True)
            if live:
                fleet.stop(ws, store, live)
    for path in ws.providers_dir.glob("*.yaml"):
        driver = make_driver(ws, load_provider(ws, path.stem))
        for node in driver.list_nodes():
            driver.destroy_node(node)
        assert driver.list_nodes() == []


def destroy_local_nodes(ws: Workspace) -> None:
    """Destroy whatever nodes the workspace's ``local`` providers still list; check none is left."""
    for path in ws.providers_dir.glob("*.yaml"):
        config = load_provider(ws, path.stem)
        if config.driver == "local":
            driver = make_driver(ws, config)
            for node in driver.list_nodes():
                driver.destroy_node(node)
            assert driver.list_nodes() == []


def workspace_id(ws: Workspace) -> str:
    with Store.open(ws.state_db) as store:
        return store.workspace_id


def records(ws: Workspace, *states: NodeState) -> list[NodeRecord]:
    """The store's node records (those in ``states``, if given)."""
    with Store.open(ws.state_db) as store:
        return store.list_nodes(states=states or None)


def fleet_key(ws: Workspace) -> str:
    """The workspace's fleet public key, as one ``authorized_keys`` line."""
    return ws.ssh_key.with_suffix(".pub").read_text().strip()
