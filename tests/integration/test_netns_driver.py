"""NetnsNodeDriver against real namespaces, veths, a bridge and sshd: libcloud's contract,
isolated nodes, fault injection, and nothing left behind.

Each test gets its own bridge (``orchbrt<hex>``) on a 10.213.N.0/24 that nothing on this
machine uses, so a developer's own netns nodes (default ``orchbr0``, 10.213.0.0/24) are
never touched.  The ``make_driver`` fixture (and ``driver``, made with it) destroys every
node in teardown, pass or fail, and checks with ``/proc`` and ``ip`` rather than the
driver that no process, namespace, veth, bridge or folder of theirs remains.
"""

from __future__ import annotations

import ipaddress
import json
import os
import pwd
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from libcloud.compute.base import Node, NodeAuthSSHKey
from libcloud.compute.types import NodeState

from orchestrator.provision.drivers import driver_class
from orchestrator.provision.drivers.netns import NetnsNodeDriver
from orchestrator.provision.drivers.netplumbing import NetnsDriverError
from orchestrator.provision.drivers.nodefolders import QuotaExceededError
from orchestrator.remote.ssh import HostKeyMismatch, NodeUnreachable, SSHSession, SSHTarget, Timeouts
from tests.helpers.keys import KeyPair
from tests.helpers.netns import (
    ProcessesOf,
    free_subnet,
    ip,
    leftovers,
    link_names,
    netns_inode,
    netns_names,
    netns_usable,
    pids_in_netns,
)

pytestmark = [
    pytest.mark.sshd,
    pytest.mark.root,
    pytest.mark.skipif(
        not netns_usable(), reason="needs root, iproute2 with `ip netns`, and OpenSSH's sshd at /usr/sbin/sshd"
    ),
]

MakeNodes = Callable[..., list[Node]]


@pytest.fixture
def make_driver(tmp_path: Path, node_processes: ProcessesOf) -> Iterator[Callable[..., NetnsNodeDriver]]:
    """``make_driver(**options)``: a netns driver on its own bridge and free subnet.
    Teardown destroys every node of every driver made, then proves nothing is left."""
    made: list[NetnsNodeDriver] = []

    def make(**options: Any) -> NetnsNodeDriver:
        options.setdefault("root", tmp_path / f"nodes{len(made)}")
        options.setdefault("bridge", f"orchbrt{secrets.token_hex(3)}")
        options.setdefault("subnet", free_subnet())
        driver = driver_class("netns")(None, **options)
        assert isinstance(driver, NetnsNodeDriver)
        made.append(driver)
        return driver

    yield make
    problems, nodes = [], {}
    for driver in made:
        folders = [f for f in driver.root.iterdir() if f.is_dir()] if driver.root.is_dir() else []
        for folder in folders:
            nodes[folder.name] = (driver, str(folder))
            try:
                driver.destroy_node(Node(folder.name, folder.name, NodeState.UNKNOWN, [], [], driver))
            except Exception as exc:  # report it, and go on cleaning the others
                problems.append(f"destroy {folder.name}: {exc}")
    for driver in made:
        problems += leftovers(driver, {i: d for i, (drv, d) in nodes.items() if drv is driver}, node_processes)
        if driver.bridge in link_names() and f"orch-netns:bridge:{driver.root}" in ip(
            "-o", "link", "show", driver.bridge
        ):
            ip("link", "del", "dev", driver.bridge)  # the driver's own bridge, left: remove it all the same
        shutil.rmtree(driver.root, ignore_errors=True)
    assert not problems, f"netns nodes left things behind: {problems}"


@pytest.fixture
def driver(make_driver: Callable[..., NetnsNodeDriver]) -> NetnsNodeDriver:
    return make_driver(max_nodes=6)


@pytest.fixture
def make_nodes(driver: NetnsNodeDriver, fleet_key: KeyPair) -> MakeNodes:
    def make(count: int, name: str = "w", **kwargs: Any) -> list[Node]:
        size, image = driver.list_sizes()[0], driver.list_images()[0]
        auth = NodeAuthSSHKey(fleet_key.public)
        return [driver.create_node(f"{name}{i}", size, image, auth=auth, **kwargs) for i in range(count)]

    return make


def target(node: Node, fleet_key: KeyPair) -> SSHTarget:
    return SSHTarget.from_node(node, fleet_key.private)


def test_catalogue(driver: NetnsNodeDriver) -> None:
    assert [s.id for s in driver.list_sizes()] == ["netns-1", "netns-2", "netns-4"]
    assert all(s.driver is driver and s.extra["cpus"] >= 1 for s in driver.list_sizes())
    assert [i.id for i in driver.list_images()] == ["host"]
    assert [(loc.id, loc.country) for loc in driver.list_locations()] == [("netns", "ZZ")]


