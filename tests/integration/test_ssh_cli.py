"""``orch ssh`` and ``orch inventory --format ssh-config``: OpenSSH's own client reaches
nodes with their host keys pinned.

Three real local nodes (sshd on 127.0.0.N; two of family ``workers``, one of family
``edge`` labelled ``edge``) are spawned once for the module and stopped in teardown
whatever happens.  Every connection is the real ``ssh``/``scp`` with ``BatchMode`` (a
refused key fails at once instead of asking).  ``orch ssh`` replaces its process with
ssh, so the tests that reach a node run it as a subprocess (or under a pty); those that
must fail before ssh starts run it in-process.
"""

from __future__ import annotations

import fcntl
import os
import pty
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from orchestrator import fleet
from orchestrator.provision.drivers.processes import SSHD
from orchestrator.remote import inventory
from orchestrator.state import NodeRecord, NodeState, Store
from orchestrator.workspace import Workspace
from tests.helpers.cli import ORCH, Run
from tests.helpers.workspace import family_yaml, sample_workspace, stop_everything

SSH, SCP, KEYSCAN = shutil.which("ssh"), shutil.which("scp"), shutil.which("ssh-keyscan")

pytestmark = [
    pytest.mark.sshd,
    pytest.mark.skipif(not Path(SSHD).exists(), reason=f"OpenSSH's sshd is not installed at {SSHD}"),
    pytest.mark.skipif(None in (SSH, SCP, KEYSCAN), reason="needs OpenSSH's client: apt install openssh-client"),
]

Orch = Callable[..., Run]
BATCH = ("-o", "BatchMode=yes", "-o", "ConnectTimeout=20")


@pytest.fixture(scope="module")
def fleet_ws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    """Two ``workers`` nodes and one ``edge`` node (label ``edge``), all ready."""
    ws = sample_workspace(tmp_path_factory.mktemp("sshcli") / "ws")
    (ws.families_dir / "edge.yaml").write_text(family_yaml(1) + "labels: [edge]\n")
    try:
        with Store.open(ws.state_db) as store:
            for family, count in (("workers", 2), ("edge", 1)):
                report = fleet.spawn(ws, store, family, count=count)
                assert report.ok, [str(f) for f in report.failures]
        yield ws
    finally:
        stop_everything(ws)


def ready(ws: Workspace, family: str | None = None) -> list[NodeRecord]:
    with Store.open(ws.state_db) as store:
        return store.list_nodes(family=family, states=[NodeState.READY])


def orch_process(ws: Workspace, *args: str, env: dict[str, str] | None = None,
                 timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ORCH, "--workspace", str(ws.root), *args], capture_output=True, text=True,
                          timeout=timeout, env=env or {**os.environ, "COLUMNS": "200"}, check=False)


def ssh_config_of(orch: Orch, ws: Workspace, path: Path, *args: str) -> dict[str, dict[str, str]]:
    """``orch inventory --format ssh-config -o PATH ARGS``, read back: host -> option -> value."""
    written = orch("--workspace", ws.root, "inventory", "--format", "ssh-config", "--output", path, *args)
    assert written.code == 0, written.err
    hosts: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, value = line.split(maxsplit=1)
        if key == "Host":
            current = hosts.setdefault(value, {})
        else:
            assert current is not None, f"an option before any Host block: {line!r}"
            current[key] = value
    return hosts


def ssh(config: Path, host: str, *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SSH), "-F", str(config), *BATCH, host, *command], capture_output=True,
                          text=True, timeout=60, check=False)


def test_ssh_config_has_one_pinned_block_per_ready_node(fleet_ws: Workspace, orch: Orch, tmp_path: Path) -> None:
    known_hosts = fleet_ws.runtime_dir / "known_hosts"
    known_hosts.unlink(missing_ok=True)

    hosts = ssh_config_of(orch, fleet_ws, tmp_path / "ssh_config")

    nodes = {n.id: n for n in ready(fleet_ws)}
    assert len(nodes) == 3 and set(hosts) == set(nodes)
    for node_id, options in hosts.items():
        node = nodes[node_id]
        assert options == {
            "HostName": node.address, "Port": str(node.port), "User": node.ssh_user,
            "IdentityFile": str(fleet_ws.ssh_key), "IdentitiesOnly": "yes",
            "UserKnownHostsFile": str(known_hosts), "GlobalKnownHostsFile": "/dev/null",
            "StrictHostKeyChecking": "yes", "UpdateHostKeys": "no",
        }
        assert Path(options["IdentityFile"]).is_absolute()
    pins = dict(line.split(maxsplit=1) for line in known_hosts.read_text().splitlines())
    assert pins == {f"[{n.address}]:{n.port}": n.host_key for n in nodes.values()}


