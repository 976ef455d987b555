"""The agent on real nodes (orchestrator/deploy/agent_install.py): bootstrap starts it, it
dials in and runs real work, ``ensure_agents`` brings a stopped one back, ``orch stop``
ends it; and where agents dial."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from orchestrator import fleet
from orchestrator.agent.platforms import host_platform
from orchestrator.agent.protocol import LOADED
from orchestrator.config import load_family, load_provider
from orchestrator.deploy import agent_install, native, pki
from orchestrator.deploy import releases as release_catalog
from orchestrator.deploy.bootstrap import BootstrapPlan, NodeLog, bootstrap_node
from orchestrator.deploy.builds import ReleaseBuilds
from orchestrator.errors import ConfigError
from orchestrator.provision.registry import make_driver
from orchestrator.remote.fanout import ssh_target
from orchestrator.remote.pool import SSHPool
from orchestrator.state import NodeRecord, NodeState, Store
from orchestrator.workspace import Workspace
from tests.helpers.agent import load, tasks
from tests.helpers.agent_peer import AgentPeer
from tests.helpers.net import free_port
from tests.helpers.processes import alive, processes_of
from tests.helpers.workspace import REPO


@pytest.mark.sshd
def test_bootstrap_starts_the_agent_and_stop_ends_it(tmp_path: Path) -> None:
    ws = Workspace.init(tmp_path / "ws")
    shutil.copytree(REPO / "releases" / "primes", ws.releases_src_dir / "primes",
                    ignore=shutil.ignore_patterns("build", "*.o", "*.so"))
    port = free_port()
    ws.settings_file.write_text(f"scheduler_port: {port}\n")
    (ws.providers_dir / "local.yaml").write_text("driver: local\nlabels: [private]\nmax_nodes: 8\n")
    (ws.families_dir / "workers.yaml").write_text(
        "release: primes\ncount: 2\nworkers_per_node: 3\nplacement:\n  providers: [local]\n")
    store = Store.open(ws.state_db)
    dirs: dict[str, str] = {}
    try:
        report = fleet.spawn(ws, store, "workers")
        assert report.ok, [str(f) for f in report.failures]
        nodes = fleet.select_nodes(store, all_nodes=True)
        assert {agent_install.scheduler_endpoint(ws, n) for n in nodes} == {("127.0.0.1", port)}
        driver = make_driver(ws, load_provider(ws, "local"))
        dirs = {str(n.id): n.extra["node_dir"] for n in driver.list_nodes()}
        assert len(dirs) == 2
        for provider_id, node_dir in dirs.items():
            cmdlines = [Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
                        for p in processes_of(provider_id, node_dir) if alive(p)]
            assert any(b"orch_agent" in c and (b"ensure" in c or b"supervise" in c) for c in cmdlines), provider_id
        with AgentPeer(pki.server_ssl_context(ws), heartbeat=0.5, port=port) as scheduler:
            sessions = [scheduler.wait_session(i, timeout=10) for i in range(2)]
            assert {s.node for s in sessions} == {n.id for n in nodes}
            assert all(s.hello["slots"] == 3 and s.hello["releases"][0]["release"].startswith("primes-")
                       for s in sessions)
            assert agent_install.ensure_agents(ws, store, nodes, None) == {n.id: "running" for n in nodes}
            # the release bootstrap built, through the port runner the agent built: real work
            first = sessions[0]
            (installed,) = first.hello["releases"]
            assert load(first, "job", "count_primes", [0, 1, 2], release=installed["release"],
                        sha=installed["sha256"], library="build/libprimes.so").kind == LOADED
            first.tasks(2, tasks((0, b"0 100"), (1, b"100 1000")))
            assert [r.payload.strip() for r in first.wait_results(2, 2)] == [b"25", b"143"]
            home_dir = Path(dirs[next(n.provider_node_id or n.id for n in nodes if n.id == first.node)]) / "home"
            shipped = home_dir / "orch" / "agent" / "orch-port"  # built once for the platform, not on the node
            assert shipped.read_bytes() == native.port_runner(ws, host_platform())
            assert not (home_dir / "orch" / "bin").exists() and not (home_dir / "orch" / "include").exists()
            with SSHPool() as pool:  # stop one node's agent; ensure_agents brings it back
                stopped_node = next(n for n in nodes if n.id == sessions[1].node)
                assert agent_install.stop_agent(pool, stopped_node, ws=ws).startswith("stopped (pid ")
                assert sessions[1].closed.wait(10)
                assert agent_install.ensure_agents(ws, store, [stopped_node], pool) == {stopped_node.id: "started"}
                sessions[1] = scheduler.wait_session(2, timeout=10)
                assert sessions[1].node == stopped_node.id
            # bootstrapping a node again keeps its agent as it is (same code, same config)
            release = store.get_release("primes")
            node = store.get_node(sessions[0].node)
            plan = BootstrapPlan(node=node, target=ssh_target(ws, node), family=load_family(ws, "workers"),
                                 release=release, manifest=release_catalog.manifest_of(release),
                                 tarball=release_catalog.read_release(ws, release),
                                 builds=ReleaseBuilds(ws, store, release))
            with SSHPool() as pool:
                log = NodeLog(tmp_path / "again.log")
                bootstrap_node(plan, pool, log, lambda node, stage: None)
            assert "uploaded the agent" not in log.path.read_text()
            assert not any(s.closed.is_set() for s in sessions)
            fleet.stop(ws, store, nodes)
            assert all(s.closed.wait(10) for s in sessions)
        for node_id, node_dir in dirs.items():
            assert processes_of(node_id, node_dir) == []
    finally:
        live = fleet.select_nodes(store, all_nodes=True)
        if live:
            fleet.stop(ws, store, live)
        store.close()


def test_where_agents_dial(tmp_path: Path) -> None:
    ws = Workspace.init(tmp_path / "ws")
    with Store.open(ws.state_db) as store:
        for name, driver in (("laptop", "local"), ("lab", "netns"), ("metal", "hosts")):
            store.upsert_provider(name, driver, {})
        wid = store.workspace_id

    def node(provider: str, **extra: object) -> NodeRecord:
        return NodeRecord(id=f"{provider}-1", family="w", provider=provider, state=NodeState.READY, extra=dict(extra))

    port = agent_install.default_scheduler_port(wid)
    assert 20000 <= port <= 29999 and port == agent_install.default_scheduler_port(wid)
    # the records as the drivers make them: local and netns nodes know their way to this
    # machine (the driver's gateway), a machine of a pool does not
    laptop, lab = node("laptop", gateway="127.0.0.1"), node("lab", subnet="10.213.7.0/24", gateway="10.213.7.1")
    assert agent_install.scheduler_endpoint(ws, laptop) == ("127.0.0.1", port)
    assert agent_install.scheduler_endpoint(ws, lab) == ("10.213.7.1", port)
    with pytest.raises(ConfigError, match="scheduler_address"):
        agent_install.scheduler_endpoint(ws, node("metal"))
    ws.settings_file.write_text("scheduler_address: 192.0.2.10\nscheduler_port: 24000\n")
    assert agent_install.scheduler_endpoint(ws, node("metal")) == ("192.0.2.10", 24000)
    assert agent_install.scheduler_endpoint(ws, laptop) == ("127.0.0.1", 24000)
