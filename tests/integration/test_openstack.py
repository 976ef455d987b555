"""orch on OpenStack: libcloud's stock ``openstack`` driver (Keystone v3 password auth,
Nova v2.1, Glance v2) against our own peer (``tests/peers/openstack.py``) on 127.0.0.1,
whose servers are real sshd nodes on 127.0.0.N.

One peer for the module (started and stopped by its pid; on stop it stops every node);
every test has its own workspace, and leaves the peer with no server, no fault and no
node, whatever its outcome.  Registrations are made with the same ``orch provider add``
line docs/clouds/openstack.md gives; the password is a 0600 file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from libcloud.common.exceptions import BaseHTTPError, RateLimitReachedError
from libcloud.common.types import InvalidCredsError

from orchestrator.config import load_provider
from orchestrator.errors import (
    ProviderAuthError,
    ProviderCapacityError,
    ProviderError,
    ProviderQuotaError,
    ProviderTransientError,
)
from orchestrator.provision.cloud_errors import map_libcloud_errors
from orchestrator.provision.drivers.features import STOCK
from orchestrator.provision.handle import ProviderHandle, key_pair_name
from orchestrator.provision.nodes import destroy_node, destroy_orphan, find_node, tagged_nodes, wait_running
from orchestrator.provision.registry import make_driver
from orchestrator.provision.tags import TAG_NODE, node_tags
from orchestrator.state import NodeState, Store
from orchestrator.workspace import Workspace
from tests.helpers.cli import Run, run_primes_job
from tests.helpers.peers import stop_peer
from tests.helpers.provision import create_as_spawn
from tests.helpers.workspace import family_yaml, fleet_key, records, stop_everything, workspace_id
from tests.peers.openstack import PASSWORD, PROJECT, USER, OpenStackPeer, start_peer

pytestmark = [pytest.mark.slow]

PROVIDER = "os"


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenStackPeer]:
    started = start_peer(tmp_path_factory.mktemp("openstack-peer"))
    try:
        yield started
    finally:
        stop_peer(started, started.root / "nodes")


@pytest.fixture
def os_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("OS_USERNAME", USER)
    return {**os.environ, "OS_USERNAME": USER, "COLUMNS": "200"}


def add_lines(peer: OpenStackPeer, name: str = PROVIDER) -> list[str]:
    """``orch provider add`` as docs/clouds/openstack.md gives it (the auth URL this peer's)."""
    return ["provider", "add", name, "--driver", "openstack",
            "--option", f"ex_force_auth_url={peer.auth_url}",
            "--option", "ex_force_auth_version=3.x_password",
            "--option", f"ex_tenant_name={PROJECT}",
            "--option", "ex_domain_name=Default",
            "--option", "ex_force_service_region=RegionOne",
            "--credential", "key=env:OS_USERNAME",
            "--credential", "secret=file:secrets/openstack-password",
            "--label", "public", "--priority", "10"]


@pytest.fixture
def os_ws(ws: Workspace, peer: OpenStackPeer, os_env: dict[str, str], orch: Callable[..., Run]
          ) -> Iterator[Workspace]:
    """A workspace with provider ``os`` registered on the peer; afterwards every node
    stopped, the peer without servers or faults, its backing nodes gone."""
    secret = ws.root / "secrets" / "openstack-password"
    secret.parent.mkdir(exist_ok=True)
    secret.write_text(PASSWORD + "\n")
    secret.chmod(0o600)
    added = orch(*add_lines(peer), cwd=ws.root)
    assert added.code == 0, added.err
    ws.settings_file.write_text(ws.settings_file.read_text() + "scheduler_address: 127.0.0.1\n")
    try:
        yield ws
    finally:
        peer.clear_faults()
        secret.write_text(PASSWORD + "\n")  # (a test may have broken it)
        try:
            stop_everything(ws)
        finally:
            deadline = time.monotonic() + 15
            while (state := peer.state())["servers"] or state["backing"]:
                if time.monotonic() > deadline:
                    for server in state["servers"]:  # never leave one for the next test
                        _delete(peer, ws, server["id"])
                    raise AssertionError(f"the peer still holds {state['servers']} / {state['backing']}")
                time.sleep(0.2)


def _delete(peer: OpenStackPeer, ws: Workspace, server_id: str) -> None:
    driver = make_driver(ws, load_provider(ws, PROVIDER))
    for node in driver.list_nodes():
        if node.id == server_id:
            driver.destroy_node(node)


def family(count: int, providers: str = PROVIDER, extra: str = "") -> str:
    return family_yaml(count, providers=providers) + extra


def mine(peer: OpenStackPeer, ws: Workspace) -> list[dict[str, Any]]:
    wid = workspace_id(ws)
    return [s for s in peer.state()["servers"] if s["metadata"].get("orch-workspace") == wid]


# -- end to end ----------------------------------------------------------------------------


@pytest.mark.sshd
def test_openstack_end_to_end(os_ws: Workspace, peer: OpenStackPeer, orch: Callable[..., Run]) -> None:
    """Register, check, plan, spawn two servers that bootstrap over SSH at their real
    addresses pinned to orch's host keys, run the primes job exactly, stop."""
    ws = os_ws
    config = load_provider(ws, PROVIDER)
    assert config.credentials == {"key": "env:OS_USERNAME", "secret": "file:secrets/openstack-password"}
    check = orch("provider", "check", PROVIDER, "--json", cwd=ws.root)
    assert check.code == 0, check.err
    checked = json.loads(check.out)
    sizes = {s["id"]: s for s in checked["sizes"]}
    assert sorted(s["name"] for s in sizes.values()) == ["m1.large", "m1.medium", "m1.small", "m1.tiny"]
    assert (sizes["3"]["cpus"], sizes["3"]["ram_mb"]) == (2, 4096), "a flavor's vcpus and ram"
    assert checked["locations"] == ["default"], "the region: OpenStack's one location"

    (ws.families_dir / "workers.yaml").write_text(family(2, extra="demands:\n  cpus: 2\n"))
    peer.faults(late_address=True)  # as many clouds: no address while the server builds
    plan = orch("plan", "workers", "--json")
    assert plan.code == 0, plan.err
    planned = json.loads(plan.out)
    assert [(r["provider"], r["location"]) for r in planned["requests"]] == [(PROVIDER, "default")] * 2
    assert {sizes[r["size"]]["cpus"] for r in planned["requests"]} <= {2, 4}

    spawned = orch("spawn", "workers", "--json")
    assert spawned.code == 0, spawned.err
    report = json.loads(spawned.out)
    assert len(report["ready"]) == 2 and report["failures"] == [], report

    wid = workspace_id(ws)
    servers = {s["metadata"]["orch-node"]: s for s in mine(peer, ws)}
    assert sorted(servers) == sorted(report["ready"])
    key_name = key_pair_name(wid, fleet_key(ws))
    assert [p["name"] for p in peer.state()["key_pairs"]] == [key_name], "the fleet key, imported once"
    assert peer.state()["key_pairs"][0]["public_key"].split()[:2] == fleet_key(ws).split()[:2]
    handle = ProviderHandle(ws, load_provider(ws, PROVIDER))
    assert sorted(node_tags(n)[TAG_NODE] for n in tagged_nodes(handle, wid)) == sorted(report["ready"]), \
        "orch reads its tags back from the servers' metadata"
    nodes = {n["id"]: n for n in json.loads(orch("nodes", "--json").out)}
    for record in records(ws, NodeState.READY):
        server = servers[record.id]
        assert server["status"] == "ACTIVE" and server["key_name"] == key_name
        assert server["metadata"] == {"orch-workspace": wid, "orch-family": "workers", "orch-node": record.id}
        assert server["user_data"].startswith("#cloud-config"), "the user data reached Nova, decoded"
        assert record.provider_node_id == server["id"] and record.address == server["address"]
        assert record.address.startswith("127.0.0.") and record.ssh_user == "root"
        offered = subprocess.run(["ssh-keyscan", "-t", "ed25519", record.address], capture_output=True,
                                 text=True, timeout=30).stdout.split()
        assert record.host_key.split()[:2] == offered[1:3], "the node offers the host key orch pinned"
        assert nodes[record.id]["path"] == f"/{PROVIDER}/default/workers/{record.id}"

    run_primes_job(orch)

    # A server of this workspace that orch has no record of: an orphan, destroyed by reconcile.
    image = handle.driver.get_image(load_provider(ws, PROVIDER).image or handle.capabilities().image)
    size = next(s for s in handle.driver.list_sizes() if s.name == "m1.tiny")
    ghost = {"orch-workspace": wid, "orch-family": "workers", "orch-node": "workers-ghost"}
    handle.driver.create_node(name="ghost", size=size, image=image, ex_metadata=ghost)
    assert json.loads(orch("reconcile", "--json").out)["orphans"] == ["workers-ghost"]
    assert json.loads(orch("reconcile", "--apply", "--json").out)["orphans"] == ["workers-ghost"]
    assert sorted(s["metadata"]["orch-node"] for s in mine(peer, ws)) == sorted(report["ready"])

    stopped = orch("stop", "workers")
    assert stopped.code == 0, stopped.err
    assert mine(peer, ws) == [] and peer.state()["backing"] == [], "nothing left at the peer"
    assert {r.state for r in records(ws)} == {NodeState.STOPPED}
    assert "agrees" in orch("reconcile").out


# -- faults ------------------------------------------------------------------------------


def test_a_wrong_password_exits_3_naming_the_provider(os_ws: Workspace, peer: OpenStackPeer,
                                                      os_env: dict[str, str]) -> None:
    (os_ws.root / "secrets" / "openstack-password").write_text("not-the-password\n")
    (os_ws.families_dir / "workers.yaml").write_text(family(1))
    for args in (["provider", "check", PROVIDER], ["spawn", "workers"]):
        result = subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=os_ws.root, env=os_env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 3, (args, result.stderr)
        assert "provider 'os' rejected the credentials" in result.stderr
        assert "providers/os.yaml" in result.stderr
        assert "Traceback" not in result.stderr + result.stdout and "internal error" not in result.stderr
    assert peer.state()["servers"] == []


def test_expired_tokens_are_an_auth_error(os_ws: Workspace, peer: OpenStackPeer) -> None:
    handle = ProviderHandle(os_ws, load_provider(os_ws, PROVIDER))
    handle.driver.list_nodes()  # a token
    peer.faults(auth=True)  # every token revoked, the password refused
    with pytest.raises(ProviderAuthError, match="rejected the credentials"), \
            map_libcloud_errors(PROVIDER, handle.features.errors):
        handle.driver.list_nodes()


def test_no_valid_host_fails_over_to_the_next_provider(os_ws: Workspace, peer: OpenStackPeer,
                                                       orch: Callable[..., Run]) -> None:
    ws = os_ws
    (ws.providers_dir / "local.yaml").write_text("driver: local\npriority: 20\nmax_nodes: 2\nbootstrap: false\n")
    (ws.families_dir / "workers.yaml").write_text(family(1, f"{PROVIDER}, local", "demands:\n  cpus: 4\n"))
    peer.faults(capacity=5)  # Nova accepts each create, then its scheduler finds no host
    spawned = orch("spawn", "workers", "--json", cwd=ws.root)
    assert spawned.code == 0, spawned.err
    report = json.loads(spawned.out)
    assert len(report["ready"]) == 1
    assert any("No valid host was found" in f and "out of capacity" in f for f in report["failures"]), report
    assert [n["provider"] for n in json.loads(orch("nodes", "--json").out)] == ["local"]
    assert mine(peer, ws) == [], "the ERROR server was deleted"
    providers = {p["name"]: p for p in json.loads(orch("provider", "list", "--json").out)}
    assert list(providers[PROVIDER]["cooldowns"]) == ["default/4"], "that flavor in that region cools down"


@pytest.mark.parametrize("status", [403, 413])
def test_a_quota_error_cools_the_provider_down(os_ws: Workspace, peer: OpenStackPeer, orch: Callable[..., Run],
                                               status: int) -> None:
    ws = os_ws
    (ws.providers_dir / "local.yaml").write_text("driver: local\npriority: 20\nmax_nodes: 2\nbootstrap: false\n")
    (ws.families_dir / "workers.yaml").write_text(family(2, f"{PROVIDER}, local"))
    config = load_provider(ws, PROVIDER).model_dump(mode="json", exclude={"name"})
    (ws.providers_dir / f"{PROVIDER}.yaml").write_text(json.dumps({**config, "bootstrap": False}))
    peer.faults(quota_instances=1, quota_status=status)
    spawned = orch("spawn", "workers", "--json", cwd=ws.root)
    assert spawned.code == 0, spawned.err
    report = json.loads(spawned.out)
    assert len(report["ready"]) == 2
    assert any("quota is used up" in f and "Quota exceeded for instances" in f for f in report["failures"]), report
    assert sorted(n["provider"] for n in json.loads(orch("nodes", "--json").out)) == ["local", PROVIDER]
    assert len(mine(peer, ws)) == 1
    providers = {p["name"]: p for p in json.loads(orch("provider", "list", "--json").out)}
    assert list(providers[PROVIDER]["cooldowns"]) == ["*/*"]


def test_a_throttled_create_is_retried(os_ws: Workspace, peer: OpenStackPeer, orch: Callable[..., Run]) -> None:
    ws = os_ws
    config = load_provider(ws, PROVIDER).model_dump(mode="json", exclude={"name"})
    (ws.providers_dir / f"{PROVIDER}.yaml").write_text(json.dumps({**config, "bootstrap": False}))
    (ws.families_dir / "workers.yaml").write_text(family(1))
    peer.faults(throttle=2)  # 429 overLimit, Retry-After: 1
    spawned = orch("spawn", "workers", "--json", cwd=ws.root)
    assert spawned.code == 0, spawned.err
    report = json.loads(spawned.out)
    assert len(report["ready"]) == 1 and report["failures"] == []
    with Store.open(ws.state_db) as store:
        retries = store.events(kind="provider.retry")
    assert [(e.provider, e.node) for e in retries] == [(PROVIDER, report["ready"][0])] * 2
    assert all("throttling" in e.reason for e in retries)
    assert [s["metadata"]["orch-node"] for s in mine(peer, ws)] == report["ready"], "one server, not one per try"


def test_a_create_that_stays_build_times_out_and_is_destroyed(os_ws: Workspace, peer: OpenStackPeer) -> None:
    handle = ProviderHandle(os_ws, load_provider(os_ws, PROVIDER))
    peer.faults(pending=1)
    with Store.open(os_ws.state_db) as store:
        record = create_as_spawn(handle, store, "w-pending")
        assert record.state == NodeState.BOOTING and record.host_key, "the host key pinned before the create"
        with pytest.raises(ProviderError, match=r"not running after 1 s \(state pending\)"):
            wait_running(handle, record.provider_node_id or "", timeout=1.0)
        [server] = mine(peer, os_ws)
        assert server["status"] == "BUILD"
        gone = find_node(handle, record.provider_node_id or "")
        destroy_node(handle, store, store.get_node("w-pending"), reason="test")
        assert store.get_node("w-pending").state == NodeState.STOPPED
    assert mine(peer, os_ws) == []
    assert gone is not None
    destroy_orphan(handle, gone)  # Nova answers 404 for a deleted server: gone is no error


def test_a_slow_delete_counts_as_gone(os_ws: Workspace, peer: OpenStackPeer) -> None:
    """Nova lists a deleted server (task_state ``deleting``) for a while: orch's stop
    does not fail on it, and the server does go."""
    handle = ProviderHandle(os_ws, load_provider(os_ws, PROVIDER))
    with Store.open(os_ws.state_db) as store:
        record = create_as_spawn(handle, store, "w-slow")
        wait_running(handle, record.provider_node_id or "", timeout=30)
        peer.faults(slow_destroy=2.0)
        stopped = destroy_node(handle, store, store.get_node("w-slow"), reason="test")
        assert stopped.state == NodeState.STOPPED
        [server] = mine(peer, os_ws)
        assert server["deleting"] and server["task_state"] == "deleting"
    deadline = time.monotonic() + 10
    while mine(peer, os_ws) or peer.state()["backing"]:
        assert time.monotonic() < deadline, "the deleted server never went"
        time.sleep(0.2)


# -- what the driver's errors mean -------------------------------------------------------------


@pytest.mark.parametrize(("error", "expected"), [
    (BaseHTTPError(403, "403 Forbidden Quota exceeded for instances: Requested 1, but already used 2 of 2"),
     ProviderQuotaError),
    (BaseHTTPError(413, "413 Request Entity Too Large Quota exceeded for cores"), ProviderQuotaError),
    (RateLimitReachedError(headers={"retry-after": "1"}), ProviderTransientError),
    (BaseHTTPError(401, "401 Unauthorized The request you have made requires authentication."), ProviderAuthError),
    (InvalidCredsError(), ProviderAuthError),
    (BaseHTTPError(400, "400 Bad Request Invalid key_name provided."), ProviderError),
    (BaseHTTPError(503, "503 Service Unavailable"), ProviderTransientError),
])
def test_nova_errors_are_read(error: Exception, expected: type[ProviderError]) -> None:
    with pytest.raises(ProviderError) as caught, map_libcloud_errors(PROVIDER, STOCK["openstack"].errors):
        raise error
    assert type(caught.value) is expected
    assert str(caught.value).startswith("provider 'os'") and "\n" not in str(caught.value)
    assert not isinstance(caught.value, ProviderCapacityError) or expected is not ProviderError
