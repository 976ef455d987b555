"""The node agent as it runs on a node: a real process (Debian's python3 when there is
one, from a copy of orchestrator/agent/ named ``orch_agent``, as bootstrap installs it),
real ports (worker_native/build/orch-port with the fault library), real mutual TLS,
against a real protocol peer (tests/agent_peer.py).  One test bootstraps real local
nodes and checks their agents dial in, then die with ``orch stop``.

Every process a test starts carries a marker in its environment; teardown kills
whatever still carries it and the tests that care check that nothing did.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from orchestrator import fleet
from orchestrator.agent import releases as agent_releases
from orchestrator.agent.frames import encode_task
from orchestrator.agent.protocol import (
    ERROR,
    EXEC,
    EXEC_DONE,
    HEARTBEAT,
    LOAD,
    LOAD_FAILED,
    LOADED,
    PORT_DIED,
    PORT_READY,
    RESULTS,
    UNLOAD,
    release_message,
)
from orchestrator.config import load_family, load_provider
from orchestrator.deploy import agent_install, pki
from orchestrator.deploy import releases as release_catalog
from orchestrator.deploy.bootstrap import BootstrapPlan, NodeLog, bootstrap_node
from orchestrator.deploy.packing import pack_release
from orchestrator.errors import ConfigError
from orchestrator.provision.registry import make_driver
from orchestrator.remote.fanout import ssh_target
from orchestrator.remote.ssh import SSHPool
from orchestrator.state import NodeRecord, NodeState, Store
from orchestrator.workspace import Workspace
from tests.agent_peer import AgentPeer, PeerSession, Received
from tests.integration.conftest import processes_of

REPO = Path(__file__).resolve().parents[2]
NATIVE = REPO / "worker_native"
PORT = NATIVE / "build" / "orch-port"
FAULTS = NATIVE / "build" / "libfaults.so"
# Debian's python3 is what the agent runs on nodes (3.11.2 on Debian 12: no tarfile filter)
PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").is_file() else sys.executable
MARK = "ORCH_TEST_AGENT"
FAKE_SHA = "f" * 64
FAULTS_RELEASE = "faults-1.0.0"


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    subprocess.run(["make", "-s", "-C", str(NATIVE)], check=True, capture_output=True)
    assert PORT.is_file() and FAULTS.is_file()


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


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


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


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace.init(tmp_path / "ws")


@pytest.fixture
def make_home(tmp_path: Path) -> Iterator[MakeHome]:
    homes: list[Home] = []

    def make(ws: Workspace, scheduler: str, *, node: str = "n1", heartbeat: float = 1.0,
             cert_ws: Workspace | None = None, with_cert: bool = True, slots: int = 2, **extra: Any) -> Home:
        folder = tmp_path / f"home-{len(homes)}" / "orch" / "agent"
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
                  "releases": "../releases", "include": str(NATIVE / "include"), "heartbeat": heartbeat,
                  "log": "agent.log", **extra}
        (folder / "agent.json").write_text(json.dumps(config))
        home = Home(folder, releases, secrets.token_hex(8), [])
        homes.append(home)
        return home

    try:
        yield make
    finally:
        for home in homes:
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


@pytest.fixture
def peer(ws: Workspace) -> Iterator[AgentPeer]:
    with AgentPeer(pki.server_ssl_context(ws), heartbeat=0.5) as running:
        yield running


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


# -- the conversation ------------------------------------------------------------------------


def test_handshake_hello_and_heartbeats(ws: Workspace, peer: AgentPeer, make_home: MakeHome) -> None:
    home = make_home(ws, peer.address, heartbeat=0.3)
    home.add_faults_release()
    proc = home.start()
    session = session_of(peer, home)
    assert session.node == "n1"
    assert session.hello == {"node": "n1", "name": "n1-name", "slots": 2, "version": 1, "pid": proc.pid,
                             "releases": [{"release": FAULTS_RELEASE, "sha256": FAKE_SHA}]}
    first = session.expect(HEARTBEAT)  # the agent's beat follows the interval in WELCOME (0.5 s)
    second = session.expect(HEARTBEAT)
    assert 0.3 < second.at - first.at < 1.0
    assert "connected to the scheduler" in home.log_text()
    # the scheduler may change the interval (a job's own): the agent beats at the new one
    session.control(HEARTBEAT, heartbeat=1.5)
    wait_until(lambda: "heartbeat 0.5 s -> 1.5 s" in home.log_text(), 5, "the new interval")
    third = session.expect(HEARTBEAT, where=lambda m: m.at > second.at + 0.5)
    fourth = session.expect(HEARTBEAT, where=lambda m: m.at > third.at)
    assert 1.2 < fourth.at - third.at < 2.5
    session.control(HEARTBEAT, heartbeat="soon")  # not a number of seconds: refused, the session ends
    refused = session.expect(ERROR)
    assert refused.body["reason"] == "HEARTBEAT: heartbeat 'soon' is not a positive number of seconds"


def test_refused_without_a_certificate_or_with_another_workspaces(ws: Workspace, tmp_path: Path,
                                                                  peer: AgentPeer, make_home: MakeHome) -> None:
    other = Workspace.init(tmp_path / "other")
    # a TLS client with no certificate at all
    client = ssl.create_default_context(cafile=str(pki.ca_cert_path(ws)))
    client.check_hostname = False
    with socket.create_connection(("127.0.0.1", peer.port), 5) as raw:
        try:
            with client.wrap_socket(raw) as tls:
                tls.settimeout(5)
                assert tls.recv(1) == b""
        except (ssl.SSLError, ConnectionResetError):
            pass
    # an agent whose certificate another workspace's CA issued, and one with none
    stranger = make_home(ws, peer.address, node="n2", cert_ws=other)
    stranger.start()
    bare = make_home(ws, peer.address, node="n3", with_cert=False)
    bare.start()
    wait_until(lambda: "before WELCOME" in stranger.log_text() and "cannot load" in bare.log_text(), 10,
               "the agents log why they cannot connect")
    time.sleep(0.5)
    assert peer.sessions == [] and peer.accepts == []
    assert "node.key" not in stranger.log_text() and "PRIVATE KEY" not in stranger.log_text()


def test_an_impostor_scheduler_is_refused(ws: Workspace, tmp_path: Path, make_home: MakeHome) -> None:
    other = Workspace.init(tmp_path / "other")
    with AgentPeer(pki.server_ssl_context(other)) as impostor:
        home = make_home(ws, impostor.address)
        home.start()
        wait_until(lambda: "certificate verify failed" in home.log_text(), 10, "the agent refuses the impostor")
        assert impostor.sessions == [] and impostor.accepts == []


def test_a_thousand_echo_tasks_over_two_ports_come_back_in_order(ws: Workspace, peer: AgentPeer,
                                                               make_home: MakeHome) -> None:
    home = make_home(ws, peer.address)
    home.add_faults_release()
    home.start()
    session = session_of(peer, home)
    assert load(session, "echo", "echo", [0, 1]).kind == LOADED
    for chunk in range(10):  # ten TASKS per port, interleaved, 50 frames each
        for port in (0, 1):
            seqs = range(chunk * 50, chunk * 50 + 50)
            session.tasks(port, tasks(*((s, f"p{port}-t{s}".encode()) for s in seqs)))
    for port in (0, 1):
        results = session.wait_results(port, 500)
        assert [r.seq for r in results] == list(range(500))
        assert all(r.ok and r.payload == f"p{port}-t{r.seq}".encode() for r in results)
    assert session.count(RESULTS) < 1000 / 5  # batched: many frames per RESULTS message


@pytest.mark.parametrize("case", ["segfault", "abort", "sigkill", "timeout"])
def test_a_dying_port_names_the_task_in_flight_then_comes_back(case: str, ws: Workspace, peer: AgentPeer,
                                                               make_home: MakeHome) -> None:
    function, data, reason = {
        "segfault": ("segv_on", b"crash", "killed by SIGSEGV"),
        "abort": ("abort_on", b"abort", "killed by SIGABRT"),
        "sigkill": ("hang_on", b"hang", "killed by SIGKILL"),
        "timeout": ("hang_on", b"hang", "task 3 ran past its timeout of 0.5 s (killed)"),
    }[case]
    home = make_home(ws, peer.address)
    home.add_faults_release()
    agent = home.start()
    session = session_of(peer, home)
    timeout = 0.5 if case == "timeout" else None
    assert load(session, "w", function, [0], timeout=timeout).kind == LOADED
    assert load(session, "w-other", "echo", [1]).kind == LOADED
    session.tasks(0, tasks((0, b"a"), (1, b"b"), (2, b"c"), (3, data), (4, b"d"), (5, b"e")))
    before = session.wait_results(0, 3)
    assert [r.seq for r in before] == [0, 1, 2]
    if case == "sigkill":
        (victim,) = [p for p in port_pids(agent.pid) if b"hang_on" in Path(f"/proc/{p}/cmdline").read_bytes()]
        time.sleep(0.2)  # well inside the hang
        os.kill(victim, signal.SIGKILL)
    died = session.expect(PORT_DIED, timeout=10)
    assert died.body == {"port": 0, "seq": 3, "reason": reason}
    last_result = max(i for i, m in enumerate(session.messages) if m.kind == RESULTS and m.port == 0)
    assert last_result < index_of(session, died)  # every result the port wrote went first
    if case == "timeout":
        result_at = session.messages[last_result].at
        assert 0.45 < died.at - result_at < 2.0
    ready = session.expect(PORT_READY)
    assert ready.body == {"port": 0} and index_of(session, ready) > index_of(session, died)
    assert [r.seq for r in session.results(0)] == [0, 1, 2]  # 4 and 5 never ran
    session.tasks(0, tasks((10, b"again"), (11, b"fine")))
    assert [(r.seq, r.payload) for r in session.wait_results(0, 5)[3:]] == [(10, b"again"), (11, b"fine")]
    session.tasks(1, tasks((20, b"other port")))  # the other port never noticed
    assert session.wait_results(1, 1)[0].payload == b"other port"
    assert agent.poll() is None


def test_load_failures_say_why(ws: Workspace, peer: AgentPeer, make_home: MakeHome) -> None:
    home = make_home(ws, peer.address)
    home.add_faults_release()
    home.start()
    session = session_of(peer, home)
    missing = load(session, "w1", "echo", [0], release="primes-9.9.9", sha="a" * 64)
    assert missing.kind == LOAD_FAILED and missing.body["missing"] is True
    wrong_sha = load(session, "w2", "echo", [0], sha="b" * 64)
    assert wrong_sha.kind == LOAD_FAILED and wrong_sha.body["missing"] is True
    nope = load(session, "w3", "no_such_function", [0, 1])
    assert nope.kind == LOAD_FAILED and nope.body["missing"] is False
    assert nope.body["reason"].startswith("exit 4: no such function in the library: orch-port: ")
    assert "no_such_function" in nope.body["reason"]
    nolib = load(session, "w4", "echo", [0], library="build/libnothing.so")
    assert nolib.kind == LOAD_FAILED and nolib.body["reason"].startswith("exit 5: the library could not be loaded")
    escape = load(session, "w5", "echo", [0], library="../../etc/passwd")
    assert escape.kind == LOAD_FAILED and "inside the release" in escape.body["reason"]


def test_unload_stops_ports_and_tasks_for_a_stopped_port_come_back(ws: Workspace, peer: AgentPeer,
                                                                   make_home: MakeHome) -> None:
    home = make_home(ws, peer.address)
    home.add_faults_release()
    agent = home.start()
    session = session_of(peer, home)
    assert load(session, "w", "echo", [0, 1]).kind == LOADED
    wait_until(lambda: len(port_pids(agent.pid)) == 2, what="two ports")
    session.control(UNLOAD, work="w")
    wait_until(lambda: port_pids(agent.pid) == [], what="no ports after UNLOAD")
    session.tasks(0, tasks((7, b"x")))
    assert session.expect(PORT_DIED).body == {"port": 0, "seq": 7, "reason": "port 0 is not running"}


def test_a_chatty_library_never_blocks_its_port(ws: Workspace, peer: AgentPeer, make_home: MakeHome) -> None:
    home = make_home(ws, peer.address)
    home.add_faults_release()
    home.start()
    session = session_of(peer, home)
    assert load(session, "w", "chatty", [0]).kind == LOADED
    count = 4000  # ~200 KiB on stderr, several times a pipe's buffer
    session.tasks(0, tasks(*((s, b"x") for s in range(count))))
    assert len(session.wait_results(0, count, timeout=30)) == count
    session.control(UNLOAD, work="w")
    wait_until(lambda: "more line(s) not logged" in home.log_text(), what="the count of lines not logged")
    log = home.log_text()
    assert "chatty on stderr" in log
    assert len(log.splitlines()) < 200


def test_a_port_writing_garbage_is_killed_and_restarted_ever_more_slowly(ws: Workspace, peer: AgentPeer,
                                                                        make_home: MakeHome) -> None:
    home = make_home(ws, peer.address)
    home.add_faults_release()
    fake = home.folder / "fake-port"  # not a port: bytes that are no result frames; at once but the 2nd time
    garbage = "printf 'this is not a result frame, not at all'; exec sleep 60"
    fake.write_text(f"#!/bin/sh\nif [ -e {home.folder}/started ]; then {garbage}; fi\n"
                    f"touch {home.folder}/started; sleep 0.8; {garbage}\n")
    fake.chmod(0o755)
    config = json.loads(home.config.read_text())
    home.config.write_text(json.dumps({**config, "port_binary": str(fake)}))
    agent = home.start()
    session = session_of(peer, home)
    assert load(session, "w", "echo", [0]).kind == LOADED  # quiet for its first 0.8 s
    first = session.expect(PORT_DIED)
    assert first.body["seq"] is None and first.body["reason"].startswith("corrupt result stream (bad result header")
    time.sleep(2.5)  # restarts after 0.1, 0.2, 0.4, 0.8 s ...: a handful, not a busy loop
    assert 3 <= session.count(PORT_DIED) <= 7, session.count(PORT_DIED)
    assert agent.poll() is None
    again = load(session, "w2", "echo", [1])  # at once: the LOAD itself fails, saying why
    assert again.kind == LOAD_FAILED and again.body["reason"].startswith("corrupt result stream")


# -- losing the scheduler ----------------------------------------------------------------------


def test_a_dropped_connection_kills_the_ports_and_the_agent_dials_again(ws: Workspace, peer: AgentPeer,
                                                                      make_home: MakeHome) -> None:
    home = make_home(ws, peer.address)
    home.add_faults_release()
    agent = home.start()
    session = session_of(peer, home)
    assert load(session, "w", "hang_on", [0, 1]).kind == LOADED
    session.tasks(0, tasks((0, b"hang")))  # a port busy in C code dies all the same
    wait_until(lambda: len(port_pids(agent.pid)) == 2, what="two ports")
    ports = port_pids(agent.pid)
    session.close()
    again = session_of(peer, home, 1, timeout=5)
    assert again.hello["pid"] == agent.pid
    assert not any(alive(p) for p in ports) and port_pids(agent.pid) == []
    assert again.hello["releases"] == [{"release": FAULTS_RELEASE, "sha256": FAKE_SHA}]
    assert "killed ports [0, 1]" in home.log_text()


def test_with_no_scheduler_the_agent_waits_small_then_dials_in(ws: Workspace, make_home: MakeHome) -> None:
    port = _free_port()
    home = make_home(ws, f"127.0.0.1:{port}")
    agent = home.start()
    wait_until(lambda: "(attempt 4; retrying)" in home.log_text(), what="a few refused dials")
    maps = Path(f"/proc/{agent.pid}/maps").read_text()
    assert "_asyncio" not in maps and "_ssl" not in maps  # waiting costs no asyncio, no ssl
    with AgentPeer(pki.server_ssl_context(ws), port=port) as late:
        assert session_of(late, home, timeout=5).hello["pid"] == agent.pid  # backoff is capped at 2 s
    stopper = make_home(ws, f"127.0.0.1:{port}", node="n2")
    waiting = stopper.start()
    wait_until(lambda: "attempt 1;" in stopper.log_text(), what="the first refused dial")
    waiting.send_signal(signal.SIGTERM)
    assert waiting.wait(5) == 0 and "stopped" in stopper.log_text()


def test_dialing_backs_off_exponentially_with_jitter_up_to_two_seconds(ws: Workspace, make_home: MakeHome) -> None:
    with AgentPeer(pki.server_ssl_context(ws), reject=True) as rejecting:
        home = make_home(ws, rejecting.address)
        home.start()
        wait_until(lambda: len(rejecting.accepts) >= 8, 20, "eight dials")
        gaps = [b - a for a, b in zip(rejecting.accepts, rejecting.accepts[1:], strict=False)][:7]
    # after the k-th failure the agent waits uniform(d/2, d), d = min(2, 0.1 * 2**(k-1)); plus a TLS dial
    for k, gap in enumerate(gaps, start=1):
        d = min(2.0, 0.1 * 2 ** (k - 1))
        assert d / 2 - 0.02 < gap < d + 0.4, (k, gaps)
    assert gaps[5] > 0.95 and gaps[6] > 0.95  # capped at 2 s, never below 1 s there
    assert len(home.log_text().splitlines()) < 12  # failures logged at 1, 2, 4, 8, ... only


def test_a_silent_scheduler_is_lost_after_three_heartbeats(ws: Workspace, make_home: MakeHome) -> None:
    with AgentPeer(pki.server_ssl_context(ws), heartbeat=0.2) as quiet:
        home = make_home(ws, quiet.address)
        home.add_faults_release()
        agent = home.start()
        session = session_of(quiet, home)
        assert load(session, "w", "echo", [0]).kind == LOADED
        wait_until(lambda: len(port_pids(agent.pid)) == 1, what="one port")
        ports = port_pids(agent.pid)
        session.silent = True
        assert session.closed.wait(5), "the agent kept a silent connection"
        silence = session.closed_at - session.last_sent
        assert 0.55 < silence < 1.2, silence
        assert not any(alive(p) for p in ports)
        assert session_of(quiet, home, 1, timeout=5).hello["pid"] == agent.pid
        assert "nothing from the scheduler" in home.log_text()


# -- releases -----------------------------------------------------------------------------------


def test_release_is_installed_built_and_loaded(ws: Workspace, peer: AgentPeer, make_home: MakeHome,
                                               tmp_path: Path) -> None:
    source = tmp_path / "primes"
    shutil.copytree(REPO / "releases" / "primes", source, ignore=shutil.ignore_patterns("build", "*.o", "*.so"))
    packed = pack_release(source, max_bytes=64 << 20)
    manifest = packed.manifest
    folder = f"{manifest.name}-{manifest.version}"
    home = make_home(ws, peer.address)
    home.start()
    session = session_of(peer, home)
    assert session.hello["releases"] == []

    def load_primes(work: str) -> Received:
        return load(session, work, "count_primes", [0], release=folder, sha=packed.sha256, library=manifest.library)

    first = load_primes("j1")
    assert first.kind == LOAD_FAILED and first.body["missing"] is True
    corrupt = packed.data[:-1] + bytes([packed.data[-1] ^ 1])
    session.send(release_message({"release": folder, "sha256": packed.sha256, "build": manifest.build}, corrupt))
    bad = session.expect(LOAD_FAILED, where=lambda m: m.body.get("work") == "j1")
    assert bad.body["missing"] is False and "sha256" in bad.body["reason"]
    again = load_primes("j1")  # the scheduler's LOAD behind that RELEASE hears why, not "missing"
    assert again.kind == LOAD_FAILED and again.body == {**bad.body, "work": "j1"}
    session.send(release_message({"release": folder, "sha256": packed.sha256, "build": manifest.build},
                                 packed.data))
    assert load_primes("j2").kind == LOADED  # handled after the install: the agent keeps order
    session.tasks(0, tasks((0, b"0 100"), (1, b"100 1000")))
    assert [r.payload.strip() for r in session.wait_results(0, 2)] == [b"25", b"143"]
    built_folder = home.releases / folder
    assert (built_folder / agent_releases.SHA_FILE).read_text().strip() == packed.sha256
    assert not (home.releases / f"{folder}.new").exists()
    session.close()
    assert session_of(peer, home, 1).hello["releases"] == [{"release": folder, "sha256": packed.sha256}]


def _tarball(members: list[tuple[str, bytes | str | None]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            if isinstance(content, bytes):
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
            elif isinstance(content, str):
                info.type, info.linkname = tarfile.SYMTYPE, content
                tar.addfile(info)
            else:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
    return out.getvalue()


@pytest.mark.parametrize(("members", "error"), [
    ([("r/", None), ("r/ok", b"1"), ("r/../../evil", b"x")], "climbs out"),
    ([("r/", None), ("/abs", b"x")], "absolute"),
    ([("r/", None), ("r/link", "/etc"), ("r/link/passwd", b"x")], "absolute"),
    ([("r/", None), ("r/up", "../../.."), ("r/up/x", b"x")], "outside"),
])
def test_unpacking_refuses_what_could_escape(members: list[tuple[str, bytes | str | None]], error: str,
                                            tmp_path: Path) -> None:
    data = _tarball(members)
    dest = tmp_path / "releases" / "r-1"
    dest.parent.mkdir()
    with pytest.raises(ValueError, match=error):
        agent_releases.unpack_release(data, hashlib.sha256(data).hexdigest(), dest)
    assert list(dest.parent.iterdir()) == [] and not (tmp_path / "evil").exists()


def test_unpacking_strips_the_top_folder(tmp_path: Path) -> None:
    data = _tarball([("top/", None), ("top/a.c", b"int x;"), ("top/sub/", None), ("top/sub/b", b"b"),
                     ("top/link", "sub/b")])
    dest = tmp_path / "r-1"
    agent_releases.unpack_release(data, hashlib.sha256(data).hexdigest(), dest)
    assert (dest / "a.c").read_bytes() == b"int x;" and (dest / "sub" / "b").read_bytes() == b"b"
    assert os.readlink(dest / "link") == "sub/b"
    with pytest.raises(ValueError, match="sha256"):
        agent_releases.unpack_release(data, "0" * 64, dest)
    assert (dest / "a.c").exists()  # a refused tarball leaves the installed release alone


# -- the supervisor ----------------------------------------------------------------------------


def test_the_supervisor_survives_a_killed_agent_and_leaves_nothing_on_sigterm(
        ws: Workspace, peer: AgentPeer, make_home: MakeHome) -> None:
    home = make_home(ws, peer.address)
    home.add_faults_release()
    supervisor = home.start("supervise")
    first = session_of(peer, home)
    assert (home.folder / "agent.pid").read_text().strip() == str(supervisor.pid)
    status = home.command("status")
    assert status.returncode == 0 and f"pid {supervisor.pid}" in status.stdout
    assert home.command("ensure").stdout.strip() == "running"
    assert load(first, "w", "hang_on", [0]).kind == LOADED
    first.tasks(0, tasks((0, b"hang")))  # a port that would never end on its own
    agent_pid = first.hello["pid"]
    wait_until(lambda: len(port_pids(agent_pid)) == 1, what="the port")
    (hung,) = port_pids(agent_pid)
    # a command left running on purpose by an earlier one, and a command still running
    kept, running = unique_sleep(), unique_sleep()
    run_command(first, "daemon", f"nohup sleep {kept} >/dev/null 2>&1 &")
    assert exec_done(first, "daemon").body["exit"] == 0
    run_command(first, "long", f"sleep {running} & sleep {running}; wait", timeout=120)
    wait_until(lambda: len(commands_with(f"sleep\0{running}")) == 2 and len(commands_with(kept)) == 1, 5,
               "the commands")
    (daemon,) = commands_with(kept)
    killed_at = time.monotonic()
    os.kill(agent_pid, signal.SIGKILL)
    second = session_of(peer, home, 1, timeout=10)
    assert second.hello["pid"] not in (agent_pid, supervisor.pid)
    assert 0.5 <= time.monotonic() - killed_at < 5
    assert not alive(hung), "the killed agent's port outlived it"
    wait_until(lambda: commands_with(running) == [], 5, "the killed agent's running command gone")
    assert "killed 1 command(s) the agent left running" in home.log_text()
    assert commands_with(kept) == [daemon]  # as after SSH: what was detached stays
    os.kill(daemon, signal.SIGKILL)
    wait_until(lambda: not Path(f"/proc/{daemon}").exists(), 5, "the detached command reaped (no zombie)")
    assert "starting it again in 0.5 s" in home.log_text()
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(10) == 0
    wait_until(lambda: not marked(home.token), 5, "every process gone")
    assert not (home.folder / "agent.pid").exists()
    assert home.command("status").returncode == 1
    assert second.closed.wait(5)


def test_ensure_starts_a_detached_supervisor_and_stop_ends_it(ws: Workspace, peer: AgentPeer,
                                                              make_home: MakeHome) -> None:
    home = make_home(ws, peer.address)
    racing = [subprocess.Popen([PYTHON, "-m", "orch_agent", "ensure", "--config", str(home.config)],
                               env=home.env(), stdout=subprocess.PIPE, text=True) for _ in range(3)]
    said = sorted(p.communicate(timeout=30)[0].strip() for p in racing)
    assert said == ["running", "running", "started"]  # three at once start one supervisor
    session = session_of(peer, home)
    assert home.command("ensure").stdout.strip() == "running"
    second = home.command("supervise")  # a second supervisor refuses to run beside the first
    assert second.returncode == 1 and "another supervisor holds" in home.log_text()
    assert home.command("status", "--current").returncode == 0
    # new agent code: ensure replaces the supervisor
    (home.folder / "orch_agent" / "extra.py").write_text("# a new module\n")
    assert home.command("status", "--current").returncode == 3
    assert home.command("ensure").stdout.strip() == "started"
    assert session.closed.wait(10)
    session_of(peer, home, 1)
    stopped = home.command("stop")
    assert stopped.returncode == 0 and stopped.stdout.startswith("stopped")
    wait_until(lambda: not marked(home.token), 10, "every process gone")


def test_ensure_pokes_a_waiting_agent_to_dial_at_once(ws: Workspace, make_home: MakeHome) -> None:
    # Backoff of 30 to 60 s: only the poke from `ensure` can bring the agent in sooner.
    port = _free_port()
    home = make_home(ws, f"127.0.0.1:{port}", backoff_start=30, backoff_cap=60)
    home.start("supervise")
    wait_until(lambda: "(attempt 1; retrying)" in home.log_text(), what="a refused dial (first phase)")
    with AgentPeer(pki.server_ssl_context(ws), port=port, reject=True) as rejecting:
        assert home.command("ensure").stdout.strip() == "running"
        wait_until(lambda: len(rejecting.accepts) >= 1, 10, "the poked agent's TLS dial")
        wait_until(lambda: home.log_text().count("(attempt 1; retrying)") == 2, 10,
                   "a refused TLS dial (second phase)")
    with AgentPeer(pki.server_ssl_context(ws), port=port) as good:
        assert home.command("ensure").stdout.strip() == "running"
        session_of(good, home, 0, timeout=10)  # the first session (it may be there already)
    assert home.command("stop").returncode == 0


# -- on a real node ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.sshd
def test_bootstrap_starts_the_agent_and_stop_ends_it(tmp_path: Path) -> None:
    ws = Workspace.init(tmp_path / "ws")
    shutil.copytree(REPO / "releases" / "primes", ws.releases_src_dir / "primes",
                    ignore=shutil.ignore_patterns("build", "*.o", "*.so"))
    port = _free_port()
    ws.settings_file.write_text(f"scheduler_port: {port}\n")
    (ws.providers_dir / "local.yaml").write_text("driver: local\nlabels: [private]\nmax_nodes: 8\n")
    (ws.families_dir / "workers.yaml").write_text(
        "release: primes\ncount: 2\nworkers_per_node: 3\nplacement:\n  providers: [local]\n")
    store = Store.open(ws.state_db)
    dirs: dict[str, str] = {}
    try:
        report = fleet.spawn(ws, store, "workers")
        assert report.ok, [str(f) for f in report.failures]
        nodes = fleet.select_nodes(store, all_nodes=True)
        assert {agent_install.scheduler_endpoint(ws, n) for n in nodes} == {("127.0.0.1", port)}
        driver = make_driver(ws, load_provider(ws, "local"))
        dirs = {str(n.id): n.extra["node_dir"] for n in driver.list_nodes()}
        assert len(dirs) == 2
        for provider_id, node_dir in dirs.items():
            cmdlines = [Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
                        for p in processes_of(provider_id, node_dir) if alive(p)]
            assert any(b"orch_agent" in c and (b"ensure" in c or b"supervise" in c) for c in cmdlines), provider_id
        with AgentPeer(pki.server_ssl_context(ws), heartbeat=0.5, port=port) as scheduler:
            sessions = [scheduler.wait_session(i, timeout=10) for i in range(2)]
            assert {s.node for s in sessions} == {n.id for n in nodes}
            assert all(s.hello["slots"] == 3 and s.hello["releases"][0]["release"].startswith("primes-")
                       for s in sessions)
            assert agent_install.ensure_agents(ws, store, nodes, None) == {n.id: "running" for n in nodes}
            # the release bootstrap built, through the port runner the agent built: real work
            first = sessions[0]
            (installed,) = first.hello["releases"]
            assert load(first, "job", "count_primes", [0, 1, 2], release=installed["release"],
                        sha=installed["sha256"], library="build/libprimes.so").kind == LOADED
            first.tasks(2, tasks((0, b"0 100"), (1, b"100 1000")))
            assert [r.payload.strip() for r in first.wait_results(2, 2)] == [b"25", b"143"]
            home_dir = Path(dirs[next(n.provider_node_id or n.id for n in nodes if n.id == first.node)]) / "home"
            stamp = home_dir / "orch" / "bin" / "orch-port.sha256"
            assert stamp.read_text().strip() == agent_install.port_digest()
            with SSHPool() as pool:  # stop one node's agent; ensure_agents brings it back
                stopped_node = next(n for n in nodes if n.id == sessions[1].node)
                assert agent_install.stop_agent(pool, stopped_node, ws=ws).startswith("stopped (pid ")
                assert sessions[1].closed.wait(10)
                assert agent_install.ensure_agents(ws, store, [stopped_node], pool) == {stopped_node.id: "started"}
                sessions[1] = scheduler.wait_session(2, timeout=10)
                assert sessions[1].node == stopped_node.id
            # bootstrapping a node again keeps its agent as it is (same code, same config)
            release = store.get_release("primes")
            node = store.get_node(sessions[0].node)
            plan = BootstrapPlan(node=node, target=ssh_target(ws, node), family=load_family(ws, "workers"),
                                 release=release, manifest=release_catalog.manifest_of(release),
                                 tarball=release_catalog.read_release(ws, release))
            with SSHPool() as pool:
                log = NodeLog(tmp_path / "again.log")
                bootstrap_node(plan, pool, log, lambda node, stage: None)
            assert "uploaded the agent" not in log.path.read_text()
            assert not any(s.closed.is_set() for s in sessions)
            fleet.stop(ws, store, nodes)
            assert all(s.closed.wait(10) for s in sessions)
        for node_id, node_dir in dirs.items():
            assert processes_of(node_id, node_dir) == []
    finally:
        live = fleet.select_nodes(store, all_nodes=True)
        if live:
            fleet.stop(ws, store, live)
        store.close()


def test_where_agents_dial(tmp_path: Path) -> None:
    ws = Workspace.init(tmp_path / "ws")
    with Store.open(ws.state_db) as store:
        for name, driver in (("laptop", "local"), ("lab", "netns"), ("metal", "hosts")):
            store.upsert_provider(name, driver, {})
        wid = store.workspace_id

    def node(provider: str, **extra: object) -> NodeRecord:
        return NodeRecord(id=f"{provider}-1", family="w", provider=provider, state=NodeState.READY, extra=dict(extra))

    port = agent_install.default_scheduler_port(wid)
    assert 20000 <= port <= 29999 and port == agent_install.default_scheduler_port(wid)
    assert agent_install.scheduler_endpoint(ws, node("laptop")) == ("127.0.0.1", port)
    assert agent_install.scheduler_endpoint(ws, node("lab", subnet="10.213.7.0/24")) == ("10.213.7.1", port)
    with pytest.raises(ConfigError, match="scheduler_address"):
        agent_install.scheduler_endpoint(ws, node("metal"))
    ws.settings_file.write_text("scheduler_address: 192.0.2.10\nscheduler_port: 24000\n")
    assert agent_install.scheduler_endpoint(ws, node("metal")) == ("192.0.2.10", 24000)
    assert agent_install.scheduler_endpoint(ws, node("laptop")) == ("127.0.0.1", 24000)


# -- remote commands (EXEC) ------------------------------------------------------------------------


def run_command(session: PeerSession, ident: str, command: str, **fields: Any) -> None:
    session.control(EXEC, id=ident, command=command, **fields)


def exec_done(session: PeerSession, ident: str, timeout: float = 10.0) -> Received:
    return session.expect(EXEC_DONE, timeout=timeout, where=lambda m: m.body.get("id") == ident)


def commands_with(marker: str) -> list[int]:
    """Live (non-zombie) pids whose command line holds ``marker``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline and alive(int(proc.name)):
            found.append(int(proc.name))
    return found


