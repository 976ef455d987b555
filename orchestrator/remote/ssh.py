"""SSH to nodes: pinned host keys, one connection per node, command outcomes as values.

Our own layer on paramiko rather than libcloud's ``deploy_node``, whose SSH client
accepts any host key, polls every 200 ms and breaks with paramiko >= 4 on key material.

- We open the TCP socket ourselves and set ``TCP_NODELAY``: paramiko leaves Nagle on,
  and Nagle plus delayed ACKs stall every request/response exchange by ~40 ms.
- The host key the node offers is checked against the pinned one before we
  authenticate.  There is no "accept an unknown key" mode.
- A command's outcome is a :class:`Result`; ``check=True`` raises :class:`CommandFailed`
  carrying it.  A fan-out gives a :class:`FanOutResult`, node name -> Result or error.
- paramiko and socket errors become :class:`~orchestrator.errors.RemoteError`
  subclasses in one place, :func:`map_ssh_errors`::

    RemoteError
    ├── NodeUnreachable       no connection, or the SSH conversation broke off
    ├── HostKeyMismatch       the node offers another host key than the pinned one
    ├── AuthenticationFailed  our key cannot be read, or the node refuses it
    ├── RemoteFileError       an upload failed on the node (missing folder, permission)
    ├── CommandFailed         a command exited non-zero under check=True (.result)
    ├── CommandTimeout        a command outlived its timeout
    └── FanOutFailed          some nodes of a fan-out failed (.results)

>>> target = SSHTarget("w1-5d0c", "127.0.0.10", 2222, "orch", "ssh-ed25519 AAAA...",
...                    Path(".orch/fleet_key"))
>>> with SSHSession(target) as session:                                # doctest: +SKIP
...     session.run("uname -r", check=True).stdout
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import io
import re
import select
import shlex
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import paramiko

from orchestrator.errors import OrchError, RemoteError

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# The server host key algorithms to ask for, per pinned key type, so that a node with
# several host keys offers the one we pinned.
_HOST_KEY_ALGORITHMS = {"ssh-rsa": ["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"]}


class NodeUnreachable(RemoteError):
    """No TCP connection to the node, or the SSH conversation with it broke off."""


class HostKeyMismatch(RemoteError):
    """The node offered a host key other than the pinned one (or none is pinned)."""

    def __init__(self, message: str, *, expected: str, offered: str, hint: str | None = None) -> None:
        self.expected = expected
        self.offered = offered
        super().__init__(message, hint=hint)


class AuthenticationFailed(RemoteError):
    """Our private key cannot be read, or the node refuses it."""


class RemoteFileError(RemoteError):
    """An upload failed on the node: a missing folder, a permission, a full disk."""


class CommandTimeout(RemoteError):
    """A command ran past its timeout; its channel is closed (the process may live on)."""


@dataclass(frozen=True)
class Timeouts:
    """Seconds to wait for a connection (TCP + SSH handshake + auth) and for a command.

    >>> Timeouts(connect=5, command=60)
    Timeouts(connect=5, command=60)
    """

    connect: float = 10.0
    command: float = 600.0


@dataclass(frozen=True)
class SSHTarget:
    """Where and how to reach one node.

    ``name`` is the node id, used in messages and as the key of fan-out results;
    ``host_key`` is the pinned public host key line, ``ssh-ed25519 AAAA...``;
    ``key_file`` is the fleet's private key (OpenSSH format, ed25519).
    """

    name: str
    host: str
    port: int
    user: str
    host_key: str
    key_file: Path

    @classmethod
    def from_node(cls, node: Any, key_file: Path) -> SSHTarget:
        """The target for a libcloud Node of a driver that reports ``host_key``,
        ``port`` and ``ssh_user`` in ``extra`` (our own drivers do)."""
        return cls(
            name=str(node.id),
            host=node.public_ips[0],
            port=int(node.extra.get("port", 22)),
            user=node.extra["ssh_user"],
            host_key=node.extra.get("host_key") or "",
            key_file=key_file,
        )


@dataclass(frozen=True)
class Result:
    """The outcome of one command on one node.

    ``host`` is the node's name (its SSHTarget.name); ``exited`` is -1 when the command
    ended without an exit status (killed by a signal).
    """

    host: str
    command: str
    exited: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exited == 0

    @property
    def failed(self) -> bool:
        return not self.ok

    def tail(self, n: int = 20) -> str:
        """The last ``n`` lines of output: stdout, then stderr (where errors end up)."""
        lines = (
            self.stdout + ("\n" if self.stdout and not self.stdout.endswith("\n") else "") + self.stderr
        ).splitlines()
        return "\n".join(lines[-n:]) if n > 0 else ""


class CommandFailed(RemoteError):
    """A command exited non-zero under ``check=True``; ``result`` holds its Result."""

    def __init__(self, result: Result) -> None:
        self.result = result
        tail = result.tail(10)
        message = f"node {result.host}: `{result.command}` exited {result.exited}"
        super().__init__(message + (":\n" + _indent(tail) if tail else " with no output"))


def fingerprint(key_blob: bytes) -> str:
    """OpenSSH's SHA256 fingerprint of a public key blob: ``SHA256:base64-no-padding``."""
    digest = base64.b64encode(hashlib.sha256(key_blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


@contextlib.contextmanager
def map_ssh_errors(target: SSHTarget, *, path: str | None = None) -> Iterator[None]:
    """Translate paramiko and socket errors into RemoteError subclasses naming the node.

    ``path``: the remote file being written, so that an OSError that is not about the
    connection is reported as a RemoteFileError about that file.
    """
    where = f"node {target.name} ({target.user}@{target.host}:{target.port})"
    try:
        yield
    except OrchError:
        raise
    except paramiko.AuthenticationException as exc:
        raise AuthenticationFailed(
            f"{where} refused the key {target.key_file}: {exc}",
            hint="the node's authorized_keys must hold the fleet's public key",
        ) from exc
    except paramiko.sftp.SFTPError as exc:
        raise RemoteFileError(f"{where}: SFTP failed on {path}: {exc}") from exc
    except paramiko.SSHException as exc:
        raise NodeUnreachable(
            f"SSH with {where} failed: {exc}", hint="is its sshd running? `orch reconcile` checks"
        ) from exc
    except (EOFError, ConnectionError, TimeoutError, socket.gaierror, socket.herror) as exc:
        raise NodeUnreachable(
            f"cannot reach {where}: {exc or type(exc).__name__}",
            hint="is the node running? `orch reconcile` checks",
        ) from exc
    except OSError as exc:
        if path is None:
            raise NodeUnreachable(f"cannot reach {where}: {exc}") from exc
        raise RemoteFileError(f"{where}: cannot write {path}: {exc.strerror or exc}") from exc


class SSHSession:
    """One open, authenticated SSH connection to a node; a new channel per command.

    Connects on construction.  ``tcp_nodelay=False`` exists only to measure the gain.
    """

    def __init__(self, target: SSHTarget, *, timeouts: Timeouts | None = None, tcp_nodelay: bool = True) -> None:
        self.target = target
        self.timeouts = timeouts or Timeouts()
        self._sftp: paramiko.SFTPClient | None = None
        self._sftp_lock = threading.Lock()
        key = _load_key(target)
        with map_ssh_errors(target):
            sock = socket.create_connection((target.host, target.port), timeout=self.timeouts.connect)
            try:
                if tcp_nodelay:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                transport = paramiko.Transport(sock)
            except BaseException:
                sock.close()
                raise
            try:
                pinned_type = target.host_key.split()[0] if target.host_key.split() else ""
                known = transport.preferred_keys  # (paramiko 4+ knows no "ssh-rsa" signatures)
                algorithms = [a for a in _HOST_KEY_ALGORITHMS.get(pinned_type, [pinned_type]) if a in known]
                if algorithms:  # else (no pin, or a type paramiko lacks) the check names the key offered
                    transport.get_security_options().key_types = algorithms
                transport.start_client(timeout=self.timeouts.connect)
                _check_host_key(target, transport.get_remote_server_key())
                transport.auth_timeout = self.timeouts.connect
                transport.auth_publickey(target.user, key)
            except BaseException:
                transport.close()
                raise
        self._transport = transport

    @property
    def is_active(self) -> bool:
        return self._transport.is_active()

    def run(
        self,
        command: str,
        *,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        check: bool = False,
    ) -> Result:
        """Run ``command`` with the user's shell on the node; wait for its exit.

        ``env`` is exported by the shell before the command (sshd drops the SSH "env"
        requests that are not in its AcceptEnv list).
        """
        limit = self.timeouts.command if timeout is None else timeout
        deadline = time.monotonic() + limit
        with map_ssh_errors(self.target):
            channel = self._transport.open_session(timeout=self.timeouts.connect)
            try:
                channel.fileno()  # a pipe that becomes readable on stdout, stderr or EOF
                channel.exec_command(_with_env(command, env))
                stdout, stderr = _read_all(channel, deadline, self.target, command, limit)
                if not channel.status_event.wait(max(0.0, deadline - time.monotonic())):
                    raise CommandTimeout(f"node {self.target.name}: `{command}` ran past {limit}s")
                exited = channel.exit_status
                # No status: killed by a signal, or the connection died.  paramiko
                # records a death before it closes the channels (is_active() lags).
                if exited == -1 and (self._transport.saved_exception or not self._transport.is_active()):
                    raise EOFError("the connection closed while the command ran")
            finally:
                channel.close()
        result = Result(
            self.target.name,
            command,
            exited,
            stdout.decode(errors="replace"),
            stderr.decode(errors="replace"),
        )
        if check and result.failed:
            raise CommandFailed(result)
        return result

    def put(self, local_path: str | Path, remote_path: str, mode: int | None = None) -> None:
        """Upload a local file over SFTP (the connection's one SFTP client)."""
        with open(local_path, "rb") as f:  # a missing local file is the caller's OSError
            self._upload(f, remote_path, mode)

    def put_bytes(self, data: bytes, remote_path: str, mode: int | None = None) -> None:
        """Write ``data`` into ``remote_path`` over SFTP."""
        self._upload(io.BytesIO(data), remote_path, mode)

    def get_bytes(self, remote_path: str) -> bytes:
        """The content of ``remote_path``, read over SFTP."""
        out = io.BytesIO()
        with map_ssh_errors(self.target, path=remote_path), self._sftp_lock:
            self._sftp_client().getfo(remote_path, out)
        return out.getvalue()

    def makedirs(self, remote_path: str, mode: int = 0o755) -> None:
        """``mkdir -p`` over SFTP (relative paths are from the login folder); one SFTP
        call for each folder that does not exist yet, none for those that do."""
        with map_ssh_errors(self.target, path=remote_path), self._sftp_lock:
            sftp = self._sftp_client()
            parts = [p for p in remote_path.split("/") if p]
            for i in range(1, len(parts) + 1):
                folder = ("/" if remote_path.startswith("/") else "") + "/".join(parts[:i])
                try:
                    sftp.stat(folder)
                except FileNotFoundError:
                    sftp.mkdir(folder, mode)

    def _upload(self, source: Any, remote_path: str, mode: int | None) -> None:
        with map_ssh_errors(self.target, path=remote_path), self._sftp_lock:
            sftp = self._sftp_client()
            sftp.putfo(source, remote_path, confirm=True)
            if mode is not None:
                sftp.chmod(remote_path, mode)

    def open_sftp(self) -> paramiko.SFTPClient:
        """A new SFTP client on this connection, the caller's to close: a long transfer
        (``remote.transfer``) has its own channel instead of holding the shared one."""
        with map_ssh_errors(self.target):
            sftp = paramiko.SFTPClient.from_transport(self._transport)
            if sftp is None:
                raise paramiko.SSHException("the node refused the SFTP subsystem")
        return sftp

    def _sftp_client(self) -> paramiko.SFTPClient:
        """The connection's one SFTP client (made on first use; hold ``_sftp_lock``)."""
        if self._sftp is None:
            self._sftp = paramiko.SFTPClient.from_transport(self._transport)
            if self._sftp is None:
                raise paramiko.SSHException("the node refused the SFTP subsystem")
        return self._sftp

    def close(self) -> None:
        with self._sftp_lock:
            if self._sftp is not None:
                self._sftp.close()
                self._sftp = None
        self._transport.close()

    def __enter__(self) -> SSHSession:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _load_key(target: SSHTarget) -> paramiko.Ed25519Key:
    try:
        return paramiko.Ed25519Key.from_private_key_file(str(target.key_file))
    except (OSError, paramiko.SSHException) as exc:
        raise AuthenticationFailed(
            f"cannot load the ed25519 private key {target.key_file} for node {target.name}: {exc}",
            hint="the fleet key must be an unencrypted OpenSSH ed25519 key readable by you",
        ) from exc


def _check_host_key(target: SSHTarget, offered: paramiko.PKey) -> None:
    """Raise HostKeyMismatch unless ``offered`` is the pinned key."""
    offered_fp = fingerprint(offered.asbytes())
    parts = target.host_key.split()
    try:
        pinned_blob = base64.b64decode(parts[1], validate=True) if len(parts) >= 2 else b""
    except binascii.Error:
        pinned_blob = b""
    where = f"node {target.name} at {target.host}:{target.port}"
    if not pinned_blob:
        raise HostKeyMismatch(
            f"no usable host key is pinned for {where}; it offers {offered.get_name()} {offered_fp}",
            expected="(none)",
            offered=offered_fp,
            hint="pin the key the provider reported when it created the node; never accept one unseen",
        )
    if pinned_blob != offered.asbytes():
        expected_fp = fingerprint(pinned_blob)
        raise HostKeyMismatch(
            f"{where} offered host key {offered.get_name()} {offered_fp}, but {parts[0]} {expected_fp} is pinned",
            expected=expected_fp,
            offered=offered_fp,
            hint="another machine may hold that address, or the node was re-created; if you "
            "re-created it, take its new key from the provider (`orch reconcile`), never from the node",
        )


def _with_env(command: str, env: Mapping[str, str] | None) -> str:
    if not env:
        return command
    for name in env:
        if not _ENV_NAME.match(name):
            raise ValueError(f"{name!r} is not an environment variable name")
    exports = " ".join(f"{name}={shlex.quote(value)}" for name, value in env.items())
    return f"export {exports}; {command}"


def _read_all(
    channel: paramiko.Channel, deadline: float, target: SSHTarget, command: str, limit: float
) -> tuple[bytes, bytes]:
    """Read stdout and stderr as they come (never one blocking the other) until EOF."""
    stdout, stderr = bytearray(), bytearray()
    while True:
        if channel.recv_ready():
            stdout += channel.recv(65536)
        elif channel.recv_stderr_ready():
            stderr += channel.recv_stderr(65536)
        elif channel.eof_received or channel.closed:
            while channel.recv_ready():  # data that came with the EOF
                stdout += channel.recv(65536)
            while channel.recv_stderr_ready():
                stderr += channel.recv_stderr(65536)
            return bytes(stdout), bytes(stderr)
        else:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CommandTimeout(f"node {target.name}: `{command}` ran past {limit}s")
            select.select([channel], [], [], remaining)


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())
