"""The fleet for OpenSSH and Ansible (an inventory, an ssh_config, an ``ssh`` command
line), with the host keys still pinned.

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
it cannot vouch for whatever holds its address next.  ``orch ssh`` rewrites it the same
way before it runs ``ssh``, so a config exported earlier keeps working for every node up.

``ssh_config`` is the same fleet as an ssh_config(5) file, one ``Host NODE_ID`` block a
node (``ssh -F FILE NODE_ID``, ``scp -F FILE ...``); ``ssh_command`` is the ``ssh``
command line that reaches one node (``orch ssh``).  Neither needs paramiko: only the
node's record, the fleet key and the known_hosts file.

>>> nodes = store.list_nodes(states=[NodeState.READY])                   # doctest: +SKIP
>>> write_known_hosts(ws, nodes)                                          # doctest: +SKIP
>>> yaml.safe_dump(ansible_inventory(ws, nodes))                          # doctest: +SKIP
"""

from __future__ import annotations

import os
import re
import shlex
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from orchestrator.errors import InputError, RemoteError
from orchestrator.state import NodeRecord, NodeState
from orchestrator.workspace import Workspace

PYTHON_INTERPRETER = "/usr/bin/python3"
RESERVED_GROUPS = frozenset({"all", "ungrouped"})
_DEFAULT_SSH_PORT = 22
UP_STATES = (NodeState.BOOTING, NodeState.BOOTSTRAPPING, NodeState.READY)
"""The states whose nodes' keys go into the known_hosts file (``fleet.UP``)."""
_HOST_ALIAS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # no space, glob, negation or comma


class Endpoint(NamedTuple):
    """Where and as whom a node is reached: what ``fanout.ssh_target`` gives orch's own SSH."""

    host: str
    port: int
    user: str
    key_file: Path


def endpoint(ws: Workspace, node: NodeRecord) -> Endpoint:
    """The node's address, port and user from the store, and the fleet key (absolute).

    Raises RemoteError for a node without an address or a pinned host key, as orch's own
    SSH (``fanout.ssh_target``) would: ssh could not check it.
    """
    if not (node.address and node.ssh_user and node.host_key):
        raise RemoteError(f"node {node.id} has no address or pinned host key", hint="wait for it to boot")
    return Endpoint(node.address, node.port or _DEFAULT_SSH_PORT, node.ssh_user, ws.ssh_key.absolute())


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


def pinning_options(known_hosts: Path, key_file: Path | None = None) -> list[tuple[str, str]]:
    """The ssh_config(5) options that keep OpenSSH on our pinned keys and our key alone.

    ``key_file``: the fleet key, as ``IdentityFile`` (Ansible passes it on its own).
    """
    key = [("IdentityFile", str(key_file))] if key_file is not None else []
    return [
        *key,
        ("IdentitiesOnly", "yes"),  # the fleet key, not whatever an agent holds
        ("UserKnownHostsFile", str(known_hosts)),
        ("GlobalKnownHostsFile", "/dev/null"),  # only our pins vouch for a node
        ("StrictHostKeyChecking", "yes"),  # unknown or changed key: refuse
        ("UpdateHostKeys", "no"),  # the node may not add keys to our file
    ]


def config_value(text: str, *, what: str = "value") -> str:
    """``text`` as one ssh_config(5) argument, read back by ssh as exactly ``text``.

    ssh expands ``%`` tokens in paths (``%%`` is a ``%``) and splits on blanks, quotes and
    ``#``, so anything but plain characters goes in double quotes, ``\\`` and ``"``
    escaped.  A line break cannot be written at all.
    """
    if "\n" in text or "\r" in text or "\0" in text:
        raise InputError(f"the {what} {text!r} holds a line break, which ssh_config cannot express",
                         hint="move the workspace to a path without one")
    text = text.replace("%", "%%")
    if re.fullmatch(r"[A-Za-z0-9_./:@+%-]+", text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def ssh_common_args(known_hosts: Path) -> str:
    """The ssh options that keep Ansible on our pinned keys and our key alone."""
    return " ".join(f"-o {key}={shlex.quote(config_value(value, what=key))}"
                    for key, value in pinning_options(known_hosts))


def ssh_config(ws: Workspace, nodes: Sequence[NodeRecord], *, known_hosts: Path | None = None) -> str:
    """An ssh_config(5) file with one ``Host NODE_ID`` block per node, sorted by id.

    ``known_hosts``: the file of pinned keys (default: the workspace's, see
    :func:`write_known_hosts`).  Raises RemoteError for a node without an address or a
    pinned host key, InputError for a node id ssh would read as a pattern.
    """
    known_hosts = (known_hosts or known_hosts_file(ws)).absolute()
    lines = [
        "# The fleet's nodes for OpenSSH, written by `orch inventory --format ssh-config`:",
        "#   ssh -F THIS_FILE NODE_ID    scp -F THIS_FILE FILE NODE_ID:PATH",
        "# Host keys are pinned in the UserKnownHostsFile below, which orch inventory and orch ssh",
        "# rewrite from the store; a node whose key differs from its pin is refused.",
    ]
    for node in sorted(nodes, key=lambda n: n.id):
        if not _HOST_ALIAS.match(node.id):
            raise InputError(f"node id {node.id!r} cannot be an ssh_config Host name",
                             hint="node ids are letters, digits and _.-")
        where = endpoint(ws, node)
        options = [("HostName", where.host), ("Port", str(where.port)), ("User", where.user),
                   *pinning_options(known_hosts, where.key_file)]
        lines += ["", f"Host {node.id}", *(f"    {key} {config_value(value, what=key)}" for key, value in options)]
    return "\n".join(lines) + "\n"


def ssh_command(ws: Workspace, node: NodeRecord, command: Sequence[str] = (), *,
                known_hosts: Path | None = None, ssh: str = "ssh") -> list[str]:
    """The ``ssh`` command line that reaches ``node`` as ``ssh host command`` would.

    Every option is on the command line, where it beats the user's ssh_config; the
    destination follows ``--`` so that a command starting with ``-`` stays the command.
    """
    where = endpoint(ws, node)
    known_hosts = (known_hosts or known_hosts_file(ws)).absolute()
    argv = [ssh]
    for key, value in pinning_options(known_hosts, where.key_file):
        argv += ["-o", f"{key}={config_value(value, what=key)}"]
    return [*argv, "-p", str(where.port), "-l", where.user, "--", where.host, *command]


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
        target = endpoint(ws, node)  # the same address, user, key and pin orch itself uses
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