def unique_sleep() -> str:
    """A ``sleep`` argument no other process has: its command line is the test's marker."""
    return f"100.{secrets.randbelow(10**9):09d}"


def test_exec_reports_exit_stdout_and_stderr(ws: Workspace, peer: AgentPeer, make_home: MakeHome) -> None:
    home = make_home(ws, peer.address)
    home.start()
    session = session_of(peer, home)
    run_command(session, "c1", "echo out; echo err >&2; exit 3", timeout=10, max_output=1000)
    done = exec_done(session, "c1")
    assert set(done.body) == {"id", "exit", "stdout", "stderr", "truncated", "seconds", "reason"}
    assert {k: v for k, v in done.body.items() if k != "seconds"} == {
        "id": "c1", "exit": 3, "stdout": "out\n", "stderr": "err\n", "truncated": False, "reason": ""}
    assert 0 <= done.body["seconds"] < 5
    # defaults (no timeout, no max_output), the home folder, stdin from /dev/null, bytes that are not UTF-8
    run_command(session, "c2", "pwd; cat; printf 'caf\\303\\251 \\377\\n'")
    assert exec_done(session, "c2").body["stdout"] == f"{home.home_dir}\ncafé \ufffd\n"
    run_command(session, "c3", "kill -9 $$")  # as over SSH: killed by a signal is exit -1
    killed = exec_done(session, "c3").body
    assert (killed["exit"], killed["reason"]) == (-1, "killed by signal 9 (SIGKILL)")
    run_command(session, "c4", "")
    bad = exec_done(session, "c4").body
    assert bad["exit"] is None and bad["reason"].startswith("bad EXEC: command")
    run_command(session, "c5", "true", timeout=0)
    assert exec_done(session, "c5").body["reason"].startswith("bad EXEC: timeout 0")
    # as over SSH: no signal ignored or blocked (a pipe's writer dies quietly of SIGPIPE),
    # and the command leads a session (and process group) of its own
    run_command(session, "c6", "yes | head -n 1; grep -E '^Sig(Ign|Blk)' /proc/self/status; "
                               "awk '{print ($1 == $6) ? \"leader\" : \"member\"}' /proc/$$/stat")
    piped = exec_done(session, "c6").body
    assert (piped["exit"], piped["stderr"]) == (0, "")
    assert piped["stdout"] == "y\nSigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\nleader\n"
    assert "exec 'c1' `echo out; echo err >&2; exit 3`: exit 3 after" in home.log_text()
    assert not session.closed.is_set()


