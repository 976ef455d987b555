"""HostsNodeDriver against a pool of real machines: local-driver nodes (real sshd) stand in
for bare metal, and the ``driver`` fixture destroys them at teardown whatever happens."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from libcloud.compute.base import Node, NodeAuthSSHKey, NodeLocation, NodeSize
from libcloud.compute.types import NodeState

from orchestrator.provision.drivers import driver_class
from orchestrator.provision.drivers.hosts import CapacityError, HostsDriverError, HostsNodeDriver
from orchestrator.provision.drivers.local import _port_free
from orchestrator.provision.drivers.nodefolders import QuotaExceededError
from orchestrator.provision.drivers.processes import SSHD
from orchestrator.remote.ssh import AuthenticationFailed, HostKeyMismatch, NodeUnreachable, SSHSession, SSHTarget

MakeNodes = Callable[..., list[Node]]
TargetOf = Callable[[Node], SSHTarget]

pytestmark = [
    pytest.mark.sshd,
    pytest.mark.skipif(not Path(SSHD).exists(), reason=f"OpenSSH's sshd is not installed at {SSHD}"),
]

SMALL = {"cpus": 2, "ram_mb": 2048, "disk_gb": 20, "arch": "x86_64"}
BIG = {"cpus": 8, "ram_mb": 16384, "disk_gb": 200, "arch": "x86_64"}


def entry(machine: Node, name: str, **overrides: Any) -> dict[str, Any]:
    """The ``options.hosts`` entry an operator would write for ``machine``."""
    return {
        "name": name,
        "address": machine.public_ips[0],
        "port": machine.extra["port"],
        "user": machine.extra["ssh_user"],
        "host_key": machine.extra["host_key"] + " root@rack",
        **SMALL,
        **overrides,
    }


@pytest.fixture
def machines(make_nodes: MakeNodes) -> list[Node]:
    """Three "existing machines": local nodes, destroyed by the ``driver`` fixture."""
    return make_nodes(3, name="metal")


@pytest.fixture
def pool_hosts(machines: list[Node]) -> list[dict[str, Any]]:
    return [entry(m, f"m{i}") for i, m in enumerate(machines)]


@pytest.fixture
def claims_root(tmp_path: Path) -> Path:
    return tmp_path / "hosts"


@pytest.fixture
def hosts_driver(pool_hosts: list[dict[str, Any]], claims_root: Path, fleet_key: Any) -> HostsNodeDriver:
    return new_driver(pool_hosts, claims_root, fleet_key.private)


def new_driver(hosts: list[dict[str, Any]], root: Path, key_file: Path | None, **kwargs: Any) -> HostsNodeDriver:
    made = driver_class("hosts")(None, root=str(root), hosts=hosts, key_file=key_file, **kwargs)
    assert isinstance(made, HostsNodeDriver)
    return made


def claim(driver: HostsNodeDriver, fleet_key: Any, size: NodeSize | None = None, **kwargs: Any) -> Node:
    return driver.create_node(
        "n",
        size or driver.list_sizes()[0],
        driver.list_images()[0],
        auth=NodeAuthSSHKey(fleet_key.public),
        **kwargs,
    )


def machine_of(node: Node, machines: list[Node]) -> Node:
    return next(m for m in machines if m.public_ips == node.public_ips and m.extra["port"] == node.extra["port"])


def test_catalogue_comes_from_the_pool(machines: list[Node], claims_root: Path) -> None:
    hosts = [
        entry(machines[0], "a0", location="rack-a"),
        entry(machines[1], "a1", location="rack-a"),
        entry(machines[2], "b0", location="rack-b", **BIG, labels=["gpu"]),
    ]
    driver = new_driver(hosts, claims_root, None)
    sizes = {s.id: s for s in driver.list_sizes()}
    assert set(sizes) == {"h-2c-2048m-20g-x86_64", "h-8c-16384m-200g-x86_64"}
    big = sizes["h-8c-16384m-200g-x86_64"]
    assert (big.ram, big.disk, big.price, big.extra) == (16384, 200, 0.0, {"cpus": 8, "arch": "x86_64"})
    assert [loc.id for loc in driver.list_locations()] == ["rack-a", "rack-b"]
    rack_b = NodeLocation("rack-b", "rack-b", "ZZ", driver)
    assert [s.id for s in driver.list_sizes(rack_b)] == ["h-8c-16384m-200g-x86_64"]
    assert [i.id for i in driver.list_images()] == ["host"]

    node = driver.create_node("g", big, driver.list_images()[0], location=rack_b, ex_tags={"family": "gpu"})
    assert node.extra["host"] == "b0" and node.extra["host_labels"] == ["gpu"]
    assert node.extra["location"] == "rack-b" and node.size is not None and node.size.id == big.id
    with pytest.raises(CapacityError, match=r"no free host of size h-8c-16384m-200g-x86_64 in location rack-b: 1 of 1"):
        driver.create_node("g2", big, driver.list_images()[0], location=rack_b)


def test_claims_distinct_hosts_until_the_pool_is_full(
    hosts_driver: HostsNodeDriver, machines: list[Node], fleet_key: Any
) -> None:
    nodes = [claim(hosts_driver, fleet_key, ex_tags={"family": "w", "node": f"w{i}"}) for i in range(3)]

    assert sorted(n.extra["host"] for n in nodes) == ["m0", "m1", "m2"]
    for node in nodes:
        machine = machine_of(node, machines)
        assert node.state == NodeState.RUNNING
        assert re.fullmatch(node.extra["host"] + r"-[0-9a-f]{8}", str(node.id))
        assert node.extra["host_key"] == machine.extra["host_key"]  # pinned from the pool, comment dropped
        assert (node.extra["port"], node.extra["ssh_user"]) == (machine.extra["port"], machine.extra["ssh_user"])
    assert {n.extra["tags"]["node"] for n in nodes} == {"w0", "w1", "w2"}
    with pytest.raises(CapacityError, match=r"no free host of size h-2c-2048m-20g-x86_64 .*: 3 of 3 claimed") as caught:
        claim(hosts_driver, fleet_key)
    assert (caught.value.claimed, caught.value.total) == (3, 3)

    listed = hosts_driver.list_nodes()
    assert sorted(str(n.id) for n in listed) == sorted(str(n.id) for n in nodes)
    assert all(n.state == NodeState.RUNNING for n in listed)


def test_the_claimed_node_is_reachable_with_the_fleet_key(
    hosts_driver: HostsNodeDriver, fleet_key: Any, target_of: TargetOf
) -> None:
    node = claim(hosts_driver, fleet_key)
    with SSHSession(target_of(node)) as session:
        assert session.run("echo ok", check=True).stdout == "ok\n"


def test_another_process_sees_the_claims_and_cannot_double_claim(
    pool_hosts: list[dict[str, Any]], claims_root: Path, hosts_driver: HostsNodeDriver, fleet_key: Any
) -> None:
    first = claim(hosts_driver, fleet_key)
    other = new_driver(pool_hosts, claims_root, fleet_key.private)
    [seen] = other.list_nodes()
    assert (seen.id, seen.extra["host"], seen.state) == (first.id, first.extra["host"], NodeState.RUNNING)
    second, third = claim(other, fleet_key), claim(other, fleet_key)
    assert len({first.extra["host"], second.extra["host"], third.extra["host"]}) == 3
    with pytest.raises(CapacityError):
        claim(hosts_driver, fleet_key)


def test_concurrent_claims_from_threads_never_share_a_host(
    pool_hosts: list[dict[str, Any]], claims_root: Path, fleet_key: Any
) -> None:
    drivers = [new_driver(pool_hosts, claims_root, fleet_key.private) for _ in range(8)]
    start = threading.Barrier(len(drivers))
    won: list[str] = []
    full: list[CapacityError] = []
    lock = threading.Lock()

    def race(driver: HostsNodeDriver) -> None:
        start.wait()
        try:
            node = claim(driver, fleet_key)
        except CapacityError as exc:
            with lock:
                full.append(exc)
        else:
            with lock:
                won.append(node.extra["host"])

    threads = [threading.Thread(target=race, args=(d,)) for d in drivers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(won) == ["m0", "m1", "m2"] and len(full) == 5


_RACER = """
import json, os, sys, time
from libcloud.compute.base import NodeAuthSSHKey
from orchestrator.provision.drivers.hosts import CapacityError, HostsDriverError, HostsNodeDriver
args = json.loads(sys.argv[1])
driver = HostsNodeDriver(root=args["root"], hosts=args["hosts"], key_file=args["key_file"])
print("ready", flush=True)
while not os.path.exists(args["go"]):  # all racers start claiming together
    time.sleep(0.001)
