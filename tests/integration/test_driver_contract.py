"""The driver contract: what every driver must do for the engine, written once and run
against each of them through the engine's own calls (``ProviderHandle``,
``provision.nodes``, ``provision.recovery``).

The subjects are ``local`` (sshd on loopback), ``netns`` (sshd in network namespaces;
root), ``hosts`` (a pool of existing machines, here local nodes standing in for bare
metal) and EC2 (libcloud's stock driver against a moto server, with a fault proxy in
front of it for capacity and quota errors that backs each instance with a real node:
tests/peers/ec2.py).  Each gets a fresh workspace with one
provider ``p``; teardown destroys whatever is left and proves nothing of it remains.

What is particular to one driver (netns fault injection, the hosts driver's claims,
local's folder checks, EC2's error codes) stays in that driver's own test module.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from libcloud.compute.types import NodeState as CloudState

from orchestrator.config import load_provider
from orchestrator.errors import ProviderCapacityError, ProviderError, ProviderQuotaError
from orchestrator.provision.drivers import driver_class, features_of
from orchestrator.provision.handle import ProviderHandle, key_pair_name
from orchestrator.provision.nodes import (
    await_running,
    destroy_node,
    destroy_orphan,
    find_node,
    tagged_nodes,
    wait_running,
)
from orchestrator.provision.recovery import recover
from orchestrator.provision.registry import sync_registrations
from orchestrator.provision.tags import TAG_FAMILY, TAG_NODE, TAG_WORKSPACE, node_tags
from orchestrator.remote.ssh import SSHSession, SSHTarget
from orchestrator.state import NodeRecord, NodeState, Store
from orchestrator.workspace import Workspace
from tests.helpers.moto_ec2 import ec2_provider_yaml
from tests.helpers.netns import free_subnet, leftovers, link_names, netns_usable
from tests.helpers.processes import processes_of
from tests.helpers.provision import create_as_spawn, workspace_with_provider, write_provider
from tests.helpers.workspace import REPO
from tests.peers.azure import start_azure
from tests.peers.azure import unavailable as azure_unavailable
from tests.peers.digitalocean import PLUGIN as DO_PLUGIN
from tests.peers.digitalocean import SIZES as DO_SIZES
from tests.peers.digitalocean import start_peer as start_do_peer
from tests.peers.ec2 import BackedEC2
from tests.peers.gce import GCEPeer, ServiceAccount
from tests.peers.gce import registration as gce_registration
from tests.peers.gce import start_peer as start_gce_peer
from tests.peers.openstack import PASSWORD, PROJECT, USER, OpenStackPeer, start_peer

SUBJECTS = ["local", "netns", "hosts", "ec2", "openstack", "digitalocean", "azure", "gce"]
CAPACITY = 2  # nodes each provider takes before it says no (max_nodes, the pool, the proxy's limit)


@dataclass
class Subject:
    """One driver under the contract: a workspace whose provider ``p`` uses it."""

    name: str
    ws: Workspace
    store: Store
    reachable: bool  # its nodes take SSH with the fleet key (each peer's instances are real nodes)
    capacity_error: Callable[[], None] | None  # makes the next create fail for capacity, where it can
    quota_error: Callable[[], None] | None  # makes the next create fail for quota (None: the API tells none apart)
    leftovers: Callable[[NodeRecord], list[str]]  # what of a destroyed node remains, seen around the driver
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    def handle(self) -> ProviderHandle:
        return ProviderHandle(self.ws, load_provider(self.ws, "p"))

    def create(self, handle: ProviderHandle, node_id: str) -> NodeRecord:
        """One node the way ``orch spawn`` makes it: intent first, then the provider, then
        what the provider says of it once it runs (a cloud's address comes then)."""
        return await_running(handle, self.store, create_as_spawn(handle, self.store, node_id), timeout=60)


def _set_max_nodes(ws: Workspace, count: int) -> None:
    path = ws.providers_dir / "p.yaml"
    data = json.loads(path.read_text())
    data["max_nodes"] = count
    path.write_text(json.dumps(data))


def _own_driver_leftovers(ws: Workspace) -> Callable[[NodeRecord], list[str]]:
    """A node of one of our sshd drivers leaves no process and no folder behind."""
    root = ws.runtime_dir / "drivers"

    def left(record: NodeRecord) -> list[str]:
        found = []
        for folder in root.glob(f"*/p/{record.provider_node_id}"):
            found.append(f"folder {folder}")
        node_dir = next(iter(root.glob("*/p")), root) / str(record.provider_node_id)
        pids = processes_of(record.provider_node_id, node_dir)
        if pids:
            found.append(f"processes {pids}")
        return found

    return left


@pytest.fixture
def local_subject(tmp_path: Path) -> Iterator[Subject]:
    ws, store = workspace_with_provider(tmp_path / "ws", {"driver": "local", "max_nodes": CAPACITY})
    yield Subject("local", ws, store, reachable=True, capacity_error=None,
                  quota_error=lambda: _set_max_nodes(ws, 0), leftovers=_own_driver_leftovers(ws))


@pytest.fixture
def netns_subject(tmp_path: Path) -> Iterator[Subject]:
    if not netns_usable():
        pytest.skip("needs root, iproute2 with `ip netns`, and OpenSSH's sshd")
    bridge = f"orchbrc{os.urandom(3).hex()}"
    options = {"subnet": free_subnet(), "bridge": bridge}
    ws, store = workspace_with_provider(tmp_path / "ws", {"driver": "netns", "max_nodes": CAPACITY,
                                                         "options": options})
    own = _own_driver_leftovers(ws)
    subject = Subject("netns", ws, store, reachable=True, capacity_error=None,
                      quota_error=lambda: _set_max_nodes(ws, 0), leftovers=own)

    def left(record: NodeRecord) -> list[str]:
        driver = subject.handle().driver
        node_dir = driver.root / str(record.provider_node_id)
        return own(record) + [x for x in leftovers(driver, {str(record.provider_node_id): str(node_dir)},
                                                    processes_of) if not x.startswith("bridge")]

    subject.leftovers = left
    yield subject
    assert bridge not in link_names(), f"the bridge {bridge} outlived the provider's last node"


@pytest.fixture
def hosts_subject(tmp_path: Path) -> Iterator[Subject]:
    """A pool of CAPACITY machines: local nodes of a workspace of their own whose fleet
    key is the subject's (an operator's machines that already trust it)."""
    ws = Workspace.init(tmp_path / "ws")
    machines_ws, machines = workspace_with_provider(tmp_path / "machines", {"driver": "local"})
    for suffix in ("", ".pub"):  # the machines trust the subject's fleet key
        machines_ws.ssh_key.with_suffix(suffix).write_bytes(ws.ssh_key.with_suffix(suffix).read_bytes())
    machines_handle = ProviderHandle(machines_ws, load_provider(machines_ws, "p"))
    pool = []
    for i in range(CAPACITY):
        record = create_as_spawn(machines_handle, machines, f"metal-{i}")
        pool.append({"name": f"m{i}", "address": record.address, "port": record.port, "user": record.ssh_user,
                     "host_key": record.host_key, "cpus": 2, "ram_mb": 2048, "disk_gb": 20,
                     "arch": platform.machine()})
    provider: dict[str, Any] = {"driver": "hosts", "max_nodes": CAPACITY, "options": {"hosts": pool}}
    write_provider(ws, provider)
    store = Store.open(ws.state_db)
    sync_registrations(store, {"p": load_provider(ws, "p")})

    def pool_taken() -> None:
        """Only the claimed machines stay in the pool: none is free, and max_nodes is no limit."""
        claimed = {(r.address, r.port) for r in store.list_nodes() if r.state.live}
        write_provider(ws, {**provider, "max_nodes": None,
                            "options": {"hosts": [h for h in pool if (h["address"], h["port"]) in claimed]}})

    def left(record: NodeRecord) -> list[str]:
        target = SSHTarget(record.id, str(record.address), record.port or 22, str(record.ssh_user),
                           str(record.host_key), ws.ssh_key)
        with SSHSession(target) as session:
            remains = session.run("ls -A ~/orch 2>/dev/null || true").stdout.split()
        claims = [c.name for c in (ws.runtime_dir / "drivers" / "hosts" / "p" / "claims").glob("*.json")
                  if json.loads(c.read_text()).get("id") == record.provider_node_id]
        return [f"~/orch/{name}" for name in remains] + [f"claim {name}" for name in claims]

    yield Subject("hosts", ws, store, reachable=True, capacity_error=pool_taken,
                  quota_error=lambda: _set_max_nodes(ws, 0), leftovers=left)
    for record in machines.list_nodes():
        if record.state.live:
            destroy_node(machines_handle, machines, record, reason="test over")
        assert processes_of(record.provider_node_id, machines_ws.runtime_dir / "drivers" / "local" / "p" /
                            str(record.provider_node_id)) == []
    machines.close()


@pytest.fixture
def ec2_subject(tmp_path: Path, backed_ec2: BackedEC2, ec2: Any) -> Iterator[Subject]:
    fault_proxy = backed_ec2  # (the fault proxy, its instances real nodes)
    ws, store = workspace_with_provider(tmp_path / "ws", json.loads(ec2_provider_yaml(fault_proxy.port, backed=True)))

    def capacity() -> None:
        fault_proxy.faults.capacity_types = {s.id for s in subject.handle().capabilities(store).sizes}

    def quota() -> None:
        fault_proxy.faults.instance_limit = 0

    def left(record: NodeRecord) -> list[str]:
        found = ec2.describe_instances(InstanceIds=[record.provider_node_id])["Reservations"]
        states = [i["State"]["Name"] for r in found for i in r["Instances"]]
        node = backed_ec2.backing.node(str(record.provider_node_id))
        return [f"instance {record.provider_node_id} is {state}" for state in states
                if state not in ("shutting-down", "terminated")] + \
            ([f"the node of instance {record.provider_node_id} still runs"] if node is not None else [])

    subject = Subject("ec2", ws, store, reachable=True, capacity_error=capacity, quota_error=quota, leftovers=left)
    yield subject


@pytest.fixture
def openstack_subject(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Subject]:
    """libcloud's stock OpenStack driver against our Keystone + Nova peer, each server a
    real node (tests/peers/openstack.py)."""
    peer: OpenStackPeer = start_peer(tmp_path / "openstack")
    try:
        monkeypatch.setenv("OS_USERNAME", USER)
        secret = tmp_path / "openstack-password"
        secret.write_text(PASSWORD)
        secret.chmod(0o600)
        ws, store = workspace_with_provider(tmp_path / "ws", {
            "driver": "openstack", "credentials": {"key": "env:OS_USERNAME", "secret": f"file:{secret}"},
            "options": {"ex_force_auth_url": peer.auth_url, "ex_tenant_name": PROJECT, "ex_domain_name": "Default"}})

        def left(record: NodeRecord) -> list[str]:
            state = peer.state()
            return [f"server {s['id']} is {s['status']}" for s in state["servers"]
                    if s["id"] == record.provider_node_id and not s["deleting"]] + \
                [f"the node of server {n} still runs" for n in state["backing"] if n == record.provider_node_id]

        yield Subject("openstack", ws, store, reachable=True, capacity_error=None,
                      quota_error=lambda: peer.faults(quota_instances=0), leftovers=left)
    finally:
        peer.stop()


@pytest.fixture
def digitalocean_subject(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Subject]:
    """libcloud's stock DigitalOcean driver against our API v2 peer, each droplet a real
    node (tests/peers/digitalocean.py, through its endpoint adapter ``dopeer``)."""
    peer = start_do_peer(tmp_path / "digitalocean")
    try:
        monkeypatch.setenv("ORCH_DRIVER_PLUGINS", DO_PLUGIN)
        monkeypatch.setenv("DO_TOKEN", peer.token)
        ws, store = workspace_with_provider(tmp_path / "ws", {
            "driver": "dopeer", "credentials": {"key": "env:DO_TOKEN"}, "image": "ubuntu-24-04-x64",
            "options": {"host": "127.0.0.1", "port": peer.port, "secure": False}})

        def left(record: NodeRecord) -> list[str]:
            state = peer.state()
            return [f"droplet {d['id']} is {d['status']}" for d in state["droplets"]
                    if str(d["id"]) == record.provider_node_id] + \
                [f"the node of droplet {n} still runs" for n in state["nodes"] if n == record.provider_node_id]

        yield Subject("digitalocean", ws, store, reachable=True,
                                    capacity_error=lambda: peer.faults(capacity=list(DO_SIZES)),
                                    quota_error=None, leftovers=left)  # (its droplet limit is a 422 like capacity)
    finally:
        peer.stop()


@pytest.fixture
def azure_subject(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Subject]:
    """libcloud's stock Azure (ARM) driver against our ARM + Azure AD peer over HTTPS
    (its self-signed certificate trusted here and in children), each VM a real node
    (tests/peers/azure.py)."""
    import libcloud.security

    if (reason := azure_unavailable()) is not None:
        pytest.skip(reason)
    peer = start_azure(tmp_path / "azure")
    try:
        monkeypatch.setattr(libcloud.security, "CA_CERTS_PATH", str(peer.ca_file))
        monkeypatch.setenv("SSL_CERT_FILE", str(peer.ca_file))
        monkeypatch.setenv("ORCH_TEST_AZURE_CLIENT_ID", peer.client_id)
        ws, store = workspace_with_provider(tmp_path / "ws", peer.registration("ORCH_TEST_AZURE_CLIENT_ID"))
        yield Subject("azure", ws, store, reachable=True,
                      capacity_error=lambda: peer.fault("capacity", count=1000),  # SkuNotAvailable
                      quota_error=lambda: peer.fault("quota", count=1000),  # OperationNotAllowed (cores)
                      leftovers=lambda record: peer.leftovers(record.id))
    finally:
        peer.stop()


@pytest.fixture
def gce_subject(tmp_path: Path) -> Iterator[Subject]:
    """libcloud's stock GCE driver (a service account's JWT for a token, zonal operations)
    against our Compute Engine peer through the driver's own proxy_url, each instance a
    real node (tests/peers/gce.py)."""
    account = ServiceAccount.generate("orch-contract")
    peer: GCEPeer = start_gce_peer(tmp_path / "gce", account)
    try:
        ws, store = workspace_with_provider(tmp_path / "ws", gce_registration(peer, account, tmp_path / "gce-sa.json"))
        yield Subject("gce", ws, store, reachable=True,
                      capacity_error=lambda: peer.faults(capacity=["*"]),  # ZONE_RESOURCE_POOL_EXHAUSTED
                      quota_error=lambda: peer.faults(quota_instances=0),  # QUOTA_EXCEEDED
                      leftovers=lambda record: peer.leftovers(str(record.provider_node_id)))
    finally:
        peer.stop()


@pytest.fixture(params=SUBJECTS)
def subject(request: pytest.FixtureRequest) -> Iterator[Subject]:
    """Each driver in turn; whatever a test leaves is destroyed, and must leave nothing."""
    made: Subject = request.getfixturevalue(f"{request.param}_subject")
    yield made
    handle = made.handle()
    problems = []
    for record in made.store.list_nodes():
        if record.provider_node_id and record.state != NodeState.STOPPED:
            try:
                record = destroy_node(handle, made.store, record, reason="test over")
            except ProviderError as exc:
                problems.append(f"{record.id}: {exc}")
        if record.provider_node_id:
            problems += made.leftovers(record)
    for node in tagged_nodes(handle, made.store.workspace_id):  # made behind the store's back: still ours
        handle.driver.destroy_node(node)
    made.store.close()
    assert not problems, f"{made.name} left things behind: {problems}"


# -- the contract -----------------------------------------------------------------------------


def test_registered_with_libcloud_and_declares_its_features(subject: Subject) -> None:
    driver = subject.handle().driver
    assert isinstance(driver, driver_class(subject.handle().config.driver))  # (OpenStack's is a factory)
    features = features_of(type(driver))
    assert features.tags in ("ex_tags", "ex_metadata", "ex_labels", "ex_create_attr")
    assert features.ssh_key in ("auth", "key_pair", "metadata", "account_key")
    assert subject.handle().bootstraps is subject.reachable


def test_catalogue(subject: Subject) -> None:
    handle = subject.handle()
    catalogue = handle.offers(subject.store)
    assert catalogue.locations and catalogue.images and catalogue.sizes
    assert all(s.cpus >= 1 and s.ram_mb > 0 for s in catalogue.sizes)
    caps = handle.capabilities(subject.store)
    assert caps.name == "p" and caps.image and caps.sizes
    again = ProviderHandle(subject.ws, handle.config).offers(subject.store)  # from the store's cache
    assert again.fetched_at == catalogue.fetched_at


def test_create_tags_the_node_and_gives_it_the_fleet_key(subject: Subject) -> None:
    handle = subject.handle()
    record = subject.create(handle, "w-tagged")
    assert record.state == NodeState.BOOTING and record.provider_node_id and record.address
    node = find_node(handle, record.provider_node_id)
    assert node is not None
    assert node_tags(node)[TAG_WORKSPACE] == subject.store.workspace_id
    assert (node_tags(node)[TAG_FAMILY], node_tags(node)[TAG_NODE]) == ("w", "w-tagged")
    wait_running(handle, record.provider_node_id, timeout=60)
    if subject.reachable:  # the key went in, and the host key was handed over and pinned
        record = subject.store.get_node(record.id)
        assert record.host_key
        target = SSHTarget(record.id, record.address or "", record.port or 22, record.ssh_user or "",
                           record.host_key, subject.ws.ssh_key)
        with SSHSession(target) as session:
            assert session.run("echo $((6 * 7))", check=True).stdout.strip() == "42"
            gateway = record.extra.get("gateway")
            if gateway:  # the driver says where the node reaches this machine: it does
                with socket.create_server((str(gateway), 0)) as listener:
                    dial = f"python3 -c 'import socket; socket.create_connection((\"{gateway}\", " \
                           f"{listener.getsockname()[1]}), 5).close()'"
                    assert session.run(dial).ok
                    listener.settimeout(5)
                    listener.accept()[0].close()
    else:  # a key pair imported once, named after the workspace and the key
        pubkey = subject.ws.ssh_key.with_suffix(".pub").read_text().strip()
        assert node.extra.get("key_name") == key_pair_name(subject.store.workspace_id, pubkey)
    assert subject.name not in ("local", "netns") or record.extra.get("gateway")


def test_nodes_are_listed_by_their_workspace_tag(subject: Subject) -> None:
    handle = subject.handle()
    records = [subject.create(handle, f"w-{i}") for i in range(CAPACITY)]
    mine = tagged_nodes(handle, subject.store.workspace_id)
    assert sorted(node_tags(n)[TAG_NODE] for n in mine) == sorted(r.id for r in records)
    assert tagged_nodes(handle, "another-workspace") == []
    fresh = ProviderHandle(subject.ws, load_provider(subject.ws, "p"))  # a new orch process: a new driver
    assert sorted(str(n.id) for n in tagged_nodes(fresh, subject.store.workspace_id)) == \
        sorted(str(r.provider_node_id) for r in records)


def test_wait_running_returns_the_running_node(subject: Subject) -> None:
    handle = subject.handle()
    record = subject.create(handle, "w-wait")
    node = wait_running(handle, str(record.provider_node_id), timeout=60)
    assert node.state == CloudState.RUNNING and str(node.id) == record.provider_node_id


def test_destroy_leaves_nothing(subject: Subject) -> None:
    handle = subject.handle()
    doomed, kept = subject.create(handle, "w-doomed"), subject.create(handle, "w-kept")
    if subject.reachable:  # a process the node started on its own goes with it
        doomed = subject.store.get_node(doomed.id)
        target = SSHTarget(doomed.id, doomed.address or "", doomed.port or 22, doomed.ssh_user or "",
                           doomed.host_key or "", subject.ws.ssh_key)
        with SSHSession(target) as session:
            session.run("mkdir -p ~/orch; nohup sleep 1000 >/dev/null 2>&1 &", check=True)
    gone = find_node(handle, str(doomed.provider_node_id))
    stopped = destroy_node(handle, subject.store, doomed, reason="contract")
    assert stopped.state == NodeState.STOPPED
    assert find_node(handle, str(doomed.provider_node_id)) is None
    assert [node_tags(n)[TAG_NODE] for n in tagged_nodes(handle, subject.store.workspace_id)] == [kept.id]
    deadline = time.monotonic() + 10
    while (left := subject.leftovers(stopped)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == []
    destroy_orphan(handle, gone)  # destroying a node that is gone is no error (Nova answers 404)


def _full(subject: Subject, make_it_full: Callable[[], None], expected: type[ProviderError]) -> None:
    subject.create(subject.handle(), "w-first")
    make_it_full()
    handle = subject.handle()  # the registration may have changed
    with pytest.raises(expected) as caught:
        subject.create(handle, "w-refused")
    assert isinstance(caught.value, ProviderCapacityError)  # both kinds fail over to the next choice
    assert subject.store.get_node("w-refused").state == NodeState.FAILED
    assert [node_tags(n)[TAG_NODE] for n in tagged_nodes(handle, subject.store.workspace_id)] == ["w-first"]


def test_a_used_up_quota_is_a_quota_error(subject: Subject) -> None:
    if subject.quota_error is None:
        pytest.skip(f"{subject.name}'s API answers a used-up quota as it answers no capacity (its own tests)")
    _full(subject, subject.quota_error, ProviderQuotaError)


# local and netns nodes are limited by their quota only (max_nodes; netns's subnet too).
@pytest.mark.parametrize("subject", ["hosts", "ec2", "digitalocean", "azure", "gce"], indirect=True)
def test_no_capacity_is_a_capacity_error(subject: Subject) -> None:
    assert subject.capacity_error is not None
    _full(subject, subject.capacity_error, ProviderCapacityError)


@pytest.mark.parametrize("when", ["at once", "once the provider lists it"])
def test_a_create_killed_half_way_is_settled(subject: Subject, when: str) -> None:
    """SIGKILL an ``orch`` process while it creates a node; recovery settles what is left:
    every live record then has its node at the provider, and every tagged node a record."""
    handle = subject.handle()
    handle.capabilities(subject.store)  # cached for the child
    child = subprocess.Popen([sys.executable, "-m", "tests.helpers.provision", str(subject.ws.root), "w-killed"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "ready"
        child.stdin.write("go\n")
        child.stdin.flush()
        if when == "once the provider lists it":
            deadline = time.monotonic() + 30
            while not tagged_nodes(handle, subject.store.workspace_id) and time.monotonic() < deadline:
                time.sleep(0.01)
        else:
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(10)
        for pipe in (child.stdin, child.stdout):
            if pipe is not None:
                pipe.close()
    records = subject.store.list_nodes()
    recover(subject.store, {"p": handle}, records)
    settled = {r.id: r for r in subject.store.list_nodes()}
    tagged = {node_tags(n)[TAG_NODE]: n for n in tagged_nodes(handle, subject.store.workspace_id)}
    live = {i for i, r in settled.items() if r.state.live}
    assert all(r.state not in (NodeState.REQUESTED, NodeState.CREATING) for r in settled.values())
    assert set(tagged) == live, (settled, tagged)
    for node_id in live:  # adopted: it can be waited for and destroyed like any other
        wait_running(handle, str(settled[node_id].provider_node_id), timeout=60)


def test_the_contract_covers_every_driver_orch_ships() -> None:
    from orchestrator.config.drivers import OWN_DRIVERS

    assert set(OWN_DRIVERS) | {"ec2", "openstack", "digitalocean", "azure", "gce"} == set(SUBJECTS)
    assert dataclasses.is_dataclass(Subject)