def test_execs_run_concurrently_with_each_other_and_with_tasks(ws: Workspace, peer: AgentPeer,
                                                               make_home: MakeHome) -> None:
    home = make_home(ws, peer.address)
    home.add_faults_release()
    home.start()
    session = session_of(peer, home)
    assert load(session, "echo", "echo", [0]).kind == LOADED
    beats_before = session.count(HEARTBEAT)
    sent = time.monotonic()
    run_command(session, "a", "sleep 1; echo a")
    run_command(session, "b", "echo b")
    session.tasks(0, tasks((0, b"while a sleeps")))
    b = exec_done(session, "b")
    assert session.wait_results(0, 1, timeout=1)[0].payload == b"while a sleeps"
    a = exec_done(session, "a")
    assert (a.body["exit"], a.body["stdout"], b.body["exit"], b.body["stdout"]) == (0, "a\n", 0, "b\n")
    assert index_of(session, b) < index_of(session, a)  # answered in the order they finished
    assert b.at - sent < 0.9  # b did not wait behind a
    assert 0.95 < a.at - sent < 2.0
    assert 0.95 <= a.body["seconds"] < 2.0 and b.body["seconds"] < 0.9
    result_at = next(m.at for m in session.messages if m.kind == RESULTS)
    assert result_at < a.at  # the port's result did not wait behind a either
    assert session.count(HEARTBEAT) - beats_before >= 1  # heartbeats went on (every 0.5 s)
    session.tasks(0, tasks((1, b"after")))
    assert session.wait_results(0, 2)[1].payload == b"after"


