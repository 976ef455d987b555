"""The fleet as an Ansible inventory, with the host keys still pinned.

``ansible_inventory`` turns node records into Ansible's YAML inventory structure: group
``all`` with one child group per family, hosts keyed by node id::

    all:
      vars:
        ansible_ssh_common_args: -o UserKnownHostsFile=/ws/.orch/known_hosts -o StrictHostKeyChecking=yes ...
      children:
        workers:
          hosts:
            workers-5d0c1a:
              ansible_host: 127.0.0.10
              ansible_port: 2222
              ansible_user: orch
              ansible_ssh_private_key_file: /ws/.orch/ssh/id_ed25519
              ansible_python_interpreter: /usr/bin/python3
              orch_path: /local/local/workers/workers-5d0c1a
              orch_family: workers

Ansible drives OpenSSH's ``ssh``, which knows nothing of our store, so the pinned keys
go to a known_hosts file of their own (``known_hosts_lines``, ``write_known_hosts``)
and ssh is told to use only that file and to refuse any host it does not match
(``StrictHostKeyChecking=yes``; the system-wide file is switched off so a stale entry
there cannot vouch for a node, and ssh may not rewrite our file).  Host key checking is
never disabled.

``orch inventory`` writes into that file every node that is up (booting, bootstrapping,
ready), not only the ones in the inventory it prints, so inventories written for
different families can share it; a stopped, failed or lost node's key is left out, so
it cannot vouch for whatever holds its address next.

>>> nodes = store.list_nodes(states=[NodeState.READY])                   # doctest: +SKIP
>>> write_known_hosts(ws, nodes)                                          # doctest: +SKIP
>>> yaml.safe_dump(ansible_inventory(ws, nodes))                          # doctest: +SKIP
"""

from __future__ import annotations

import os
import shlex
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from orchestrator.errors import InputError
from orchestrator.remote.fanout import ssh_target
from orchestrator.state import NodeRecord
from orchestrator.workspace import Workspace

PYTHON_INTERPRETER = "/usr/bin/python3"
RESERVED_GROUPS = frozenset({"all", "ungrouped"})
_DEFAULT_SSH_PORT = 22


def known_hosts_file(ws: Workspace) -> Path:
    """Where the workspace keeps the pinned host keys for OpenSSH (and so Ansible)."""
    return ws.runtime_dir / "known_hosts"


def group_name(family: str) -> str:
    """The Ansible group of a family: Ansible warns about ``-`` in group names."""
    if family in RESERVED_GROUPS:
        raise InputError(
            f"family {family!r} has the name of one of Ansible's implicit groups",
            hint=f"rename node_families/{family}.yaml; Ansible reserves {sorted(RESERVED_GROUPS)}",
        )
    return family.replace("-", "_")


def ssh_common_args(known_hosts: Path) -> str:
    """The ssh options that keep Ansible on our pinned keys and our key alone."""
    return " ".join([
        f"-o UserKnownHostsFile={shlex.quote(str(known_hosts))}",
        "-o GlobalKnownHostsFile=/dev/null",  # only our pins vouch for a node
        "-o StrictHostKeyChecking=yes",  # unknown or changed key: refuse
        "-o UpdateHostKeys=no",  # the node may not add keys to our file
        "-o IdentitiesOnly=yes",  # the fleet key, not whatever an agent holds
    ])


def known_host_line(node: NodeRecord) -> str | None:
    """``[addr]:port type base64`` for a node with an address and a pinned key, else None.

    OpenSSH writes a host on port 22 without brackets and looks it up that way.
    """
    parts = (node.host_key or "").split()
    if not node.address or len(parts) < 2:
        return None
    port = node.port or _DEFAULT_SSH_PORT
    host = node.address if port == _DEFAULT_SSH_PORT else f"[{node.address}]:{port}"
    return f"{host} {parts[0]} {parts[1]}"


def known_hosts_lines(nodes: Sequence[NodeRecord]) -> list[str]:
    """One known_hosts line per node, from the host keys pinned in the store.

    Nodes without an address or a pinned key are left out: with
    ``StrictHostKeyChecking=yes`` ssh refuses a host that has no line.
    """
    return [line for line in map(known_host_line, nodes) if line is not None]


def write_known_hosts(ws: Workspace, nodes: Sequence[NodeRecord]) -> Path:
    """Write (atomically, replacing it) the workspace's known_hosts for ``nodes``."""
    path = known_hosts_file(ws)
    lines = known_hosts_lines(nodes)
    write_text_atomically(path, "".join(line + "\n" for line in lines))
    return path


def ansible_inventory(ws: Workspace, nodes: Sequence[NodeRecord], *,
                      known_hosts: Path | None = None) -> dict[str, Any]:
    """Ansible's YAML inventory structure for ``nodes``, grouped by family.

    ``known_hosts``: the file ssh checks host keys against (default: the workspace's,
    see :func:`write_known_hosts`).  Raises RemoteError for a node without an address
    or a pinned host key, as orch's own SSH would.
    """
    children: dict[str, dict[str, Any]] = {}
    for node in sorted(nodes, key=lambda n: (n.family, n.id)):
        target = ssh_target(ws, node)  # the same address, user, key and pin orch itself uses
        hosts = children.setdefault(group_name(node.family), {"hosts": {}})["hosts"]
        hosts[node.id] = {
            "ansible_host": target.host,
            "ansible_port": target.port,
            "ansible_user": target.user,
            "ansible_ssh_private_key_file": str(target.key_file),
            "ansible_python_interpreter": PYTHON_INTERPRETER,
            "orch_path": node.path,
            "orch_family": node.family,
        }
    common = ssh_common_args(known_hosts or known_hosts_file(ws))
    return {"all": {"vars": {"ansible_ssh_common_args": common}, "children": children}}


def write_text_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that no reader sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
