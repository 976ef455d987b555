"""orchestrator.remote.ssh against real local nodes: pinned host keys, commands, SFTP, pooling."""

from __future__ import annotations

import base64
import dataclasses
import errno
import hashlib
import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from libcloud.compute.base import Node

from orchestrator.errors import RemoteError
from orchestrator.provision.drivers.local import LocalNodeDriver
from orchestrator.provision.drivers.processes import SSHD
from orchestrator.remote.pool import FanOutFailed, SSHPool
from orchestrator.remote.ssh import (
    AuthenticationFailed,
    CommandFailed,
    CommandTimeout,
    HostKeyMismatch,
    NodeUnreachable,
    RemoteFileError,
    Result,
    SSHSession,
    SSHTarget,
    fingerprint,
    map_ssh_errors,
)
from tests.helpers.net import free_port

MakeNodes = Callable[..., list[Node]]
TargetOf = Callable[[Node], SSHTarget]
NewKeyPair = Callable[[str], Any]

pytestmark = [
    pytest.mark.sshd,
    pytest.mark.skipif(not Path(SSHD).exists(), reason=f"OpenSSH's sshd is not installed at {SSHD}"),
]


def test_each_node_has_its_id_and_clean_home(make_nodes: MakeNodes, target_of: TargetOf) -> None:
    nodes = make_nodes(4)
    for node in nodes:
        with SSHSession(target_of(node)) as session:
            result = session.run("hostname; echo $ORCH_NODE_ID; echo $HOME; pwd", check=True)
        hostname, node_id, home, cwd = result.stdout.splitlines()
        assert hostname == os.uname().nodename
        assert node_id == node.id
        assert home == cwd == str(Path(node.extra["node_dir"]) / "home")
        assert result.host == node.id and result.ok


def test_bash_sources_the_node_homes_bashrc_not_the_users(make_nodes: MakeNodes, target_of: TargetOf) -> None:
    [node] = make_nodes(1)
    with SSHSession(target_of(node)) as session:
        assert session.run("cat ~/.bashrc").stdout == 'cd "$HOME" 2>/dev/null || true\n'
        session.put_bytes(b'cd "$HOME"\nexport SOURCED_FROM=node-home\n', ".bashrc")
        assert session.run("echo $SOURCED_FROM").stdout == "node-home\n"


def test_a_node_killed_mid_command_is_reported_unreachable(
    driver: LocalNodeDriver, make_nodes: MakeNodes, target_of: TargetOf
) -> None:
    [node] = make_nodes(1)
    with SSHSession(target_of(node)) as session:
        killer = threading.Timer(0.3, driver.ex_kill_node, args=(node,))
        killer.start()
        try:
            with pytest.raises(NodeUnreachable, match=f"node {node.id}"):
                session.run("sleep 30", timeout=10)
        finally:
            killer.join()
        assert not session.is_active


def test_result_keeps_exit_code_and_both_streams(make_nodes: MakeNodes, target_of: TargetOf) -> None:
    [node] = make_nodes(1)
    with SSHSession(target_of(node)) as session:
        result = session.run("echo out; echo err >&2; exit 3")
        killed = session.run("kill -9 $$")
    assert killed.exited == -1 and killed.failed  # a signal, not an exit code
    assert (result.exited, result.stdout, result.stderr) == (3, "out\n", "err\n")
    assert result.failed and not result.ok
    assert result.tail() == "out\nerr"
    many = Result("n", "c", 0, "".join(f"{i}\n" for i in range(50)), "")
    assert many.tail(3) == "47\n48\n49"
    assert many.tail(0) == ""


def test_check_raises_with_node_command_code_and_last_lines(make_nodes: MakeNodes, target_of: TargetOf) -> None:
    [node] = make_nodes(1)
    with SSHSession(target_of(node)) as session, pytest.raises(CommandFailed) as caught:
        session.run("seq 1 30; echo 'no such thing' >&2; exit 7", check=True)
    err = caught.value
    assert isinstance(err, RemoteError) and err.exit_code == 5
    assert err.result.exited == 7
    message = str(err)
    assert f"node {node.id}" in message and "exit 7" in message and "exited 7" in message
    assert "no such thing" in message and "    30" in message and "    1\n" not in message


def test_big_output_on_both_streams_does_not_deadlock(make_nodes: MakeNodes, target_of: TargetOf) -> None:
    [node] = make_nodes(1)
    with SSHSession(target_of(node)) as session:
        # 8 MB to stderr first: a reader that waits for stdout's end would hang here.
        result = session.run("head -c 8000000 /dev/zero | tr '\\0' e >&2; head -c 8000000 /dev/zero | tr '\\0' o")
    assert result.ok
    assert len(result.stderr) == 8_000_000 and set(result.stderr) == {"e"}
    assert len(result.stdout) == 8_000_000 and set(result.stdout) == {"o"}


