"""Host-key pinning (orchestrator/remote/ssh.py) against a real SSH server in this process.

The server is paramiko's server side on 127.0.0.1 with host keys made by ``ssh-keygen``;
it records every authentication attempt, so the tests see that a client meeting an
unpinned or wrong host key gives up *before* it authenticates (the fleet key is never
offered to a machine that is not the node).  Fingerprints are checked against
``ssh-keygen -l``.  Written to kill the mutants that survived in docs/mutation.md.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paramiko
import pytest
from paramiko.common import AUTH_FAILED, AUTH_SUCCESSFUL

from orchestrator.errors import RemoteError
from orchestrator.remote.ssh import HostKeyMismatch, NodeUnreachable, SSHSession, SSHTarget, Timeouts, fingerprint
from tests.helpers.keys import make_key_pair

pytestmark = pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs OpenSSH's ssh-keygen")


@dataclass
class HostKey:
    private: Path
    line: str  # "ssh-ed25519 AAAA..." as a provider reports it (no comment)
    fingerprint: str  # as ssh-keygen -l prints it


def host_key(folder: Path, kind: str) -> HostKey:
    path = folder / f"host_{kind}"
    pem = ["-m", "PEM"] if kind == "ecdsa" else []  # (paramiko misreads some OpenSSH-format ECDSA keys)
    subprocess.run(["ssh-keygen", "-q", "-t", kind, *pem, "-N", "", "-C", "", "-f", str(path)], check=True)
    listed = subprocess.run(["ssh-keygen", "-l", "-f", f"{path}.pub"], check=True, capture_output=True, text=True)
    return HostKey(path, " ".join(path.with_suffix(".pub").read_text().split()[:2]), listed.stdout.split()[1])


def load(key: HostKey) -> paramiko.PKey:
    if key.line.startswith("ssh-rsa"):
        return paramiko.RSAKey.from_private_key_file(str(key.private))
    if key.line.startswith("ecdsa-"):
        return paramiko.ECDSAKey.from_private_key_file(str(key.private))
    return paramiko.Ed25519Key.from_private_key_file(str(key.private))


@dataclass
class Server(paramiko.ServerInterface):
    """Accepts the public key ``allowed``; records every attempt (user, key fingerprint)."""

    allowed: str
    attempts: list[tuple[str, str]] = field(default_factory=list)
    slow: float = 0.0  # seconds each answer to an authentication takes

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        self.attempts.append((username, fingerprint(key.asbytes())))
        time.sleep(self.slow)
        ok = f"{key.get_name()} {key.get_base64()}" == self.allowed
        return AUTH_SUCCESSFUL if ok else AUTH_FAILED


class SSHServer:
    """One SSH server on 127.0.0.1 offering ``keys`` as its host keys, serving one
    connection after another in a thread until closed."""

    def __init__(self, keys: list[HostKey], allowed: str) -> None:
        self.keys, self.interface = keys, Server(allowed)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.offered: list[str] = []  # the host key type each connection was served
        self.transports: list[paramiko.Transport] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            transport = paramiko.Transport(conn)
            self.transports.append(transport)
            for key in self.keys:
                transport.add_server_key(load(key))
            # start_server raises "Negotiation failed" when the client is already gone by the
            # time this thread looks (a loaded machine), although the key exchange was done:
            # the host key type it served is what counts.
            with contextlib.suppress(paramiko.SSHException, EOFError, OSError):
                transport.start_server(server=self.interface)
            if transport.host_key_type:
                self.offered.append(transport.host_key_type)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept (close alone does not)
        self.listener.close()
        for transport in self.transports:
            transport.close()
        self.thread.join(10)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, HostKey]:
    """The server's host keys (ed25519, rsa, ecdsa) and another machine's (other-ed25519, other-rsa)."""
    made = {}
    for name in ("ed25519", "rsa", "ecdsa", "other-ed25519", "other-rsa"):
        made[name] = host_key(tmp_path_factory.mktemp(name), name.removeprefix("other-"))
    return made


@pytest.fixture
def server(tmp_path: Path, keys: dict[str, HostKey]) -> Iterator[tuple[SSHServer, Path]]:
    fleet = make_key_pair(tmp_path)
    running = SSHServer([keys["ed25519"], keys["rsa"], keys["ecdsa"]], allowed=" ".join(fleet.public.split()[:2]))
    try:
        yield running, fleet.private
    finally:
        running.close()


def target(server: SSHServer, key_file: Path, pinned: str) -> SSHTarget:
    return SSHTarget("w-1", "127.0.0.1", server.port, "orch", pinned, key_file)


def test_fingerprint_is_openssh_sha256(keys: dict[str, HostKey]) -> None:
    for key in keys.values():
        assert fingerprint(load(key).asbytes()) == key.fingerprint


def wait_offered(ssh: SSHServer) -> list[str]:
    deadline = time.monotonic() + 5
    while not ssh.offered and time.monotonic() < deadline:
        time.sleep(0.01)
    return ssh.offered


@pytest.mark.parametrize(("kind", "served"), [("ed25519", "ssh-ed25519"), ("ecdsa", "ecdsa-sha2-nistp256"),
                                              ("rsa", "rsa-sha2-512")])
def test_the_pinned_key_opens_a_session_and_only_then_the_fleet_key_is_offered(
        server: tuple[SSHServer, Path], keys: dict[str, HostKey], kind: str, served: str) -> None:
    ssh, key_file = server
    pinned = target(ssh, key_file, keys[kind].line)
    with SSHSession(pinned, timeouts=Timeouts(connect=10)) as session:
        assert session.is_active and session.target is pinned
        sock = session._transport.sock
        assert isinstance(sock, socket.socket) and sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    # The server offered the host key of the pinned type (a node with several keys).
    assert wait_offered(ssh) == [served]
    assert [user for user, _ in ssh.interface.attempts] == ["orch"]


@pytest.mark.parametrize(("kind", "name"), [("ed25519", "ssh-ed25519"), ("rsa", "ssh-rsa")])
def test_another_host_key_is_refused_before_authenticating(
        server: tuple[SSHServer, Path], keys: dict[str, HostKey], kind: str, name: str) -> None:
    ssh, key_file = server
    pinned, offered = keys[f"other-{kind}"], keys[kind]  # another machine's key of the type the node has
    with pytest.raises(HostKeyMismatch) as caught:
        SSHSession(target(ssh, key_file, pinned.line))
    assert (caught.value.expected, caught.value.offered) == (pinned.fingerprint, offered.fingerprint)
    assert caught.value.message == (f"node w-1 at 127.0.0.1:{ssh.port} offered host key {name} {offered.fingerprint}, "
                                 f"but {name} {pinned.fingerprint} is pinned")
    assert caught.value.hint == (
        "another machine may hold that address, or the node was re-created; if you "
        "re-created it, take its new key from the provider (`orch reconcile`), never from the node")
    assert isinstance(caught.value, RemoteError) and caught.value.exit_code == 5
    assert ssh.interface.attempts == [], "the fleet key was offered to a machine with the wrong host key"


@pytest.mark.parametrize("pinned", ["", "ssh-ed25519", "ssh-ed25519 not*base64", "   ", "the key, one character off"])
def test_no_usable_pin_is_refused_before_authenticating(
        server: tuple[SSHServer, Path], keys: dict[str, HostKey], pinned: str) -> None:
    ssh, key_file = server
    if pinned == "the key, one character off":  # a stray character: refused, not decoded around
        kind, blob = keys["ed25519"].line.split()
        pinned = f"{kind} {blob[:20]}*{blob[20:]}"
    with pytest.raises(HostKeyMismatch) as caught:
        SSHSession(target(ssh, key_file, pinned))
    offered = keys["ed25519"]
    assert (caught.value.expected, caught.value.offered) == ("(none)", offered.fingerprint)
    assert caught.value.message == (f"no usable host key is pinned for node w-1 at 127.0.0.1:{ssh.port}; "
                                 f"it offers ssh-ed25519 {offered.fingerprint}")
    assert caught.value.hint == "pin the key the provider reported when it created the node; never accept one unseen"
    assert ssh.interface.attempts == []


def test_a_server_that_never_speaks_ssh_fails_within_the_connect_timeout(tmp_path: Path,
                                                                         keys: dict[str, HostKey]) -> None:
    fleet = make_key_pair(tmp_path)
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts (the kernel does), never answers
        port = int(silent.getsockname()[1])
        started = time.monotonic()
        with pytest.raises(NodeUnreachable):
            SSHSession(SSHTarget("w-1", "127.0.0.1", port, "orch", keys["ed25519"].line, fleet.private),
                       timeouts=Timeouts(connect=0.5))
        assert time.monotonic() - started < 5, "the handshake waited past the connect timeout"


def test_a_server_slow_to_authenticate_fails_within_the_connect_timeout(
        server: tuple[SSHServer, Path], keys: dict[str, HostKey]) -> None:
    ssh, key_file = server
    ssh.interface.slow = 6.0
    started = time.monotonic()
    with pytest.raises(RemoteError):
        SSHSession(target(ssh, key_file, keys["ed25519"].line), timeouts=Timeouts(connect=0.5))
    assert time.monotonic() - started < 4, "authentication waited past the connect timeout"


def test_an_address_that_never_answers_the_connect_fails_within_the_connect_timeout(
        tmp_path: Path, keys: dict[str, HostKey]) -> None:
    """A listener whose accept queue is full: Linux drops the next SYN without a reset, as
    a firewalled or vanished address does, so only the TCP connect's own timeout ends the wait."""
    fleet = make_key_pair(tmp_path)
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    port = int(listener.getsockname()[1])
    held: list[socket.socket] = []  # connections never accepted: they fill the queue
    outcome: list[BaseException | None] = []

    def connect() -> None:
        try:
            SSHSession(SSHTarget("w-1", "127.0.0.1", port, "orch", keys["ed25519"].line, fleet.private),
                       timeouts=Timeouts(connect=0.5))
            outcome.append(None)
        except BaseException as exc:  # (reported by the test's thread)
            outcome.append(exc)

    worker = threading.Thread(target=connect, daemon=True)
    try:
        for _ in range(8):
            try:
                held.append(socket.create_connection(("127.0.0.1", port), timeout=0.3))
            except TimeoutError:
                break  # a SYN went unanswered: the queue is full
        else:
            pytest.skip("this kernel answers a connect to a full accept queue")
        started = time.monotonic()
        worker.start()
        worker.join(3)
        elapsed = time.monotonic() - started
    finally:
        listener.close()  # (a connect still waiting is refused at its next SYN)
        for sock in held:
            sock.close()
        if worker.is_alive():
            worker.join(10)
    assert elapsed < 2, f"the TCP connect waited {elapsed:.1f} s, past the connect timeout of 0.5 s"
    [error] = outcome
    assert isinstance(error, NodeUnreachable), repr(error)
    assert error.message == f"cannot reach node w-1 (orch@127.0.0.1:{port}): timed out"
