"""``netns``: libcloud nodes that are ``sshd`` processes in Linux network namespaces (root).

Each node looks like a machine of its own: a network namespace ``orch-<id>`` with ``lo``
and an ``eth0`` (one end of a veth pair whose other end, ``orch<hash>``, is a port of
the provider's bridge), its own address on a private subnet, hostname and ``/root``::

    host: bridge orchbr0 10.213.0.1/24 ─┬─ orch1a2b3c4d ══ eth0 10.213.0.10  node w0
                                        └─ orch5e6f7a8b ══ eth0 10.213.0.11  node w1

The node folder is the local driver's (:mod:`~orchestrator.provision.drivers.nodefolders`:
``meta.json`` first, host key, sshd_config, home/), and so are the code that finds, spawns
and ends a node's processes (:mod:`~orchestrator.provision.drivers.processes`) and the
record's reading as a Node (``LocalNodeDriver.node_from_record``).  What this module adds:

- sshd starts as ``ip netns exec NS unshare --uts --mount --propagation private sh -c
  'hostname ID; mount --bind HOME /root; exec sshd ...'``: one pid that becomes sshd,
  with the node's hostname and, in its own mount namespace, the node's home over the
  passwd home, so the ``~/.bashrc`` bash sources for every SSH command is the node's.
- A node's processes are also those whose ``/proc/PID/ns/net`` is the inode of
  ``/run/netns/orch-<id>``, whatever their environment.  ``destroy_node`` ends them,
  deletes the veth *before* the namespace (a deleted namespace takes its veth down
  asynchronously), then the namespace, the folder, and the bridge with the last node.
- Interface names derive from the node id, so a node without ``meta.json`` is still
  cleaned up; only interfaces carrying our alias (``orch-netns:...``) are ever deleted,
  and a bridge name or subnet that something else uses is refused.
- ``ip_forward``, firewall rules and other interfaces are never touched: nodes reach
  this host and each other, nothing beyond.

>>> driver = NetnsNodeDriver(root="/srv/ws/.orch/drivers/netns/lab", subnet="10.213.0.0/24")  # doctest: +SKIP
>>> node = driver.create_node("w1", driver.list_sizes()[0], driver.list_images()[0],
...                           auth=NodeAuthSSHKey(pubkey))                                   # doctest: +SKIP
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import pwd
import re
import secrets
import shutil
from pathlib import Path
from typing import Any

from libcloud.compute.base import Node, NodeAuthPassword, NodeAuthSSHKey, NodeDriver, NodeImage, NodeLocation, NodeSize
from libcloud.compute.types import NodeState

from orchestrator.provision.drivers.features import DriverFeatures
from orchestrator.provision.drivers.local import SSHD_NODE_STATES, LocalNodeDriver
from orchestrator.provision.drivers.netplumbing import (
    RUN_NETNS,
    SYS_NET,
    TOOL_ENV,
    TOOL_PATH,
    NetnsDriverError,
    alias_of,
    host_lock,
    link_state,
    netns_name,
    netns_processes,
    our_interface,
    run_ip,
    run_ip_batch,
    subnet_in_use,
    tool_path,
    veth_name,
)
from orchestrator.provision.drivers.nodefolders import (
    META,
    QuotaExceededError,
    new_id,
    node_id_of,
    read_json,
    read_records,
    root_lock,
    write_json,
    write_node_files,
)
from orchestrator.provision.drivers.processes import (
    ENV_MARKER,
    end_processes,
    node_processes,
    spawn,
    sshd_alive,
    sshd_argv,
    this_process,
    wait_for_sshd,
)

_FIRST_HOST = 10  # node addresses: .10 upward; .1 is the bridge
_BRIDGE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")  # IFNAMSIZ - 1
_UNSHARE = ("--uts", "--mount", "--propagation", "private")  # own hostname, own mounts
# sh's positional parameters: no quoting of paths or ids needed.
_NODE_INIT = 'hostname "$1" && mount --bind "$2" "$3" && shift 3 && exec "$@"'


class NetnsNodeDriver(NodeDriver):
    """Nodes that are sshd processes in network namespaces on a bridge of this machine."""

    type = "netns"
    name = "Network namespace sshd nodes"
    website = "https://man7.org/linux/man-pages/man8/ip-netns.8.html"
    features = {"create_node": ["ssh_key"]}  # noqa: RUF012
    orch_features = DriverFeatures(tags="ex_tags", ssh_key="auth", node_folders=True)
    NODE_STATE_MAP = SSHD_NODE_STATES

    def __init__(
        self,
        key: str | None = None,
        secret: str | None = None,
        *,
        root: str | os.PathLike[str],
        max_nodes: int | None = None,
        subnet: str = "10.213.0.0/24",
        bridge: str = "orchbr0",
        port: int = 22,
        start_timeout: float = 5.0,
    ) -> None:
        network = ipaddress.IPv4Network(subnet)  # ValueError names a malformed subnet
        if not network.is_private or not 16 <= network.prefixlen <= 28:
            raise ValueError(f"subnet must be a private IPv4 network from /16 to /28, not {subnet}")
        if not _BRIDGE_RE.match(bridge):
            raise ValueError(f"bridge must be an interface name of 1-15 letters, digits, '_.-', not {bridge!r}")
        # The local driver checks the root, holds the host keys and reads a record as a Node.
        self._disk = LocalNodeDriver(root=root, max_nodes=max_nodes, port=port, start_timeout=start_timeout)
        self.root = self._disk.root
        self.max_nodes = max_nodes
        self.subnet = network
        self.gateway = str(network[1])
        self.bridge = bridge
        self.ssh_port = port
        self.start_timeout = start_timeout
        self._bridge_alias = alias_of(f"bridge:{self.root}")
        super().__init__(key or "netns", secret)  # type: ignore[no-untyped-call]

    # -- catalogue -------------------------------------------------------------------

    def list_sizes(self, location: NodeLocation | None = None) -> list[NodeSize]:
        sizes = self._disk.list_sizes()
        for size in sizes:
            size.id = size.name = size.id.replace("local-", "netns-")
            size.driver = self
        return sizes

    def list_images(self, location: NodeLocation | None = None) -> list[NodeImage]:
        return [NodeImage(i.id, i.name, self, extra=i.extra) for i in self._disk.list_images()]

    def list_locations(self) -> list[NodeLocation]:
        return [NodeLocation("netns", "netns", "ZZ", self)]

    # -- nodes -----------------------------------------------------------------------

    def create_node(
        self,
        name: str,
        size: NodeSize,
        image: NodeImage,
        location: NodeLocation | None = None,
        auth: NodeAuthSSHKey | NodeAuthPassword | None = None,
        ex_tags: dict[str, str] | None = None,
    ) -> Node:
        if not isinstance(auth, NodeAuthSSHKey):
            raise ValueError("the netns driver needs auth=NodeAuthSSHKey(public_key); no other auth works")
        pubkey = auth.pubkey.strip()
        if "\n" in pubkey or not pubkey.startswith(("ssh-", "ecdsa-", "sk-")):
            raise ValueError("auth.pubkey must be one OpenSSH public key line ('ssh-ed25519 AAAA...')")
        if self._size(size.id) is None:
            raise ValueError(f"unknown size {size.id!r}; list_sizes() offers {[s.id for s in self.list_sizes()]}")
        if image.id != "host":
            raise ValueError(f"unknown image {image.id!r}; the only image is 'host'")
        if location is not None and location.id != "netns":
            raise ValueError(f"unknown location {location.id!r}; the only location is 'netns'")
        self._require_host()
        self._disk.prepare_root()
        with root_lock(self.root):
            metas = read_records(self.root)
            if self.max_nodes is not None and len(metas) >= self.max_nodes:
                raise QuotaExceededError(
                    f"quota reached: {len(metas)} of max_nodes={self.max_nodes} netns nodes exist under {self.root}",
                    quota=self.max_nodes,
                    driver=self,
                )
            address = self._free_address({m["address"] for m in metas})
            node_id = new_id(name)
            node_dir = self.root / node_id
            node_dir.mkdir(mode=0o700)
            meta: dict[str, Any] = {
                "id": node_id,
                "name": name,
                "address": address,
                "port": self.ssh_port,
                "ssh_user": pwd.getpwuid(os.geteuid()).pw_name,
                "host_key": "",
                "size": size.id,
                "image": image.id,
                "tags": dict(ex_tags or {}),
                "node_dir": str(node_dir),
                "pid": None,
                "creator": this_process(),  # a create killed half way is listed stopped at once
                "created_at": dt.datetime.now(dt.UTC).isoformat(),
                "netns": netns_name(node_id),
                "veth": veth_name(node_id),
                "bridge": self.bridge,
                "subnet": str(self.subnet),
            }
            write_json(node_dir / META, meta)
            try:
                meta["host_key"] = write_node_files(node_dir, meta, pubkey, strict_modes=self._disk.strict_modes)
                write_json(node_dir / META, meta)
                self._ensure_bridge()
                self._plug(meta)
            except BaseException:
                self._destroy(node_id)
                raise
        try:
            self._start_sshd(meta)
        except BaseException:
            with root_lock(self.root):
                self._destroy(node_id)
            raise
        return self._to_node(meta)

    def list_nodes(self) -> list[Node]:
        return [self._to_node(meta) for meta in read_records(self.root)]

    def destroy_node(self, node: Node) -> bool:
        """End the node's processes, delete its veth, namespace and folder; the bridge
        goes with the last node.  Destroying a destroyed node is a no-op."""
        self._require_host()
        node_id = node_id_of(node)
        with root_lock(self.root):
            self._destroy(node_id)
        return True

    def stop_node(self, node: Node) -> bool:
        """End every process of the node (SIGTERM, then SIGKILL); keep namespace and folder."""
        self._require_host()
        self._kill(node_id_of(node), graceful=True)
        return True

    def start_node(self, node: Node) -> bool:
        """Start a stopped node again with the same address and host key, rebuilding its
        namespace and veth if they are gone."""
        self._require_host()
        meta = self._disk.node_record(node_id_of(node))
        if not sshd_alive(Path(meta["node_dir"]), meta.get("pid")):
            with root_lock(self.root):
                self._kill(meta["id"], graceful=False)
                self._unplug(meta["id"])
                self._ensure_bridge()
                self._plug(meta)
            self._start_sshd(meta)
        return True

    def reboot_node(self, node: Node) -> bool:
        return self.stop_node(node) and self.start_node(node)

    def ex_kill_node(self, node: Node) -> bool:
        """SIGKILL everything in the node at once; keep namespace and folder (fault injection)."""
        self._require_host()
        self._kill(node_id_of(node), graceful=False)
        return True

    def ex_cut_link(self, node: Node) -> bool:
        """Set the node's host-side veth down: it runs on, unreachable (a network partition)."""
        return self._set_link(node, "down")

    def ex_restore_link(self, node: Node) -> bool:
        """Undo :meth:`ex_cut_link`."""
        return self._set_link(node, "up")

    def ex_remove_namespace(self, node: Node) -> bool:
        """The machine vanishes: the link goes first (peers see silence, no reset), then
        every process dies and the namespace is deleted.  The folder stays, so the node
        lists as stopped; ``destroy_node`` or ``start_node`` settle it."""
        self._require_host()
        node_id = node_id_of(node)
        veth = veth_name(node_id)
        if our_interface(veth, alias_of(f"node:{node_id}")):
            run_ip("link", "del", "dev", veth)
        self._kill(node_id, graceful=False)
        self._unplug(node_id)
        return True

    def ex_host_key(self, node: Node) -> str:
        """The node's public host key line, ``ssh-ed25519 AAAA...``."""
        return self._disk.ex_host_key(node)

    def _to_node(self, meta: dict[str, Any]) -> Node:
        node = self._disk.node_from_record(meta)  # local's record, then made this driver's
        if not (RUN_NETNS / meta["netns"]).exists():
            node.extra["status"] = "stopped"
        node.state = self.NODE_STATE_MAP.get(node.extra["status"], NodeState.UNKNOWN)
        node.driver, node.size, node.image = self, self._size(meta["size"]), self.list_images()[0]
        node.extra.update({key: meta[key] for key in ("netns", "veth", "bridge", "subnet")},
                          link=link_state(meta["veth"]),
                          gateway=str(ipaddress.IPv4Network(meta["subnet"])[1]))  # the bridge: this machine
        return node

    def _size(self, size_id: str) -> NodeSize | None:
        return next((s for s in self.list_sizes() if s.id == size_id), None)

    # -- network ---------------------------------------------------------------------

    def _require_host(self) -> None:
        if os.geteuid() != 0:
            raise NetnsDriverError(
                "the netns driver needs root (it adds network namespaces, veths and a bridge); "
                "run orch as root, or use the local driver",
                driver=self,
            )
        for tool, package in (("ip", "iproute2"), ("unshare", "util-linux"), ("hostname", "hostname")):
            if shutil.which(tool, path=TOOL_PATH) is None:
                raise NetnsDriverError(f"`{tool}` is missing: install {package}", driver=self)
        if not Path("/proc/self/ns/net").exists():
            raise NetnsDriverError("this kernel has no network namespaces (CONFIG_NET_NS)", driver=self)

    def _free_address(self, taken: set[str]) -> str:
        hosts = list(self.subnet.hosts())[_FIRST_HOST - 1 :]
        for address in map(str, hosts):
            if address not in taken:
                return address
        raise QuotaExceededError(
            f"no free address in {self.subnet} (.{_FIRST_HOST} upward): {len(hosts)} netns nodes exist",
            quota=len(hosts),
            driver=self,
        )

    def _ensure_bridge(self) -> None:
        """Create the bridge, marked ours, when it is not there; then give it .1 and up."""
        with host_lock():
            exists = (SYS_NET / self.bridge).exists()
            if exists and not self._bridge_is_ours():
                raise NetnsDriverError(
                    f"interface {self.bridge} exists and is not the bridge of the netns nodes under "
                    f"{self.root}: give this provider another bridge= (and subnet=)",
                    driver=self,
                )
            conflict = None if exists else subnet_in_use(self.subnet)
            if conflict:
                raise NetnsDriverError(
                    f"subnet {self.subnet} is in use on this machine ({conflict}): give this provider "
                    "a free private subnet=, such as another 10.213.N.0/24",
                    driver=self,
                )
            if not exists:
                # A bridge without a MAC of its own takes its lowest port's, so adding a
                # node could change the gateway's MAC under nodes that cached it: their
                # replies then go nowhere until ARP gives up (seen: 13 s without a banner).
                mac = "02:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(5))
                # The kernel takes no alias with a new link: the mark is a second step, so
                # the intent is written first; a process killed between the two leaves a
                # bridge this provider still knows as its own.
                write_json(self._bridge_intent, {"bridge": self.bridge})
                try:
                    run_ip("link", "add", "name", self.bridge, "address", mac, "type", "bridge",
                           "forward_delay", "0")
                except NetnsDriverError:  # not made: whatever has the name now is not ours
                    self._bridge_intent.unlink(missing_ok=True)
                    raise
            if not our_interface(self.bridge, self._bridge_alias):
                run_ip("link", "set", "dev", self.bridge, "alias", self._bridge_alias)
            self._bridge_intent.unlink(missing_ok=True)
            run_ip_batch(
                f"address replace {self.gateway}/{self.subnet.prefixlen} dev {self.bridge}",
                f"link set dev {self.bridge} up",
            )

    @property
    def _bridge_intent(self) -> Path:
        return self.root / ".bridge-intent.json"

    def _bridge_is_ours(self) -> bool:
        """Marked ours, or unmarked and named by our intent (a create killed half way)."""
        if our_interface(self.bridge, self._bridge_alias):
            return True
        intent = read_json(self._bridge_intent) or {}
        return intent.get("bridge") == self.bridge and our_interface(self.bridge, "")

    def _remove_bridge_if_unused(self) -> None:
        with host_lock():
            ports = SYS_NET / self.bridge / "brif"
            if self._bridge_is_ours() and not any(ports.iterdir()):
                run_ip("link", "del", "dev", self.bridge)
            if not (SYS_NET / self.bridge).exists():
                self._bridge_intent.unlink(missing_ok=True)

    def _plug(self, meta: dict[str, Any]) -> None:
        """The namespace, and a veth pair from the bridge to its ``eth0``."""
        ns, veth = meta["netns"], meta["veth"]
        run_ip_batch(
            f"netns add {ns}",
            f"link add {veth} type veth peer name eth0 netns {ns}",
            f"link set dev {veth} alias {alias_of('node:' + meta['id'])}",
            f"link set dev {veth} master {self.bridge} up",
            # The host may remember the address with a gone node's MAC: 5 s of silence.
            f"neigh flush to {meta['address']} dev {self.bridge}",
        )
        run_ip_batch(
            "link set dev lo up",
            f"address add {meta['address']}/{self.subnet.prefixlen} dev eth0",
            "link set dev eth0 up",
            f"route add default via {self.gateway}",
            netns=ns,
        )

    def _unplug(self, node_id: str) -> None:
        """Delete the node's veth, then its namespace: each only when there and ours."""
        veth, ns = veth_name(node_id), netns_name(node_id)
        lines = [f"link del dev {veth}"] if our_interface(veth, alias_of(f"node:{node_id}")) else []
        if (RUN_NETNS / ns).exists():
            lines.append(f"netns del {ns}")
        if lines:
            run_ip_batch(*lines)

    def _set_link(self, node: Node, state: str) -> bool:
        self._require_host()
        node_id = node_id_of(node)
        veth = veth_name(node_id)
        if not our_interface(veth, alias_of(f"node:{node_id}")):
            raise NetnsDriverError(f"node {node_id} has no link (veth {veth}) to set {state}", driver=self)
        run_ip("link", "set", "dev", veth, state)
        return True

    # -- processes -------------------------------------------------------------------

    def _start_sshd(self, meta: dict[str, Any]) -> None:
        node_dir = Path(meta["node_dir"])
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation folder
        home = pwd.getpwnam(meta["ssh_user"]).pw_dir
        node_init = ["sh", "-c", _NODE_INIT, "sh", meta["id"], str(node_dir / "home"), home]
        argv = [tool_path("ip"), "netns", "exec", meta["netns"], tool_path("unshare"), *_UNSHARE, *node_init]
        argv += sshd_argv(node_dir)  # what sshd's title shows, as the liveness check expects
        # Not our environment: the orch process may hold credentials.
        pid = spawn(argv, {**TOOL_ENV, ENV_MARKER: meta["id"]}, node_dir / "sshd.log")
        meta["pid"] = pid  # ip, unshare and sh each exec the next: this pid becomes sshd
        write_json(node_dir / META, meta)
        problem = wait_for_sshd(pid, meta["id"], meta["address"], meta["port"], node_dir / "sshd.log",
                                timeout=self.start_timeout, connect_timeout=0.5)
        if problem:
            raise NetnsDriverError(problem, driver=self)

    def _kill(self, node_id: str, *, graceful: bool) -> None:
        """End every process of the node: those in its namespace, its sshd's tree, and all
        carrying its env marker."""
        node_dir, netns = self.root / node_id, netns_name(node_id)
        # Killed at once, the node's processes are stopped first, as for a local node: a
        # machine dies whole, none of its processes sees another die and answers for it.
        left = end_processes(lambda: node_processes(node_id, node_dir) | netns_processes(netns),
                             graceful=graceful, stop_first=not graceful)
        if left:
            raise NetnsDriverError(f"processes {sorted(left)} of node {node_id} survive SIGKILL", driver=self)

    def _destroy(self, node_id: str) -> None:
        """Under the root lock: processes, veth, namespace, folder; the bridge if last."""
        self._kill(node_id, graceful=True)
        self._unplug(node_id)
        shutil.rmtree(self.root / node_id, ignore_errors=True)
        if (self.root / node_id).exists():
            raise NetnsDriverError(f"could not remove {self.root / node_id}", driver=self)
        if not read_records(self.root):
            self._remove_bridge_if_unused()