def test_ssh_and_scp_reach_each_node_through_the_exported_config(
    fleet_ws: Workspace, orch: Orch, tmp_path: Path
) -> None:
    config = tmp_path / "ssh_config"
    ssh_config_of(orch, fleet_ws, config)
    payload = tmp_path / "payload.txt"
    for node in ready(fleet_ws):
        assert ssh(config, node.id, "true").returncode == 0
        # each node's sshd marks its sessions with the node's id: this is the node we meant
        who = ssh(config, node.id, "printenv ORCH_NODE_ID")
        assert (who.returncode, who.stdout) == (0, f"{node.provider_node_id}\n"), who.stderr
        payload.write_text(f"for {node.id} {time.time_ns()}\n")
        copied = subprocess.run([str(SCP), "-F", str(config), *BATCH, str(payload), f"{node.id}:copied.txt"],
                                capture_output=True, text=True, timeout=60, check=False)
        assert copied.returncode == 0, copied.stderr
        assert (Path(node.extra["node_dir"]) / "home" / "copied.txt").read_text() == payload.read_text()
        back = ssh(config, node.id, "cat copied.txt")
        assert back.stdout == payload.read_text(), back.stderr


def test_ssh_config_paths_are_quoted_for_ssh(fleet_ws: Workspace, tmp_path: Path) -> None:
    """A workspace whose path holds a space, a quote, a backslash, ``#`` and a ``%`` token:
    ssh reads the same paths back and connects with them."""
    odd = Workspace.init(tmp_path / "odd dir %h \"q\" \\b #c 's" / "ws")
    for suffix in ("", ".pub"):  # the fleet key the nodes accept (ssh offers the .pub beside it)
        shutil.copyfile(f"{fleet_ws.ssh_key}{suffix}", f"{odd.ssh_key}{suffix}")
    nodes = ready(fleet_ws)
    inventory.write_known_hosts(odd, nodes)
    config = tmp_path / "odd_config"
    config.write_text(inventory.ssh_config(odd, nodes))

    node = nodes[0]
    shown = subprocess.run([str(SSH), "-G", "-F", str(config), node.id], capture_output=True, text=True,
                           timeout=30, check=True).stdout.splitlines()
    assert f"userknownhostsfile {odd.runtime_dir / 'known_hosts'}" in shown
    result = ssh(config, node.id, "printenv ORCH_NODE_ID")
    assert (result.returncode, result.stdout) == (0, f"{node.provider_node_id}\n"), result.stderr

    argv = inventory.ssh_command(odd, node, ["printenv", "ORCH_NODE_ID"], ssh=str(SSH))
    direct = subprocess.run([argv[0], *BATCH, *argv[1:]], capture_output=True, text=True, timeout=60, check=False)
    assert (direct.returncode, direct.stdout) == (0, f"{node.provider_node_id}\n"), direct.stderr


def _new_host_key() -> tuple[bytes, str]:
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public.decode()


def _offered_key(node: NodeRecord) -> str:
    scan = subprocess.run([str(KEYSCAN), "-T", "5", "-t", "ed25519", "-p", str(node.port), str(node.address)],
                          capture_output=True, text=True, timeout=30, check=False)
    return " ".join(scan.stdout.split()[1:3])


def _serve_host_key(node: NodeRecord, private: bytes, public: str) -> None:
    """Make the node's sshd offer another host key: replace its key file, then SIGHUP (sshd
    execs itself again, reading its configuration and keys), and wait until it offers it."""
    node_dir = Path(node.extra["node_dir"])
    (node_dir / "host_key").write_bytes(private)
    os.kill(int((node_dir / "sshd.pid").read_text()), signal.SIGHUP)
    deadline = time.monotonic() + 30
    while _offered_key(node) != public:
        assert time.monotonic() < deadline, f"node {node.id} still offers its old host key"
        time.sleep(0.1)