def test_four_isolated_nodes(driver: NetnsNodeDriver, make_nodes: MakeNodes, fleet_key: KeyPair) -> None:
    started = time.monotonic()
    created = make_nodes(4, ex_tags={"family": "workers", "workspace": "ws1"})
    per_node = (time.monotonic() - started) / 4

    listed = driver.list_nodes()
    assert [n.id for n in listed] == [n.id for n in created]
    assert all(n.state == NodeState.RUNNING for n in listed)
    addresses = [ipaddress.IPv4Address(n.public_ips[0]) for n in listed]
    assert len(set(addresses)) == 4
    assert all(a in driver.subnet and int(a) & 0xFF >= 10 for a in addresses)
    for node in listed:
        assert node.private_ips == node.public_ips
        assert node.extra["host_key"].startswith("ssh-ed25519 AAAA")
        assert (node.extra["port"], node.extra["ssh_user"], node.extra["link"]) == (22, "root", "up")
        assert node.extra["tags"] == {"family": "workers", "workspace": "ws1"}
        assert node.extra["netns"] == f"orch-{node.id}" and len(node.extra["veth"]) <= 15
        assert Path(node.extra["node_dir"]).parent == driver.root
    assert per_node < 2.0, f"{per_node * 1000:.0f} ms per node"

    hostnames = set()
    for node in listed:
        home = Path(node.extra["node_dir"]) / "home"
        with SSHSession(target(node, fleet_key)) as session:
            out = session.run('hostname; echo "$HOME"; touch ~/mark; test -e /root/mark && echo bound', check=True)
            hostname, home_seen, bound = out.stdout.split()
            hostnames.add(hostname)
            assert hostname == node.id
            assert (home_seen, bound) == (str(home), "bound")  # ~ and /root are the node's home
            assert (home / "mark").exists() and not Path("/root/mark").exists()
            assert session.run("cat ~/.bashrc", check=True).stdout == (home / ".bashrc").read_text()
            addresses_seen = session.run("ip -4 -o address show dev eth0", check=True).stdout
            assert f"{node.public_ips[0]}/24" in addresses_seen
    assert len(hostnames) == 4


def test_host_key_is_pinned(driver: NetnsNodeDriver, make_nodes: MakeNodes, fleet_key: KeyPair) -> None:
    first, second = make_nodes(2)
    wrong = SSHTarget.from_node(first, fleet_key.private)
    wrong = SSHTarget(wrong.name, wrong.host, wrong.port, wrong.user, second.extra["host_key"], wrong.key_file)
    with pytest.raises(HostKeyMismatch):
        SSHSession(wrong)


def test_cut_link_makes_the_node_unreachable(
    driver: NetnsNodeDriver, make_nodes: MakeNodes, fleet_key: KeyPair
) -> None:
    [node] = make_nodes(1)
    with SSHSession(target(node, fleet_key)) as session:  # (a handshake under load can take over a second)
        assert session.run("true").ok

    assert driver.ex_cut_link(node)
    [listed] = driver.list_nodes()
    assert (listed.state, listed.extra["link"]) == (NodeState.RUNNING, "down")  # running, partitioned
    started = time.monotonic()
    with pytest.raises(NodeUnreachable):
        SSHSession(target(node, fleet_key), timeouts=Timeouts(connect=1.0))
    assert time.monotonic() - started < 5.0

    assert driver.ex_restore_link(node)
    assert driver.list_nodes()[0].extra["link"] == "up"
    with SSHSession(target(node, fleet_key)) as session:
        assert session.run("hostname", check=True).stdout.strip() == node.id


def test_remove_namespace_is_a_vanished_machine(
    driver: NetnsNodeDriver, make_nodes: MakeNodes, fleet_key: KeyPair, node_processes: ProcessesOf
) -> None:
    gone, kept = make_nodes(2)
    key = netns_inode(gone.extra["netns"])
    assert driver.ex_remove_namespace(gone)

    states = {n.id: (n.state, n.extra["link"]) for n in driver.list_nodes()}
    assert states == {gone.id: (NodeState.STOPPED, "absent"), kept.id: (NodeState.RUNNING, "up")}
    assert pids_in_netns(key) == [] and node_processes(gone.id, gone.extra["node_dir"]) == []
    assert gone.extra["netns"] not in netns_names() and gone.extra["veth"] not in link_names()
    with pytest.raises(NodeUnreachable):
        SSHSession(target(gone, fleet_key), timeouts=Timeouts(connect=1.0))

    assert driver.start_node(gone)  # the same address and host key come back
    with SSHSession(target(gone, fleet_key)) as session:
        assert session.run("hostname", check=True).stdout.strip() == gone.id
    assert driver.ex_remove_namespace(gone)
    assert driver.destroy_node(gone) and driver.destroy_node(kept)
    assert driver.list_nodes() == [] and driver.bridge not in link_names()


