"""The supervisor (orchestrator/agent/supervisor.py): it survives a killed agent and
leaves nothing on SIGTERM; ``ensure`` starts one detached supervisor, replaces it for
new agent code and pokes a waiting agent; ``stop`` ends it."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from orchestrator.agent.protocol import LOADED
from orchestrator.deploy import pki
from orchestrator.workspace import Workspace
from tests.helpers.agent import (
    PYTHON,
    MakeHome,
    exec_done,
    load,
    marked,
    port_pids,
    run_command,
    session_of,
    tasks,
    unique_sleep,
    wait_until,
)
from tests.helpers.agent_peer import AgentPeer
from tests.helpers.net import free_port
from tests.helpers.processes import alive, commands_with


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
    port = free_port()
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