def test_env_and_timeout(make_nodes: MakeNodes, target_of: TargetOf) -> None:
    [node] = make_nodes(1)
    with SSHSession(target_of(node)) as session:
        assert session.run('echo "$GREETING|$B"', env={"GREETING": "it's a 'test' $x", "B": ""}).stdout == (
            "it's a 'test' $x|\n"
        )
        with pytest.raises(ValueError, match="not an environment variable name"):
            session.run("true", env={"A B": "x"})
        started = time.monotonic()
        with pytest.raises(CommandTimeout, match=rf"node {node.id}: `sleep 5` ran past 0.3s"):
            session.run("sleep 5", timeout=0.3)
        assert time.monotonic() - started < 2
        assert session.run("echo still usable").stdout == "still usable\n"


def test_sftp_put_and_checksum_on_the_node(make_nodes: MakeNodes, target_of: TargetOf, tmp_path: Path) -> None:
    [node] = make_nodes(1)
    payload = tmp_path / "payload.bin"
    payload.write_bytes(os.urandom(3_000_000))
    home = Path(node.extra["node_dir"]) / "home"
    with SSHSession(target_of(node)) as session:
        session.put(payload, f"{home}/payload.bin")
        session.put_bytes(b"#!/bin/sh\necho hi\n", "run.sh", mode=0o750)  # relative: the node's home
        session.put_bytes(b"second upload, same SFTP client", "again.txt")
        remote = session.run("sha256sum payload.bin; stat -c %a run.sh; ./run.sh", check=True).stdout.split()
        with pytest.raises(RemoteFileError, match=rf"node {node.id} .*/no/such/dir/x"):
            session.put_bytes(b"x", "/no/such/dir/x")
        assert session.run("true").ok  # the connection survives a failed upload
    assert remote[0] == hashlib.sha256(payload.read_bytes()).hexdigest()
    assert remote[2:] == ["750", "hi"]
    assert (home / "again.txt").read_text() == "second upload, same SFTP client"


def test_a_wrong_pin_is_refused_before_authentication(
    make_nodes: MakeNodes, target_of: TargetOf, new_key_pair: NewKeyPair
) -> None:
    [node] = make_nodes(1)
    other = ed25519.Ed25519PrivateKey.generate().public_key()
    other_line = other.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    target = dataclasses.replace(target_of(node), host_key=other_line)
    with pytest.raises(HostKeyMismatch) as caught:
        SSHSession(target)
    message = str(caught.value)
    assert f"node {node.id} at {node.public_ips[0]}:2222" in message
    assert caught.value.expected == _openssh_fingerprint(other_line) and caught.value.expected in message
    assert caught.value.offered == _openssh_fingerprint(node.extra["host_key"]) and caught.value.offered in message
    assert "never from the node" in message  # the fix

    with pytest.raises(HostKeyMismatch, match="no usable host key is pinned"):
        SSHSession(dataclasses.replace(target, host_key=""))
    # A key the node would refuse: the pin is checked first, so that is what fails.
    stranger = new_key_pair("stranger_key")
    with pytest.raises(HostKeyMismatch):
        SSHSession(dataclasses.replace(target, key_file=stranger.private))


def test_a_node_whose_host_key_changed_is_refused(
    driver: LocalNodeDriver, make_nodes: MakeNodes, target_of: TargetOf
) -> None:
    [node] = make_nodes(1)
    pinned = target_of(node)
    driver.stop_node(node)
    new_key = ed25519.Ed25519PrivateKey.generate()
    host_key_file = Path(node.extra["node_dir"]) / "host_key"
    host_key_file.write_bytes(
        new_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
    )
    driver.start_node(node)
    new_line = new_key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)

    with pytest.raises(HostKeyMismatch, match=f"node {node.id} at ") as caught:
        SSHSession(pinned)
    assert caught.value.offered == _openssh_fingerprint(new_line.decode())
    assert caught.value.expected == _openssh_fingerprint(node.extra["host_key"])
    with SSHSession(dataclasses.replace(pinned, host_key=new_line.decode())) as session:
        assert session.run("true").ok


