"""The agent's connection to the scheduler (orchestrator/agent/agent.py): the handshake and
heartbeats, mutual TLS that admits only this workspace's certificates both ways, and
what a dropped or silent connection does to the ports."""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

from orchestrator.agent.platforms import host_platform
from orchestrator.agent.protocol import ERROR, HEARTBEAT, LOADED
from orchestrator.deploy import pki
from orchestrator.workspace import Workspace
from tests.helpers.agent import FAKE_SHA, FAULTS_RELEASE, MakeHome, load, port_pids, session_of, tasks, wait_until
from tests.helpers.agent_peer import AgentPeer
from tests.helpers.processes import alive


def test_handshake_hello_and_heartbeats(ws: Workspace, peer: AgentPeer, make_home: MakeHome) -> None:
    home = make_home(ws, peer.address, heartbeat=0.3)
    home.add_faults_release()
    proc = home.start()
    session = session_of(peer, home)
    assert session.node == "n1"
    assert session.hello == {"node": "n1", "name": "n1-name", "slots": 2, "version": 1, "pid": proc.pid,
                             "releases": [{"release": FAULTS_RELEASE, "sha256": FAKE_SHA}],
                             "platform": host_platform()}
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
