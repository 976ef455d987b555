"""Remote commands (EXEC, orchestrator/agent/commands.py): exit, output and timing as over
SSH, concurrency with each other and with tasks, timeouts that kill the process group,
truncated output, and what a dropped connection does to them."""

from __future__ import annotations

import time
from pathlib import Path

from orchestrator.agent.protocol import EXEC_DONE, HEARTBEAT, LOADED, RESULTS
from orchestrator.workspace import Workspace
from tests.helpers.agent import (
    MakeHome,
    exec_done,
    index_of,
    load,
    run_command,
    session_of,
    tasks,
    unique_sleep,
    wait_until,
)
from tests.helpers.agent_peer import AgentPeer
from tests.helpers.processes import commands_with


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