def test_exec_past_its_timeout_kills_the_whole_process_group(ws: Workspace, peer: AgentPeer,
                                                             make_home: MakeHome) -> None:
    home = make_home(ws, peer.address)
    home.start()
    session = session_of(peer, home)
    mark = unique_sleep()
    run_command(session, "t", f"echo started; sleep {mark} & sleep {mark}; wait", timeout=0.5)
    # (on a machine loaded enough, the kill may come before the sleeps are seen here)
    wait_until(lambda: len(commands_with(f"sleep\0{mark}")) == 2 or session.count(EXEC_DONE), 5,
               "the two sleeps")
    done = exec_done(session, "t")
    assert done.body["exit"] is None and done.body["reason"] == "timed out after 0.5 s"
    assert done.body["stdout"] == "started\n"  # what it wrote before the kill is kept
    assert 0.5 <= done.body["seconds"] < 2.0
    wait_until(lambda: commands_with(mark) == [], 5, "no process of the command left")


def test_exec_output_over_max_output_is_truncated_and_drained(ws: Workspace, peer: AgentPeer,
                                                              make_home: MakeHome) -> None:
    home = make_home(ws, peer.address)
    home.start()
    session = session_of(peer, home)
    # 300 KB on stdout, several pipe buffers: a command that was not drained would block
    run_command(session, "big", "head -c 300000 /dev/zero | tr '\\0' x; echo finished >&2", max_output=1000,
                timeout=20)
    big = exec_done(session, "big", timeout=20).body
    assert big["exit"] == 0 and big["reason"] == "" and big["truncated"] is True
    assert big["stdout"] == "x" * 1000 and big["stderr"] == "finished\n"
    run_command(session, "exact", "printf 12345", max_output=5)
    exact = exec_done(session, "exact").body
    assert exact["stdout"] == "12345" and exact["truncated"] is False
    run_command(session, "none", "echo a; echo b >&2", max_output=0)
    none = exec_done(session, "none").body
    assert (none["stdout"], none["stderr"], none["truncated"], none["exit"]) == ("", "", True, 0)


