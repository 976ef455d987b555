"""Network namespaces for netns nodes, seen with ``ip`` and /proc rather than through the
driver: is the machine able to run them, a subnet nothing uses, and what a node left."""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator.provision.drivers.netns import NetnsNodeDriver
from orchestrator.provision.drivers.netplumbing import subnet_in_use
from orchestrator.provision.drivers.processes import SSHD

ProcessesOf = Callable[[object, str | Path], list[int]]

IP = shutil.which("ip", path="/usr/sbin:/usr/bin:/sbin:/bin")


def netns_usable() -> bool:
    """Root, iproute2 with `ip netns`, and OpenSSH's sshd: what netns nodes need."""
    if os.geteuid() != 0 or IP is None or not Path(SSHD).exists():
        return False
    return subprocess.run([IP, "netns", "list"], capture_output=True, check=False).returncode == 0



def ip(*args: str) -> str:
    assert IP is not None
    return subprocess.run([IP, *args], capture_output=True, text=True, check=True).stdout


def netns_names() -> set[str]:
    return {line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()}


def link_names() -> set[str]:
    return {line.split(":")[1].strip().split("@")[0] for line in ip("-o", "link").splitlines()}


def netns_inode(name: str) -> tuple[int, int]:
    st = os.stat(f"/run/netns/{name}")
    return (st.st_dev, st.st_ino)


def pids_in_netns(key: tuple[int, int]) -> list[int]:
    """Live pids whose network namespace is ``key`` (device, inode), read from /proc."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            st = os.stat(proc / "ns" / "net")
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == key and stat[stat.rfind(")") + 2] not in "ZX":
            found.append(int(proc.name))
    return found


def free_subnet() -> str:
    """A 10.213.N.0/24 (N >= 100) that no address or route on this machine touches."""
    for n in range(100 + secrets.randbelow(100), 256):
        subnet = f"10.213.{n}.0/24"
        if subnet_in_use(ipaddress.IPv4Network(subnet)) is None:
            return subnet
    pytest.skip("no free 10.213.N.0/24 on this machine")


def leftovers(driver: NetnsNodeDriver, nodes: dict[str, str], processes_of: ProcessesOf) -> list[str]:
    """What still exists of these nodes (id -> node_dir) and of the driver's bridge."""
    found = []
    links = ip("-o", "link").splitlines()
    for node_id, node_dir in nodes.items():
        if processes_of(node_id, node_dir):
            found.append(f"processes of {node_id}: {processes_of(node_id, node_dir)}")
        if f"orch-{node_id}" in netns_names():
            found.append(f"namespace orch-{node_id}")
        found += [f"veth {line.split(':')[1].strip()}" for line in links if f"orch-netns:node:{node_id}" in line]
        if Path(node_dir).exists():
            found.append(f"folder {node_dir}")
    if driver.bridge in link_names():
        found.append(f"bridge {driver.bridge}")
    return found

