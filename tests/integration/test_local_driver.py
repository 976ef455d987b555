"""LocalNodeDriver against real sshd processes: libcloud's contract, state on disk,
no orphaned processes."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from libcloud.compute.base import Node, NodeAuthPassword, NodeAuthSSHKey
from libcloud.compute.types import NodeState

from orchestrator.provision.drivers.local import LocalNodeDriver
from orchestrator.provision.drivers.nodefolders import LocalDriverError, QuotaExceededError
from orchestrator.provision.drivers.processes import SSHD
from orchestrator.provision.userdata import HostKey, cloud_config
from orchestrator.remote.ssh import HostKeyMismatch, SSHSession, SSHTarget

MakeNodes = Callable[..., list[Node]]
TargetOf = Callable[[Node], SSHTarget]
ProcessesOf = Callable[[object, str], list[int]]

pytestmark = [
    pytest.mark.sshd,
    pytest.mark.skipif(not Path(SSHD).exists(), reason=f"OpenSSH's sshd is not installed at {SSHD}"),
]


def test_catalogue(driver: LocalNodeDriver) -> None:
    sizes = {s.id: s for s in driver.list_sizes()}
    assert set(sizes) == {"local-1", "local-2", "local-4"}
    assert (sizes["local-2"].ram, sizes["local-2"].extra["cpus"], sizes["local-2"].price) == (1024, 2, 0.0)
    assert all(s.extra["arch"] == platform.machine() and s.disk > 0 for s in sizes.values())
    [image] = driver.list_images()
    assert image.id == "host" and image.name
    [location] = driver.list_locations()
    assert (location.id, location.country) == ("local", "ZZ")


def test_four_nodes_run_on_distinct_addresses(driver: LocalNodeDriver, make_nodes: MakeNodes) -> None:
    created = make_nodes(4, ex_tags={"family": "workers", "workspace": "ws1"})

    listed = driver.list_nodes()
    assert {n.id for n in listed} == {n.id for n in created}
    assert all(n.state == NodeState.RUNNING for n in listed)
    addresses = [n.public_ips[0] for n in listed]
    assert len(set(addresses)) == 4
    assert all(
        a.startswith("127.0.0.") and n.private_ips == n.public_ips for a, n in zip(addresses, listed, strict=True)
    )
    for node in listed:
        assert node.extra["host_key"].startswith("ssh-ed25519 AAAA")
        assert node.extra["tags"] == {"family": "workers", "workspace": "ws1"}
        assert node.extra["port"] == 2222
        assert Path(node.extra["node_dir"]).parent == driver.root
        assert node.size is not None and node.size.id == "local-1"
        assert node.image is not None and node.image.id == "host"
        assert node.created_at is not None
        assert driver.ex_host_key(node) == node.extra["host_key"]


def test_metadata_is_written_before_sshd_and_half_written_folders_are_skipped(
    driver: LocalNodeDriver, make_nodes: MakeNodes
) -> None:
    [node] = make_nodes(1)
    meta = json.loads((Path(node.extra["node_dir"]) / "meta.json").read_text())
    assert meta["id"] == node.id and meta["pid"] == node.extra["pid"]
    junk = driver.root / "junk-0000"
    junk.mkdir()
    try:
        assert [n.id for n in driver.list_nodes()] == [node.id]
    finally:
        junk.rmdir()


def test_destroy_is_idempotent(driver: LocalNodeDriver, make_nodes: MakeNodes) -> None:
    [node] = make_nodes(1)
    assert driver.destroy_node(node) is True
    assert driver.destroy_node(node) is True
    assert driver.destroy_node(Node("never-made-0000", "x", NodeState.UNKNOWN, [], [], driver)) is True
    with pytest.raises(ValueError, match="not a local node id"):
        driver.destroy_node(Node("../escape", "x", NodeState.UNKNOWN, [], [], driver))


def test_quota_when_no_address_is_free(nodes_root: Path, fleet_key: Any) -> None:
    driver = LocalNodeDriver(root=nodes_root, first_address=253, port=2297)
    size, image, auth = driver.list_sizes()[0], driver.list_images()[0], NodeAuthSSHKey(fleet_key.public)
    try:
        nodes = [driver.create_node(f"n{i}", size, image, auth=auth) for i in range(2)]
        assert sorted(n.public_ips[0] for n in nodes) == ["127.0.0.253", "127.0.0.254"]
        with pytest.raises(QuotaExceededError, match="no free loopback address") as caught:
            driver.create_node("n2", size, image, auth=auth)
        assert caught.value.quota == 2
    finally:
        for node in driver.list_nodes():
            driver.destroy_node(node)


def test_an_address_someone_listens_on_is_skipped(nodes_root: Path, fleet_key: Any) -> None:
    driver = LocalNodeDriver(root=nodes_root, first_address=200, port=2299)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.200", 2299))
        squatter.listen()
        try:
            node = driver.create_node(
                "s", driver.list_sizes()[0], driver.list_images()[0], auth=NodeAuthSSHKey(fleet_key.public)
            )
            assert node.public_ips == ["127.0.0.201"]
            assert node.extra["port"] == 2299
        finally:
            for node in driver.list_nodes():
                driver.destroy_node(node)


def test_parallel_creates_get_distinct_addresses(driver: LocalNodeDriver, fleet_key: Any) -> None:
    made: list[Node] = []
    errors: list[BaseException] = []

    def create(i: int) -> None:
        try:
            made.append(
                driver.create_node(
                    f"p{i}", driver.list_sizes()[0], driver.list_images()[0], auth=NodeAuthSSHKey(fleet_key.public)
                )
            )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len({n.public_ips[0] for n in made}) == 8
    assert all(n.state == NodeState.RUNNING for n in driver.list_nodes())


def test_ex_kill_node_leaves_a_stopped_node_that_starts_again(
    driver: LocalNodeDriver, make_nodes: MakeNodes, target_of: TargetOf, node_processes: ProcessesOf
) -> None:
    [node] = make_nodes(1)
    with SSHSession(target_of(node)) as session:
        session.run("nohup sleep 1000 >/dev/null 2>&1 &", check=True)
        assert driver.ex_kill_node(node) is True

    assert node_processes(node.id, node.extra["node_dir"]) == []
    [listed] = driver.list_nodes()
    assert listed.state == NodeState.STOPPED
    assert Path(node.extra["node_dir"]).is_dir()

    assert driver.start_node(listed) is True
    [restarted] = driver.list_nodes()
    assert restarted.state == NodeState.RUNNING
    assert restarted.public_ips == node.public_ips
    assert restarted.extra["host_key"] == node.extra["host_key"]
    with SSHSession(target_of(restarted)) as session:
        assert session.run("echo $ORCH_NODE_ID").stdout.strip() == node.id


def test_a_reused_pid_does_not_count_as_running(driver: LocalNodeDriver, make_nodes: MakeNodes) -> None:
    [node] = make_nodes(1)
    driver.ex_kill_node(node)
    meta_file = Path(node.extra["node_dir"]) / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["pid"] = os.getpid()  # a live process that is not the node's sshd
    meta_file.write_text(json.dumps(meta))
    assert driver.list_nodes()[0].state == NodeState.STOPPED


def test_a_cloud_config_host_key_is_the_one_the_node_offers(
    driver: LocalNodeDriver, make_nodes: MakeNodes, target_of: TargetOf
) -> None:
    """As cloud-init does with ``ssh_keys``: the node takes the host key of its user data,
    so a session that pins the key orch made before asking for the node gets in."""
    key = HostKey.generate()
    [node] = make_nodes(1, ex_userdata=cloud_config(key))
    assert node.extra["host_key"] == key.public
    with SSHSession(dataclasses.replace(target_of(node), host_key=key.public)) as session:
        assert session.run("true").ok
    with pytest.raises(HostKeyMismatch):
        SSHSession(dataclasses.replace(target_of(node), host_key=HostKey.generate().public))
    with pytest.raises(ValueError, match="not a readable #cloud-config"):
        make_nodes(1, name="bad", ex_userdata="#cloud-config\nssh_keys: [\n")
    assert [n.id for n in driver.list_nodes()] == [node.id]


def test_only_ssh_key_auth_is_accepted(driver: LocalNodeDriver) -> None:
    size, image = driver.list_sizes()[0], driver.list_images()[0]
    with pytest.raises(ValueError, match="NodeAuthSSHKey"):
        driver.create_node("x", size, image)
    with pytest.raises(ValueError, match="NodeAuthSSHKey"):
        driver.create_node("x", size, image, auth=NodeAuthPassword("secret"))
    with pytest.raises(ValueError, match="one OpenSSH public key line"):
        driver.create_node("x", size, image, auth=NodeAuthSSHKey("ssh-ed25519 AAAA\nssh-rsa BBBB"))
    assert driver.list_nodes() == []


def test_a_root_another_user_could_swap_is_refused_and_named(nodes_root: Path, fleet_key: Any) -> None:
    shared = nodes_root.parent / "shared"
    shared.mkdir(parents=True)
    shared.chmod(0o777)  # writable by all and not sticky: anyone could rename our folder
    driver = LocalNodeDriver(root=shared / "nodes")
    with pytest.raises(LocalDriverError, match=rf"another user could replace.*{shared} has mode 0777"):
        driver.create_node("x", driver.list_sizes()[0], driver.list_images()[0], auth=NodeAuthSSHKey(fleet_key.public))


def test_an_sshd_that_does_not_come_up_is_reported_and_cleaned_up(nodes_root: Path, fleet_key: Any) -> None:
    driver = LocalNodeDriver(root=nodes_root, start_timeout=0.0)  # no sshd listens within 0 s
    with pytest.raises(LocalDriverError, match=r"did not listen on 127\.0\.0\.\d+:2222 within 0\.0s"):
        driver.create_node("a", driver.list_sizes()[0], driver.list_images()[0], auth=NodeAuthSSHKey(fleet_key.public))
    assert driver.list_nodes() == []
    assert [p for p in driver.root.iterdir() if p.is_dir()] == []
    assert [pid for pid in _all_pids() if _cmdline(pid).find(str(driver.root).encode()) >= 0] == []


def test_a_sticky_shared_folder_such_as_tmp_is_accepted(nodes_root: Path, fleet_key: Any) -> None:
    sticky = nodes_root.parent / "sticky"
    sticky.mkdir(parents=True)
    sticky.chmod(0o1777)
    driver = LocalNodeDriver(root=sticky / "nodes")
    node = driver.create_node("s", driver.list_sizes()[0], driver.list_images()[0],
                              auth=NodeAuthSSHKey(fleet_key.public))
    try:
        config = (Path(node.extra["node_dir"]) / "sshd_config").read_text()
        assert "StrictModes no" in config  # sshd's own rule refuses sticky folders
    finally:
        driver.destroy_node(node)


def _all_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _alive(int(p.name))]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"