def test_kill_node_keeps_namespace_and_folder(
    driver: NetnsNodeDriver, make_nodes: MakeNodes, fleet_key: KeyPair
) -> None:
    [node] = make_nodes(1)
    key = netns_inode(node.extra["netns"])
    assert driver.ex_kill_node(node)
    [listed] = driver.list_nodes()
    assert listed.state == NodeState.STOPPED
    assert pids_in_netns(key) == []
    assert node.extra["netns"] in netns_names() and Path(node.extra["node_dir"]).is_dir()
    assert driver.start_node(node)
    assert driver.list_nodes()[0].state == NodeState.RUNNING
    with SSHSession(target(node, fleet_key)) as session:
        assert session.run("true").ok


def test_quota_when_no_address_is_free(make_driver: Callable[..., NetnsNodeDriver], fleet_key: KeyPair) -> None:
    """max_nodes is the driver contract's (test_driver_contract); a full subnet is netns's own."""
    auth = NodeAuthSSHKey(fleet_key.public)
    small = make_driver(subnet=free_subnet().replace("/24", "/28"))  # .10-.14: five addresses
    size, image = small.list_sizes()[0], small.list_images()[0]
    for _ in range(5):
        small.create_node("s", size, image, auth=auth)
    with pytest.raises(QuotaExceededError, match="no free address"):
        small.create_node("s", size, image, auth=auth)


def test_refuses_an_interface_or_subnet_it_does_not_own(
    make_driver: Callable[..., NetnsNodeDriver], fleet_key: KeyPair
) -> None:
    foreign, subnet = f"orchbrf{secrets.token_hex(3)}", free_subnet()
    ip("link", "add", "name", foreign, "type", "bridge")
    try:
        ip("address", "add", subnet.replace(".0/24", ".1/24"), "dev", foreign)
        auth = NodeAuthSSHKey(fleet_key.public)
        taken_name = make_driver(bridge=foreign)
        with pytest.raises(NetnsDriverError, match=f"interface {foreign} exists and is not the bridge"):
            taken_name.create_node("x", taken_name.list_sizes()[0], taken_name.list_images()[0], auth=auth)
        taken_subnet = make_driver(subnet=subnet)
        with pytest.raises(NetnsDriverError, match=f"subnet {subnet} is in use .*address .* on {foreign}"):
            taken_subnet.create_node("x", taken_subnet.list_sizes()[0], taken_subnet.list_images()[0], auth=auth)
        assert foreign in link_names()  # untouched
        assert list(taken_name.root.iterdir()) == [taken_name.root / ".lock"]
    finally:
        ip("link", "del", "dev", foreign)


def test_a_bridge_left_unmarked_by_a_killed_create_is_still_its_own(
    make_driver: Callable[..., NetnsNodeDriver], fleet_key: KeyPair
) -> None:
    """The kernel takes a new link's alias only in a second step; a create killed between
    the two leaves an unmarked bridge that the intent written first names: the next create
    marks and uses it, and the last node's destroy removes it."""
    driver = make_driver()
    driver.root.mkdir(parents=True)
    (driver.root / ".bridge-intent.json").write_text(json.dumps({"bridge": driver.bridge}))
    ip("link", "add", "name", driver.bridge, "type", "bridge")  # what the killed create left
    node = driver.create_node("w", driver.list_sizes()[0], driver.list_images()[0],
                              auth=NodeAuthSSHKey(fleet_key.public))
    assert f"orch-netns:bridge:{driver.root}" in ip("-o", "link", "show", driver.bridge)
    assert not (driver.root / ".bridge-intent.json").exists()
    driver.destroy_node(node)
    assert driver.bridge not in link_names()

    (driver.root / ".bridge-intent.json").write_text(json.dumps({"bridge": driver.bridge}))
    ip("link", "add", "name", driver.bridge, "type", "bridge")  # killed again, and no node made after
    driver.destroy_node(Node("w-gone", "w", NodeState.UNKNOWN, [], [], driver))
    assert driver.bridge not in link_names()
    assert not (driver.root / ".bridge-intent.json").exists()


def test_needs_root(make_driver: Callable[..., NetnsNodeDriver], fleet_key: KeyPair) -> None:
    driver = make_driver()
    node = Node("w-1234abcd", "w", NodeState.UNKNOWN, [], [], driver)
    nobody = pwd.getpwnam("nobody").pw_uid
    os.seteuid(nobody)  # the real and saved uid stay 0, so this is undone below
    try:
        with pytest.raises(NetnsDriverError, match="needs root"):
            driver.create_node(
                "w", driver.list_sizes()[0], driver.list_images()[0], auth=NodeAuthSSHKey(fleet_key.public)
            )
        with pytest.raises(NetnsDriverError, match="needs root"):
            driver.destroy_node(node)
        assert driver.list_sizes() and driver.list_locations()  # the catalogue needs no root
    finally:
        os.seteuid(0)