won = []
for _ in range(3):
    try:
        won.append(driver.create_node("p", driver.list_sizes()[0], driver.list_images()[0],
                                      auth=NodeAuthSSHKey(args["pubkey"])).extra["host"])
    except CapacityError:
        pass
print(json.dumps(won))
"""


def test_concurrent_claims_from_processes_never_share_a_host(
    pool_hosts: list[dict[str, Any]], claims_root: Path, fleet_key: Any
) -> None:
    args = {
        "root": str(claims_root),
        "hosts": pool_hosts,
        "key_file": str(fleet_key.private),
        "pubkey": fleet_key.public,
        "go": str(claims_root.parent / "go"),
    }
    racers = [
        subprocess.Popen([sys.executable, "-c", _RACER, json.dumps(args)], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    assert all(r.stdout is not None and r.stdout.readline() == "ready\n" for r in racers)
    Path(args["go"]).touch()
    won = [host for r in racers for host in json.loads(r.communicate(timeout=60)[0])]
    assert all(r.returncode == 0 for r in racers)
    assert sorted(won) == ["m0", "m1", "m2"]


def test_destroy_cleans_the_host_and_frees_it(
    hosts_driver: HostsNodeDriver, machines: list[Node], fleet_key: Any, target_of: TargetOf
) -> None:
    try:
        _destroy_cleans_the_host_and_frees_it(hosts_driver, machines, fleet_key, target_of)
    finally:
        for pid in _sleepers():
            os.kill(pid, signal.SIGKILL)


def _destroy_cleans_the_host_and_frees_it(
    hosts_driver: HostsNodeDriver, machines: list[Node], fleet_key: Any, target_of: TargetOf
) -> None:
    node = claim(hosts_driver, fleet_key)
    machine = machine_of(node, machines)
    home = Path(machine.extra["node_dir"]) / "home"
    with SSHSession(target_of(node)) as session:
        # what bootstrap leaves: files, and processes started from ~/orch three ways
        session.run(
            "mkdir -p orch/releases && echo x > orch/releases/blob && cp /bin/sleep orch/sleeper; "
            'nohup "$HOME/orch/sleeper" 3011 </dev/null >/dev/null 2>&1 & '
            "(cd orch/releases; nohup sleep 3012 </dev/null >/dev/null 2>&1 &); "
            f"ORCH_NODE_ID={node.id} nohup sleep 3013 </dev/null >/dev/null 2>&1 & "
            "test -x orch/sleeper",
            check=True,
        )
    assert (home / "orch" / "releases" / "blob").exists()
    deadline = time.monotonic() + 5
    while len(_sleepers()) < 3 and time.monotonic() < deadline:  # nohup has yet to exec sleep
        time.sleep(0.01)
    assert len(_sleepers()) == 3

    assert hosts_driver.destroy_node(node) is True

    assert not (home / "orch").exists()
    assert _sleepers() == []
    assert hosts_driver.list_nodes() == []
    with SSHSession(target_of(machine)) as session:  # the machine itself is untouched otherwise
        assert session.run("test -e orch || echo gone", check=True).stdout == "gone\n"
    assert hosts_driver.destroy_node(node) is True  # idempotent
    again = claim(hosts_driver, fleet_key)
    assert again.extra["host"] == node.extra["host"] and again.id != node.id


def test_destroy_of_an_old_node_leaves_a_newer_claim_alone(hosts_driver: HostsNodeDriver, fleet_key: Any) -> None:
    node = claim(hosts_driver, fleet_key)
    hosts_driver.destroy_node(node)
    newer = claim(hosts_driver, fleet_key)
    assert newer.extra["host"] == node.extra["host"]
    assert hosts_driver.destroy_node(node) is True
    assert [n.id for n in hosts_driver.list_nodes()] == [newer.id]


def test_wrong_host_key_refuses_to_clean_and_keeps_the_claim(
    pool_hosts: list[dict[str, Any]], claims_root: Path, machines: list[Node], fleet_key: Any
) -> None:
    lying = [dict(pool_hosts[0], host_key=machines[1].extra["host_key"])]  # another machine's real key
    driver = new_driver(lying, claims_root, fleet_key.private)
    node = claim(driver, fleet_key)
    with pytest.raises(HostKeyMismatch, match=r"host m0 \(127\.0\.0\.\d+:\d+\) of node m0-\w+ offered") as caught:
        driver.destroy_node(node)
    assert "stays claimed" in str(caught.value) and "host_key" in str(caught.value.hint)
    assert [n.id for n in driver.list_nodes()] == [node.id]
    with pytest.raises(CapacityError):
        claim(driver, fleet_key)

    fixed = new_driver(pool_hosts, claims_root, fleet_key.private)  # the operator corrected the YAML
    assert fixed.list_nodes()[0].extra["host_key"] == machines[0].extra["host_key"]
    assert fixed.destroy_node(node) is True
    assert fixed.list_nodes() == []


def test_unreachable_host_keeps_its_claim_while_in_the_pool(
    pool_hosts: list[dict[str, Any]], claims_root: Path, fleet_key: Any
) -> None:
    port = next(p for p in range(40000, 40100) if _port_free("127.0.0.1", p))
    dead = dict(pool_hosts[0], name="dead", address="127.0.0.1", port=port)
    driver = new_driver([dead], claims_root, fleet_key.private)
    node = claim(driver, fleet_key)
    assert node.state == NodeState.UNKNOWN
    assert driver.list_nodes()[0].state == NodeState.UNKNOWN
    with pytest.raises(NodeUnreachable, match="dead"):
        driver.destroy_node(node)
    assert len(driver.list_nodes()) == 1

    retired = new_driver(pool_hosts, claims_root, fleet_key.private)  # "dead" left the YAML
    assert [n.extra["host"] for n in retired.list_nodes()] == ["dead"]
    assert retired.destroy_node(node) is False  # released, but not cleaned
    assert retired.list_nodes() == []


def test_a_refused_fleet_key_keeps_the_claim(
    pool_hosts: list[dict[str, Any]], claims_root: Path, new_key_pair: Callable[[str], Any]
) -> None:
    stranger = new_key_pair("stranger")  # not in the machines' authorized_keys
    driver = new_driver(pool_hosts, claims_root, stranger.private)
    node = claim(driver, stranger)
    with pytest.raises(AuthenticationFailed, match=r"node m0 .* refused the key"):
        driver.destroy_node(node)
    assert [n.id for n in driver.list_nodes()] == [node.id]


def test_ex_release_drops_a_claim_without_touching_the_host(hosts_driver: HostsNodeDriver, fleet_key: Any) -> None:
    node = claim(hosts_driver, fleet_key)
    assert hosts_driver.ex_release(node) is True
    assert hosts_driver.list_nodes() == []


def test_max_nodes_and_auth_checks(
    pool_hosts: list[dict[str, Any]], claims_root: Path, fleet_key: Any, new_key_pair: Callable[[str], Any]
) -> None:
    driver = new_driver(pool_hosts, claims_root, fleet_key.private, max_nodes=1)
    claim(driver, fleet_key)
    with pytest.raises(QuotaExceededError, match="max_nodes=1"):
        claim(driver, fleet_key)
    stranger = new_key_pair("stranger")
    with pytest.raises(ValueError, match="not the public half of key_file"):
        new_driver(pool_hosts, claims_root, fleet_key.private).create_node(
            "n", driver.list_sizes()[0], driver.list_images()[0], auth=NodeAuthSSHKey(stranger.public)
        )
    keyless = new_driver(pool_hosts, claims_root, None)
    node = keyless.create_node("n", keyless.list_sizes()[0], keyless.list_images()[0])  # no auth, no key_file
    with pytest.raises(HostsDriverError, match="no key_file"):
        keyless.destroy_node(node)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"host_key": None}, r"options\.hosts\[1\] \('m1'\): host_key: Field required"),
        ({"host_key": "not a key"}, r"options\.hosts\[1\] \('m1'\): host_key: .*OpenSSH public key line"),
        ({"colour": "red"}, r"options\.hosts\[1\] \('m1'\): colour: Extra inputs are not permitted"),
        ({"port": 70000}, r"options\.hosts\[1\] \('m1'\): port: Input should be less than or equal to 65535"),
        ({"port": "ssh"}, r"options\.hosts\[1\] \('m1'\): port: Input should be a valid integer"),
        ({"name": "m0"}, r"options\.hosts\[1\]: name 'm0' repeats options\.hosts\[0\]"),
        ({"cpus": 0}, r"options\.hosts\[1\] \('m1'\): cpus: Input should be greater than or equal to 1"),
    ],
)
def test_invalid_hosts_are_refused_naming_index_and_field(
    claims_root: Path, fleet_key: Any, change: dict[str, Any], expected: str
) -> None:
    hosts = [  # validation happens before any connection: no machine needed
        {"name": f"m{i}", "address": f"10.9.0.{i}", "user": "orch", "host_key": fleet_key.public, **SMALL}
        for i in range(3)
    ]
    broken = {k: v for k, v in dict(hosts[1], **change).items() if v is not None}
    with pytest.raises(ValueError, match=expected):
        new_driver([hosts[0], broken, hosts[2]], claims_root, None)
    assert new_driver(hosts, claims_root, None).hosts[1].port == 22  # the default
    assert not claims_root.exists()  # nothing is written before a claim


def test_an_empty_pool_is_refused(claims_root: Path) -> None:
    with pytest.raises(ValueError, match=r"options\.hosts must be a non-empty list"):
        new_driver([], claims_root, None)


def _sleepers() -> list[int]:
    """Live pids of the test's ``sleep 301x`` processes.  The one started with another
    ORCH_NODE_ID escapes the local driver's teardown: the test kills what is left."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        if stat[stat.rfind(")") + 2] not in "ZX" and any(a in (b"3011", b"3012", b"3013") for a in cmdline[1:2]):
            found.append(int(proc.name))
    return found
