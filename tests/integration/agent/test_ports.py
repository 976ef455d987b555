"""Ports (orchestrator/agent/ports.py): tasks in and results out in order, ports that die
(named task, restart, backoff), LOAD failures that say why, UNLOAD, chatty and broken
libraries."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from orchestrator.agent.protocol import LOAD_FAILED, LOADED, PORT_DIED, PORT_READY, RESULTS, UNLOAD
from orchestrator.workspace import Workspace
from tests.helpers.agent import FAULTS_RELEASE, MakeHome, index_of, load, port_pids, session_of, tasks, wait_until
from tests.helpers.agent_peer import AgentPeer
from tests.helpers.native import INCLUDE


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
    assert nope.body["reason"].startswith("the port runner refused the library: ")
    assert nope.body["reason"].endswith("libfaults.so has no function no_such_function")
    nolib = load(session, "w4", "echo", [0], library="build/libnothing.so")
    assert nolib.kind == LOAD_FAILED
    assert nolib.body["reason"].startswith("the port runner refused the library: cannot load ")
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


def test_a_work_that_exits_3_is_the_works_exit_and_an_abi_mismatch_is_the_runners_refusal(
        ws: Workspace, peer: AgentPeer, make_home: MakeHome, tmp_path: Path) -> None:
    """The runner refuses an ABI it does not speak with exit 3, and a work function may
    exit(3) too: the agent tells them apart by the runner's status pipe, not the code."""
    home = make_home(ws, peer.address)
    home.add_faults_release()
    source = tmp_path / "future.c"
    source.write_text('#include "orch_work.h"\nconst int orch_work_abi_version = 99;\n'
                      "int work(const orch_task *t, orch_output *o) { return orch_write(o, t->data, t->data_len); }\n")
    future = home.releases / FAULTS_RELEASE / "build" / "libfuture.so"
    subprocess.run(["cc", "-shared", "-fPIC", f"-I{INCLUDE}", "-o", str(future), str(source)], check=True)
    agent = home.start()
    session = session_of(peer, home)

    refused = load(session, "abi", "work", [0], library="build/libfuture.so")
    assert refused.kind == LOAD_FAILED and refused.body["missing"] is False
    assert refused.body["reason"] == (
        f"the port runner refused the library: work ABI version mismatch: {future} says version 99, this runner "
        "speaks version 1 (rebuild the release against this orch's orch_work.h)")

    assert load(session, "w", "exit_on", [0]).kind == LOADED
    session.tasks(0, tasks((502, b"a"), (503, b"b"), (504, b"exit"), (505, b"c")))
    died = session.expect(PORT_DIED, timeout=10)
    assert died.body == {"port": 0, "seq": 504, "reason": "the work exited with status 3"}
    assert [r.seq for r in session.results(0)] == [502, 503]
    ready = session.expect(PORT_READY)  # the work's exit is a death like a crash: the port comes back
    assert index_of(session, ready) > index_of(session, died)
    session.tasks(0, tasks((506, b"after")))
    assert [(r.seq, r.payload) for r in session.wait_results(0, 3)][2:] == [(506, b"after")]
    assert "ABI" not in home.log_text().split("loaded w:")[1]
    assert agent.poll() is None