@pytest.mark.parametrize("change", ["the node's key replaced", "the pin changed in the store"])
def test_a_node_whose_key_is_not_its_pin_is_refused(
    fleet_ws: Workspace, orch: Orch, tmp_path: Path, change: str
) -> None:
    config = tmp_path / "ssh_config"
    victim, other = ready(fleet_ws, "workers")
    node_dir = Path(victim.extra["node_dir"])
    original_private, original_pin = (node_dir / "host_key").read_bytes(), victim.host_key
    assert original_pin and _offered_key(victim) == original_pin
    private, public = _new_host_key()
    try:
        if change == "the node's key replaced":
            _serve_host_key(victim, private, public)
        else:
            with Store.open(fleet_ws.state_db) as store:
                store.set_node_state(victim.id, NodeState.READY, reason="test: wrong pin", host_key=public)
        ssh_config_of(orch, fleet_ws, config)  # pins rewritten from the store

        refused = ssh(config, victim.id, "true")
        assert refused.returncode == 255, refused
        assert "Host key verification failed" in refused.stderr, refused.stderr
        through_orch = orch_process(fleet_ws, "ssh", victim.id, "--", "true")
        assert through_orch.returncode == 255 and "Host key verification failed" in through_orch.stderr, through_orch
        assert ssh(config, other.id, "true").returncode == 0  # the others are not affected
    finally:
        if change == "the node's key replaced":
            _serve_host_key(victim, original_private, original_pin)
        else:
            with Store.open(fleet_ws.state_db) as store:
                store.set_node_state(victim.id, NodeState.READY, reason="test: pin restored", host_key=original_pin)
    ssh_config_of(orch, fleet_ws, config)
    assert ssh(config, victim.id, "true").returncode == 0


def test_orch_ssh_runs_a_command_and_exits_with_its_status(fleet_ws: Workspace) -> None:
    node = ready(fleet_ws, "workers")[0]

    seven = orch_process(fleet_ws, "ssh", node.id, "--", "exit", "7")
    assert seven.returncode == 7, seven.stderr
    hi = orch_process(fleet_ws, "ssh", node.id, "--", "echo", "hi")
    assert (hi.returncode, hi.stdout, hi.stderr) == (0, "hi\n", "")
    # options end at NODE, as ssh's do: what follows is the command, dashes and all
    listed = orch_process(fleet_ws, "ssh", node.id, "ls", "-d", "/")
    assert (listed.returncode, listed.stdout) == (0, "/\n"), listed.stderr
    # any target that names exactly one node, here a resource path with globs and a label
    edge = ready(fleet_ws, "edge")[0]
    who = orch_process(fleet_ws, "ssh", "-l", "edge", "/local/*/*", "--", "printenv", "ORCH_NODE_ID")
    assert (who.returncode, who.stdout) == (0, f"{edge.provider_node_id}\n"), who.stderr


def _read_until(fd: int, wanted: bytes | None, seen: bytearray, *, timeout: float = 60) -> None:
    """Read the pty into ``seen`` until ``wanted`` is in it, or (None) until the session
    ends; fail on a timeout or an early end, showing what came."""
    deadline = time.monotonic() + timeout
    while wanted is None or wanted not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"no {wanted or 'end'!r} from the session; it printed {bytes(seen)!r}"
        if select.select([fd], [], [], min(left, 0.5))[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: every process of the session closed the terminal
                chunk = b""
            if not chunk and wanted is None:
                return
            assert chunk, f"the session ended before {wanted!r}; it printed {bytes(seen)!r}"
            seen += chunk


def _set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def test_orch_ssh_is_an_interactive_terminal(fleet_ws: Workspace) -> None:
    """Under a pty: the window size reaches the node at the start and when it changes
    (SIGWINCH), what is typed runs there, and the shell's exit status is orch's."""
    node = ready(fleet_ws, "workers")[0]
    pid, fd = pty.fork()
    if pid == 0:  # the child: its terminal is the pty's other end
        try:
            _set_size(0, 31, 97)
            os.chdir(fleet_ws.root)
            os.execve(sys.executable, [*ORCH, "ssh", node.id], {**os.environ, "TERM": "dumb", "PS1": "$ "})
        finally:
            os._exit(127)
    status: int | None = None
    seen = bytearray()
    try:
        os.write(fd, b"stty size; echo READY$((6*7))\n")
        _read_until(fd, b"READY42", seen)  # $((..)) expanded: the shell ran it, not an echo of the typing
        assert b"31 97" in seen, bytes(seen)

        _set_size(fd, 40, 120)  # the kernel sends SIGWINCH to ssh, which tells the node
        for attempt in range(50):
            mark = f"SIZE{attempt}".encode()
            os.write(fd, b"stty size; echo SIZE$((" + str(attempt).encode() + b"))\n")
            _read_until(fd, mark + b"\r\n", seen)
            if b"40 120" in seen.split(b"READY42", 1)[1]:
                break
            time.sleep(0.1)
        assert b"40 120" in seen, bytes(seen)

        del seen[:]
        os.write(fd, b"stty size; exit 3\n")
        _read_until(fd, None, seen)
        assert b"40 120" in seen, bytes(seen)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 3, bytes(seen)
    finally:
        if status is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)


