"""The node agent as tests run it: a real process (Debian's python3 when there is one)
from a copy of orchestrator/agent/ named ``orch_agent`` in a home laid out as bootstrap
lays it out, and the helpers that talk to it through an ``AgentPeer`` (agent_peer.py).

Every process an agent's test starts carries ``MARK=<its home's token>`` in its
environment: :func:`end_home` kills whatever still carries it and checks that nothing
did survive.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.agent import releases as agent_releases
from orchestrator.agent.frames import encode_task
from orchestrator.agent.protocol import EXEC, EXEC_DONE, LOAD, LOAD_FAILED, LOADED
from orchestrator.deploy import pki
from orchestrator.workspace import Workspace
from tests.helpers.agent_peer import AgentPeer, PeerSession, Received
from tests.helpers.native import FAULTS, INCLUDE, PORT
from tests.helpers.workspace import REPO

# Debian's python3 is what the agent runs on nodes (3.11.2 on Debian 12: no tarfile filter)
PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").is_file() else sys.executable
MARK = "ORCH_TEST_AGENT"
FAKE_SHA = "f" * 64
FAULTS_RELEASE = "faults-1.0.0"


# -- processes -----------------------------------------------------------------------------


def marked(token: str) -> list[int]:
    """Live (non-zombie) pids whose environment carries MARK=token."""
    marker = f"{MARK}={token}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker not in (proc / "environ").read_bytes().split(b"\0"):
                continue
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        if stat[stat.rfind(")") + 2] not in "ZX":
            found.append(int(proc.name))
    return found


def port_pids(agent_pid: int) -> list[int]:
    """The agent's live orch-port children."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[1]) == agent_pid and fields[0] not in "ZX" and cmdline.startswith(str(PORT).encode()):
            pids.append(int(proc.name))
    return sorted(pids)


def wait_until(check: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        time.sleep(0.02)


def unique_sleep() -> str:
    """A ``sleep`` argument no other process has: its command line is the test's marker."""
    return f"100.{secrets.randbelow(10**9):09d}"


# -- an agent's home, as bootstrap lays it out ---------------------------------------------------


@dataclass
class Home:
    folder: Path  # ~/orch/agent
    releases: Path
    token: str
    procs: list[subprocess.Popen[bytes]]
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def home_dir(self) -> Path:
        """The node user's home ($HOME of the agent): the folder holding ``orch/``."""
        return self.folder.parent.parent

    @property
    def config(self) -> Path:
        return self.folder / "agent.json"

    @property
    def log(self) -> Path:
        return self.folder / "agent.log"

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def env(self) -> dict[str, str]:
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(self.folder),
                MARK: self.token, "LANG": "C.UTF-8", "HOME": str(self.home_dir), **self.extra_env}

    def command(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run([PYTHON, "-m", "orch_agent", *args, "--config", str(self.config)],
                              env=self.env(), capture_output=True, text=True, timeout=timeout)

    def start(self, command: str = "run") -> subprocess.Popen[bytes]:
        with open(self.folder / "console.log", "ab") as console:
            proc = subprocess.Popen([PYTHON, "-m", "orch_agent", command, "--config", str(self.config)],
                                    env=self.env(), start_new_session=True, stdin=subprocess.DEVNULL,
                                    stdout=console, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def why(self) -> str:
        """What the agent did: exit codes, its log and console (for failure messages)."""
        console = self.folder / "console.log"
        return (f"exit codes {[p.poll() for p in self.procs]}\n--- log:\n{self.log_text()[-3000:]}"
                f"--- console:\n{console.read_text()[-2000:] if console.exists() else ''}")

    def add_faults_release(self) -> None:
        folder = self.releases / FAULTS_RELEASE
        (folder / "build").mkdir(parents=True, exist_ok=True)
        shutil.copy(FAULTS, folder / "build" / "libfaults.so")
        (folder / agent_releases.SHA_FILE).write_text(FAKE_SHA + "\n")


MakeHome = Callable[..., Home]
"""The ``make_home`` fixture: ``make_home(ws, scheduler, *, node="n1", ...)``, see :func:`new_home`."""


def new_home(root: Path, ws: Workspace, scheduler: str, *, node: str = "n1", heartbeat: float = 1.0,
             cert_ws: Workspace | None = None, with_cert: bool = True, slots: int = 2, **extra: Any) -> Home:
    """An agent's home under ``root`` (``root/orch/agent``) for ``node``, dialing
    ``scheduler`` (HOST:PORT) with a certificate of ``cert_ws``'s CA (``ws``'s by default;
    none without ``with_cert``) and trusting ``ws``'s CA; ``extra`` goes to agent.json."""
    folder = root / "orch" / "agent"
    package = folder / "orch_agent"
    package.mkdir(parents=True)
    for source in (REPO / "orchestrator" / "agent").glob("*.py"):
        shutil.copy(source, package / source.name)
    shutil.copy(pki.ca_cert_path(ws), folder / "ca.crt")
    if with_cert:
        cert, key = pki.issue_node_cert(cert_ws or ws, node)
        (folder / "node.crt").write_bytes(cert)
        (folder / "node.key").write_bytes(key)
        (folder / "node.key").chmod(0o600)
    releases = folder.parent / "releases"
    releases.mkdir()
    config = {"node": node, "name": f"{node}-name", "scheduler": [scheduler], "slots": slots,
              "ca": "ca.crt", "cert": "node.crt", "key": "node.key", "port_binary": str(PORT),
              "releases": "../releases", "include": str(INCLUDE), "heartbeat": heartbeat,
              "log": "agent.log", **extra}
    (folder / "agent.json").write_text(json.dumps(config))
    return Home(folder, releases, secrets.token_hex(8), [])


def end_home(home: Home) -> None:
    """Kill every process that carries the home's mark, reap what the test started, and
    check that nothing survived."""
    for _ in range(50):
        pids = marked(home.token)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    for proc in home.procs:
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert not marked(home.token), f"processes of the test survived: {marked(home.token)}"


# -- talking to it ---------------------------------------------------------------------------------


def session_of(peer: AgentPeer, home: Home, index: int | None = None, timeout: float = 15.0) -> PeerSession:
    try:
        return peer.wait_session(index, timeout=timeout)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{home.why()}") from None


def load(session: PeerSession, work: str, function: str, ports: list[int], *, timeout: float | None = 5.0,
         release: str = FAULTS_RELEASE, sha: str = FAKE_SHA, library: str = "build/libfaults.so") -> Received:
    session.control(LOAD, work=work, release=release, sha256=sha, library=library, function=function,
                    ports=ports, task_timeout=timeout)
    return session.expect_any((LOADED, LOAD_FAILED), where=lambda m: m.body.get("work") == work)


def tasks(*items: tuple[int, bytes], attempt: int = 1) -> bytes:
    return b"".join(encode_task(seq, attempt, 0.5, data) for seq, data in items)


def index_of(session: PeerSession, message: Received) -> int:
    with session.cond:
        return next(i for i, m in enumerate(session.messages) if m is message)


def run_command(session: PeerSession, ident: str, command: str, **fields: Any) -> None:
    session.control(EXEC, id=ident, command=command, **fields)


def exec_done(session: PeerSession, ident: str, timeout: float = 10.0) -> Received:
    return session.expect(EXEC_DONE, timeout=timeout, where=lambda m: m.body.get("id") == ident)
