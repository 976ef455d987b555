"""The host's network plumbing for netns nodes, through iproute2's ``ip`` and /sys.

This module owns what the ``netns`` driver does to this machine's network, below the
driver's decisions:

- the names it gives: a node's namespace ``orch-<id>`` (``netns_name``) and host-side
  veth ``orch<hash>`` (``veth_name``), derived from the id so that a node without
  ``meta.json`` is still cleaned up;
- the ifalias that marks an interface as ours (``alias_of``, ``our_interface``): only
  interfaces carrying it are ever deleted; a link's state (``link_state``);
- running ``ip`` (``run_ip``, ``run_ip_batch``) and the other system tools (``tool_path``)
  with a fixed PATH and environment (``TOOL_PATH``, ``TOOL_ENV``), never ours;
- the host-wide lock that bridges of all roots are made under (``host_lock``), and
  whether a subnet is in use on this machine (``subnet_in_use``);
- the processes inside a namespace (``netns_processes``);
- ``NetnsDriverError``: it lives here, the lowest module that raises it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from orchestrator.provision.drivers.nodefolders import LocalDriverError
from orchestrator.provision.drivers.processes import proc_table

TOOL_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
TOOL_ENV = {"PATH": TOOL_PATH, "LANG": "C.UTF-8"}
SYS_NET = Path("/sys/class/net")
RUN_NETNS = Path("/run/netns")
# Bridges of all roots are created under one lock, so two cannot take one subnet.
_HOST_LOCK = "/run/lock/orch-netns.lock"


class NetnsDriverError(LocalDriverError):
    """The netns driver cannot do what was asked (not root, no ``ip``, a taken bridge)."""


def netns_processes(netns: str) -> dict[int, int]:
    """pid -> start time of every process in the named network namespace (none when the
    namespace does not exist; never the host's own)."""
    try:
        target = os.stat(RUN_NETNS / netns)
    except OSError:
        return {}
    key = (target.st_dev, target.st_ino)
    if key == _ns_key(1) or key == _ns_key(os.getpid()):
        return {}
    return {pid: start for pid, (_, start) in proc_table().items() if _ns_key(pid) == key}


def subnet_in_use(subnet: ipaddress.IPv4Network) -> str | None:
    """What on this machine already uses addresses of ``subnet`` (an interface address
    or a route, in any table), or None."""
    for iface in json.loads(run_ip("-json", "-4", "address", "show")):
        for info in iface.get("addr_info", []):
            net = ipaddress.IPv4Interface(f"{info['local']}/{info['prefixlen']}").network
            if net.overlaps(subnet):
                return f"address {info['local']}/{info['prefixlen']} on {iface['ifname']}"
    for route in json.loads(run_ip("-json", "-4", "route", "show", "table", "all")):
        if route.get("dst", "default") != "default" and ipaddress.IPv4Network(route["dst"]).overlaps(subnet):
            return f"route {route['dst']} via {route.get('dev', '?')}"
    return None


def _ns_key(pid: int) -> tuple[int, int] | None:
    try:
        st = os.stat(f"/proc/{pid}/ns/net")
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def netns_name(node_id: str) -> str:
    """The name of the node's network namespace (``/run/netns/orch-<id>``)."""
    return f"orch-{node_id}"


def veth_name(node_id: str) -> str:
    """``orch`` + 8 hex of the id's hash: 12 characters (an interface name has 15)."""
    return "orch" + hashlib.sha256(node_id.encode()).hexdigest()[:8]


def alias_of(what: str) -> str:
    """The ifalias that marks an interface as ours (at most 255 bytes, no spaces)."""
    alias = f"orch-netns:{what}"
    return alias if len(alias) <= 255 else f"orch-netns:{hashlib.sha256(what.encode()).hexdigest()}"


def our_interface(name: str, alias: str) -> bool:
    """Whether interface ``name`` exists and carries our ``alias``."""
    try:
        return (SYS_NET / name / "ifalias").read_text().strip() == alias
    except OSError:
        return False


def link_state(veth: str) -> str:
    """``up``, ``down`` (administratively, see ex_cut_link) or ``absent``."""
    try:
        flags = int((SYS_NET / veth / "flags").read_text(), 16)
    except OSError:
        return "absent"
    return "up" if flags & 0x1 else "down"


def run_ip(*args: str, stdin: str | None = None) -> str:
    """Run ``ip ARGS`` and return its output; ``NetnsDriverError`` with its stderr when it fails."""
    command = [tool_path("ip"), *args]
    done = subprocess.run(command, input=stdin, capture_output=True, text=True, env=TOOL_ENV, check=False)
    if done.returncode != 0:
        shown = " ".join(command) + (f" <<< {stdin.strip()!r}" if stdin else "")
        raise NetnsDriverError(f"`{shown}` failed: {done.stderr.strip() or done.returncode}")
    return done.stdout


def run_ip_batch(*lines: str, netns: str | None = None) -> None:
    """Several ``ip`` commands in one process (``ip -batch``): it stops at the first error."""
    run_ip(*(["-n", netns] if netns else []), "-batch", "-", stdin="\n".join(lines) + "\n")


def tool_path(name: str) -> str:
    """The absolute path of a system tool (the driver's ``_require_host`` has checked it is there)."""
    return shutil.which(name, path=TOOL_PATH) or name


@contextlib.contextmanager
def host_lock() -> Iterator[None]:
    """The machine-wide lock of the netns drivers (``/run/lock/orch-netns.lock``)."""
    fd = os.open(_HOST_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