@pytest.mark.parametrize(("target", "count"), [("workers", 2), ("nosuch", 0), ("work*", 2)])
def test_a_target_that_is_not_one_node_is_a_one_line_error(
    fleet_ws: Workspace, orch: Orch, target: str, count: int
) -> None:
    known_hosts = fleet_ws.runtime_dir / "known_hosts"
    known_hosts.unlink(missing_ok=True)

    result = orch("--workspace", fleet_ws.root, "ssh", target, "--", "true")

    assert result.code == 2 and result.out == ""
    assert len(result.err.splitlines()) == 1 and result.err.startswith("error: "), result.err
    assert "orch ssh needs exactly one" in result.err and f"{count} " in result.err, result.err
    if count:
        assert all(n.id in result.err for n in ready(fleet_ws, "workers")), result.err
    assert not known_hosts.exists(), "a refused orch ssh writes nothing"


def test_a_label_that_leaves_no_node_is_a_one_line_error(fleet_ws: Workspace, orch: Orch) -> None:
    result = orch("--workspace", fleet_ws.root, "ssh", "-l", "edge", "workers", "--", "true")
    assert result.code == 2 and len(result.err.splitlines()) == 1, result.err
    assert "0 matched" in result.err and "edge" in result.err


def test_orch_ssh_without_an_ssh_client_says_what_to_install(fleet_ws: Workspace, tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    node = ready(fleet_ws, "workers")[0]

    result = orch_process(fleet_ws, "ssh", node.id, "--", "true", env={**os.environ, "PATH": str(empty)})

    assert result.returncode == 5 and result.stdout == "", result
    assert len(result.stderr.splitlines()) == 1 and "install openssh-client" in result.stderr, result.stderr


def test_inventory_takes_targets_and_labels(fleet_ws: Workspace, orch: Orch, tmp_path: Path) -> None:
    workers = {n.id for n in ready(fleet_ws, "workers")}
    edge = {n.id for n in ready(fleet_ws, "edge")}
    config = tmp_path / "ssh_config"

    assert set(ssh_config_of(orch, fleet_ws, config, "edge")) == edge
    assert set(ssh_config_of(orch, fleet_ws, config, "-l", "edge")) == edge
    assert set(ssh_config_of(orch, fleet_ws, config, "-l", "!edge")) == workers
    one = sorted(workers)[0]
    assert set(ssh_config_of(orch, fleet_ws, config, one, "edge")) == {one, *edge}
    assert set(ssh_config_of(orch, fleet_ws, config, "/local/*/workers")) == workers
    assert set(ssh_config_of(orch, fleet_ws, config, "all")) == workers | edge
    # the pins of every node up are written whatever the filter: one file serves every export
    assert len((fleet_ws.runtime_dir / "known_hosts").read_text().splitlines()) == 3
    assert ssh(config, sorted(edge)[0], "true").returncode == 0

    ansible = orch("--workspace", fleet_ws.root, "inventory", "-l", "edge")
    assert ansible.code == 0 and "edge:" in ansible.out and not any(w in ansible.out for w in workers)

    for bad in (["nosuch"], ["-l", "nosuch"], ["--format", "json"]):
        refused = orch("--workspace", fleet_ws.root, "inventory", "--format", "ssh-config", *bad)
        assert refused.code == 2 and len(refused.err.splitlines()) == 1, (bad, refused.err)