def test_a_dropped_connection_kills_running_execs(ws: Workspace, peer: AgentPeer, make_home: MakeHome) -> None:
    home = make_home(ws, peer.address)
    agent = home.start()
    session = session_of(peer, home)
    mark = unique_sleep()
    run_command(session, "long", f"sleep {mark} & sleep {mark}; wait", timeout=60)
    wait_until(lambda: len(commands_with(f"sleep\0{mark}")) == 2, 5, "the two sleeps")
    session.close()
    again = session_of(peer, home, 1, timeout=5)
    assert again.hello["pid"] == agent.pid
    wait_until(lambda: commands_with(mark) == [], 5, "no process of the command left")
    assert session.count(EXEC_DONE) == 0 and again.count(EXEC_DONE) == 0
    assert "killed 1 running command(s)" in home.log_text()
    run_command(again, "next", "echo still here")  # the new connection runs commands as before
    assert exec_done(again, "next").body["stdout"] == "still here\n"


def test_exec_that_cannot_start_says_why(ws: Workspace, peer: AgentPeer, make_home: MakeHome,
                                         tmp_path: Path) -> None:
    home = make_home(ws, peer.address)
    missing = tmp_path / "no-such-home"
    home.extra_env["HOME"] = str(missing)
    home.start()
    session = session_of(peer, home)
    run_command(session, "x", "echo never")
    done = exec_done(session, "x").body
    assert done["exit"] is None and done["stdout"] == "" and done["truncated"] is False
    assert done["reason"].startswith(f"cannot start /bin/sh in {missing}: FileNotFoundError")
    time.sleep(0.6)
    assert not session.closed.is_set()