def test_a_refused_key_and_a_dead_node_name_the_node(
    make_nodes: MakeNodes, target_of: TargetOf, new_key_pair: NewKeyPair, tmp_path: Path
) -> None:
    [node] = make_nodes(1)
    stranger = new_key_pair("stranger_key")
    with pytest.raises(AuthenticationFailed, match=rf"node {node.id} \(.*@{node.public_ips[0]}:2222\) refused"):
        SSHSession(dataclasses.replace(target_of(node), key_file=stranger.private))
    with pytest.raises(AuthenticationFailed, match="cannot load"):
        SSHSession(dataclasses.replace(target_of(node), key_file=tmp_path / "missing"))
    nobody = dataclasses.replace(target_of(node), name="ghost", port=free_port())
    with pytest.raises(NodeUnreachable, match=rf"cannot reach node ghost \(.*@{node.public_ips[0]}:") as caught:
        SSHSession(nobody)
    assert isinstance(caught.value.__cause__, ConnectionRefusedError)


def test_map_ssh_errors_translates_in_one_place(tmp_path: Path) -> None:
    target = SSHTarget("n1", "127.0.0.9", 22, "u", "", tmp_path / "k")
    with pytest.raises(NodeUnreachable, match="cannot reach node n1") as caught, map_ssh_errors(target):
        raise ConnectionResetError(errno.ECONNRESET, "reset")
    assert isinstance(caught.value.__cause__, ConnectionResetError)
    with pytest.raises(RemoteFileError, match="cannot write /x: Permission denied"), map_ssh_errors(target, path="/x"):
        raise PermissionError(errno.EACCES, "Permission denied")
    with pytest.raises(CommandFailed), map_ssh_errors(target):  # ours pass through untouched
        raise CommandFailed(Result("n1", "false", 1, "", ""))


def test_a_session_runs_commands_in_parallel(make_nodes: MakeNodes, target_of: TargetOf) -> None:
    [node] = make_nodes(1)
    outputs: list[str] = []
    with SSHSession(target_of(node)) as session:

        def work(i: int) -> None:
            outputs.append(session.run(f"sleep 0.2; echo {i}", check=True).stdout.strip())

        threads = [threading.Thread(target=work, args=(i,)) for i in range(32)]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sorted(outputs, key=int) == [str(i) for i in range(32)]
    assert time.monotonic() - started < 3  # in parallel, not 32 x 0.2 s


def test_the_pool_reuses_one_connection_per_node(pool: SSHPool, make_nodes: MakeNodes, target_of: TargetOf) -> None:
    [node] = make_nodes(1)
    target = target_of(node)
    first = pool.run(target, "echo $SSH_CLIENT").stdout.split()
    session = pool.session(target)
    second = pool.run(target, "echo $SSH_CLIENT").stdout.split()
    assert first == second  # same client port: the same TCP connection
    assert pool.session(target) is session


def test_the_pool_reconnects_to_a_restarted_node(
    driver: LocalNodeDriver, pool: SSHPool, make_nodes: MakeNodes, target_of: TargetOf
) -> None:
    [node] = make_nodes(1)
    target = target_of(node)
    old = pool.session(target)
    driver.ex_kill_node(node)
    driver.start_node(node)
    deadline = time.monotonic() + 5
    while old.is_active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not old.is_active
    assert pool.run(target, "echo back").stdout == "back\n"
    assert pool.session(target) is not old


def test_run_many_maps_every_node_to_a_result_or_an_error(
    pool: SSHPool, make_nodes: MakeNodes, target_of: TargetOf
) -> None:
    nodes = make_nodes(4)
    targets = [target_of(n) for n in nodes]
    loser = str(nodes[2].id)
    ghost = dataclasses.replace(targets[0], name="ghost", port=free_port())
    results = pool.run_many([*targets, ghost], f'test "$ORCH_NODE_ID" != {loser} && echo ok', max_parallel=3)

    assert list(results) == [n.id for n in nodes] + ["ghost"]
    assert set(results.succeeded) == {n.id for n in nodes} - {loser}
    assert all(r.stdout == "ok\n" for r in results.succeeded.values())
    assert set(results.failed) == {loser, "ghost"}
    lost = results[loser]
    assert isinstance(lost, Result) and lost.exited == 1
    assert isinstance(results["ghost"], NodeUnreachable)
    with pytest.raises(FanOutFailed, match=f"2 of 5 nodes failed: ghost \\(NodeUnreachable\\), {loser} \\(exit 1\\)"):
        results.raise_on_failure()
    with pytest.raises(ValueError, match="share names"):
        pool.run_many([targets[0], targets[0]], "true")


def _openssh_fingerprint(key_line: str) -> str:
    """The fingerprint as OpenSSH's ssh-keygen prints it, to check ours against."""
    out = subprocess.run(
        ["ssh-keygen", "-l", "-E", "sha256", "-f", "-"], input=key_line, capture_output=True, text=True, check=False
    )
    if out.returncode != 0:  # no ssh-keygen: compute it the documented way
        return fingerprint(base64.b64decode(key_line.split()[1]))
    return out.stdout.split()[1]

