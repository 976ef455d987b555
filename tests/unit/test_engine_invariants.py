"""The engine's invariants, each driven deterministically: first completion wins, a late
result of a node already declared lost is either the first completion or counted in
``discarded``, never recorded twice, and the job still finishes.

The engine runs as in ``orch job run`` (mutual TLS on 127.0.0.1, the workspace's CA, a
SQLite store and sink); the agents are this test speaking the agent's side of the
protocol (``orchestrator/agent/protocol.py``), so it decides exactly when each result
arrives.  A netns partition reaches the same code only when the kernel's
retransmissions happen to order things this way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import ssl
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.agent import protocol as P
from orchestrator.agent.frames import decode_tasks, encode_result
from orchestrator.deploy import pki
from orchestrator.scheduler import isolation
from orchestrator.scheduler.engine import HISTORY, Engine
from orchestrator.scheduler.isolation import PIECE_BASE
from orchestrator.scheduler.module_loader import load_work_module
from orchestrator.scheduler.run import JobRun, Outcome, ReleaseInfo
from orchestrator.scheduler.sinks import Record, open_sink
from orchestrator.scheduler.spec import JobSpec
from orchestrator.scheduler.stored import stored_work
from orchestrator.state import JobState, Store
from orchestrator.workspace import Workspace
from tests.helpers.net import start_on_free_port

HEARTBEAT = 0.2
"""The job's heartbeat: a silent agent is lost after three of them."""
WAIT = 5.0
"""Seconds to wait for anything the engine does at once (a broken engine fails fast)."""
SPAN = 10
"""Numbers per task (``range`` with a fixed task size of 1 and ``max_span`` SPAN)."""


class AgentSide:
    """One node's agent, as the test speaks it: HELLO, LOADED, RESULTS, heartbeats."""

    def __init__(self, node: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.node, self.reader, self.writer = node, reader, writer
        self._beats: asyncio.Task[None] | None = None

    @classmethod
    async def dial(cls, port: int, ctx: ssl.SSLContext, node: str) -> AgentSide:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=P.SCHEDULER_NAME), 10)
        side = cls(node, reader, writer)
        side.send(P.control(P.HELLO, node=node, name=node, slots=1, releases=[], version=P.PROTOCOL_VERSION,
                            pid=os.getpid()))
        await side.expect(P.WELCOME)
        return side

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def expect(self, kind: int, timeout: float = WAIT) -> bytes:
        """The next message but heartbeats, which must be of ``kind``; its body."""
        while True:
            try:
                got, body = await asyncio.wait_for(P.read_message(self.reader), timeout)
            except asyncio.IncompleteReadError:
                raise AssertionError(f"{self.node}: the scheduler closed the connection; "
                                     f"expected {P.KIND_NAMES[kind]}") from None
            if got == P.HEARTBEAT:
                continue
            assert got == kind, f"{self.node}: expected {P.KIND_NAMES[kind]}, got {P.KIND_NAMES[got]} {body[:200]!r}"
            return body

    async def load(self, job: str) -> None:
        """Take the LOAD of ``job`` and answer LOADED with one port (0)."""
        load = P.parse_control(P.LOAD, await self.expect(P.LOAD))
        assert (load["work"], load["ports"]) == (job, [0]), load
        self.send(P.control(P.LOADED, work=job, ports=[0]))

    async def tasks(self) -> list[tuple[int, int, bytes]]:
        """The next TASKS (port 0) as (seq, attempt, data)."""
        port, frames = P.parse_port(await self.expect(P.TASKS))
        assert port == 0
        return [(seq, attempt, bytes(data)) for seq, attempt, _size, data in decode_tasks(bytes(frames))]

    def results(self, answers: list[tuple[int, bytes]], *, failed: Collection[int] = (), port: int = 0,
                seconds: float = 0.001) -> None:
        """One RESULTS message of ``port``: (seq, output) each, ok unless its seq is in
        ``failed`` (then the output is the failure's message), each taking ``seconds``."""
        ns = int(seconds * 1e9)
        self.send(P.port_message(P.RESULTS, port, b"".join(encode_result(seq, seq not in failed, ns, out)
                                                              for seq, out in answers)))

    def control(self, kind: int, **fields: Any) -> None:
        self.send(P.control(kind, **fields))

    def beat(self) -> None:
        """Heartbeat the scheduler every half interval from now on (a live agent)."""
        async def beats() -> None:
            while True:
                self.send(P.message(P.HEARTBEAT))
                await asyncio.sleep(HEARTBEAT / 2)
        self._beats = asyncio.create_task(beats())

    async def close(self) -> None:
        if self._beats is not None:
            self._beats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._beats
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError, TimeoutError):
            await asyncio.wait_for(self.writer.wait_closed(), 5)


def output(number: int, by: str) -> bytes:
    return f"{number} by {by}\n".encode()


class Harness:
    """A workspace, its store, one job (``range`` 0:SPAN*tasks, one task per SPAN) and an
    engine serving it; ``dial(node)`` connects an agent of the ``workers`` family."""

    def __init__(self, folder: Path, tasks: int, **spec: Any) -> None:
        self.folder = folder
        self.ws = Workspace.init(folder / "ws")
        self.store = store = Store.open(self.ws.state_db)
        self.job_id = "jinvariant"
        self.spec = JobSpec(**{"release": "inv@1", "function": "f", "symbol": "f", "work_module": "range",
                               "input": f"0:{SPAN * tasks}", "module_options": {"max_span": SPAN},
                               "sink": "sqlite:out.db", "task_size": 1, "heartbeat_seconds": HEARTBEAT,
                               "max_attempts": 3, "agent_wait_seconds": 5, "isolate_failures": False, **spec})
        store.add_job(self.job_id, release=self.spec.release, function="f", spec=self.spec.model_dump(mode="json"))
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.engine = Engine(store, ssl_context=pki.server_ssl_context(self.ws), peer_id=pki.peer_node_id,
                             admit=lambda node: "workers" if node.startswith("w-") else None,
                             on_event=self._event)
        self.port = 0
        self.job: JobRun | None = None

    def _event(self, kind: str, data: dict[str, Any]) -> None:
        if kind != "job.tick":  # (every 0.1 s)
            self.events.append((kind, data))

    def client(self, node: str) -> ssl.SSLContext:
        cert, key = pki.issue_node_cert(self.ws, node)
        (self.folder / f"{node}.crt").write_bytes(cert)
        key_path = self.folder / f"{node}.key"
        key_path.touch(0o600)
        key_path.write_bytes(key)
        return pki.client_ssl_context(pki.ca_cert_path(self.ws), self.folder / f"{node}.crt", key_path)

    async def dial(self, node: str) -> AgentSide:
        return await AgentSide.dial(self.port, self.client(node), node)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[asyncio.Task[Outcome]]:
        """The engine listening and the job running (a task giving its Outcome)."""
        module = load_work_module(self.spec.work_module, self.spec.input, self.spec.module_options)
        sink = open_sink(self.spec.sink, root=self.ws.root)
        release = ReleaseInfo(folder="inv-1", sha256="0" * 64, library="libinv.so", build=[], tarball=lambda: b"")
        try:
            self.job = JobRun(self.job_id, self.spec, module, sink, release,
                              next_write=sink.open(self.job_id, None), generated=0, checkpoint=None)
            self.port = await start_on_free_port(self.engine)
            run = asyncio.create_task(self.engine.run(self.job))
            try:
                yield run
            finally:
                if not run.done():
                    self.engine.suspend("the test ended")
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(run, WAIT)
                await self.engine.close()
        finally:
            sink.close()
            module.close()

    async def until(self, what: str, condition: Callable[[], bool], timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"not within {timeout} s: {what}; events {self.events}"
            await asyncio.sleep(0.01)

    def counters(self) -> dict[str, int]:
        assert self.job is not None
        return self.job.counters.as_dict()

    def lost(self, node: str) -> bool:
        """Whether the engine declared ``node`` lost (its agent may be gone from it since)."""
        return any(kind == "node.lost" and data["node"] == node for kind, data in self.events)

    def records(self) -> list[Record]:
        with open_sink(self.spec.sink, root=self.ws.root) as sink:
            return list(sink.read(self.job_id))


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    """Harness(tasks, **spec) in a folder of its own; every store closed at the end."""
    made: list[Harness] = []

    def make(tasks: int, **spec: Any) -> Harness:
        made.append(Harness(tmp_path / f"h{len(made)}", tasks, **spec))
        return made[-1]

    yield make
    for h in made:
        h.store.close()


def run(main: Callable[[], Any], timeout: float = 60) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(main(), timeout)

    asyncio.run(bounded())


async def lose_silent_holder(h: Harness) -> tuple[AgentSide, list[tuple[int, int, bytes]]]:
    """Agent w-a loads the job, takes the first tasks, then goes silent until the engine
    declares it lost (its connection stays open, as a partitioned node's does)."""
    a = await h.dial("w-a")
    await a.load(h.job_id)
    held = await a.tasks()
    assert tried(held) == [(0, 1), (1, 1)], held
    await h.until("w-a declared lost (silent for three heartbeats)", lambda: h.lost("w-a"))
    assert h.counters()["nodes_lost"] == 1
    assert h.counters()["retried"] == 1, "the task in flight on w-a used an attempt"
    [why] = [data["reason"] for kind, data in h.events if kind == "node.lost" and data == {"node": "w-a",
                                                                                          "reason": data["reason"]}]
    assert re.fullmatch(r"silent for \d+\.\d s", why), why
    assert h.job is not None and h.job.where["w-a"] == f"lost: {why}"
    assert [(e.job, e.node, e.reason) for e in h.store.events(job=h.job_id) if e.kind == "job.node_lost"] == [
        (h.job_id, "w-a", f"node w-a lost: {why}")]
    assert h.store.stored_batches(h.job_id).attempts == {0: (1, f"attempt 1: node w-a lost: {why}")}
    agent = h.engine.agents["w-a"]
    assert (agent.ports, agent.loaded) == ({}, False)
    return a, held


def tried(tasks: list[tuple[int, int, bytes]]) -> list[tuple[int, int]]:
    """(seq, attempt) of ``tasks``, by seq (the order a port is sent them is the engine's)."""
    return sorted((seq, attempt) for seq, attempt, _ in tasks)


def answers(tasks: list[tuple[int, int, bytes]], by: str) -> list[tuple[int, bytes]]:
    """Results for ``tasks`` in the order they were sent, as a port answers."""
    return [(seq, output(seq, by)) for seq, _, _ in tasks]


class TestALateResultOfALostNode:
    def test_arriving_while_the_retry_runs_elsewhere_it_wins_and_the_retry_is_discarded(
            self, harness: Callable[..., Harness]) -> None:
        h = harness(3)

        async def main() -> None:
            async with h.running() as job:
                a, _held = await lose_silent_holder(h)
                b = await h.dial("w-b")
                b.beat()
                try:
                    await b.load(h.job_id)
                    retried = await b.tasks()
                    assert tried(retried) == [(0, 2), (1, 1)], retried
                    # The late answer of the lost node: task 0 is still outstanding (its
                    # retry runs on w-b), so this is its first completion.
                    a.results([(0, output(0, "w-a"))])
                    await h.until("w-a's late result recorded", lambda: h.counters()["done"] == 1)
                    assert h.counters()["discarded"] == 0
                    assert stored_work(h.store, h.job_id).results == {0: output(0, "w-a")}
                    # Then the retry's own results: 0 is no longer outstanding, 1 is.
                    b.results(answers(retried, "w-b"))
                    last = await b.tasks()
                    assert tried(last) == [(2, 1)], last
                    assert h.counters()["discarded"] == 1, "the retry's result for 0 must be discarded"
                    assert stored_work(h.store, h.job_id).results == {0: output(0, "w-a"), 1: output(1, "w-b")}
                    b.results(answers(last, "w-b"))
                    outcome = await asyncio.wait_for(job, WAIT)
                    assert P.parse_control(P.UNLOAD, await b.expect(P.UNLOAD)) == {"work": h.job_id}
                finally:
                    await b.close()
                    await a.close()
            assert outcome.state == JobState.DONE, outcome
            assert {k: outcome.counters[k] for k in ("done", "discarded", "nodes_lost", "retried", "failed")} == {
                "done": 3, "discarded": 1, "nodes_lost": 1, "retried": 1, "failed": 0}, outcome.counters

        run(main)
        # One record per task, task 0's from its first completion.
        assert [(r.seq, r.ok, r.payload) for r in h.records()] == [
            (0, True, output(0, "w-a")), (1, True, output(1, "w-b")), (2, True, output(2, "w-b"))]
        assert h.store.get_job(h.job_id).state == JobState.DONE

    def test_arriving_after_the_retry_finished_it_is_discarded(self, harness: Callable[..., Harness]) -> None:
        h = harness(3)

        async def main() -> None:
            async with h.running() as job:
                a, _held = await lose_silent_holder(h)
                b = await h.dial("w-b")
                b.beat()
                try:
                    await b.load(h.job_id)
                    retried = await b.tasks()
                    assert tried(retried) == [(0, 2), (1, 1)], retried
                    b.results(answers(retried, "w-b"))
                    last = await b.tasks()
                    assert tried(last) == [(2, 1)], last
                    assert h.counters()["done"] == 2
                    # Too late for 0 (w-b finished it), but first for 2, which w-b still runs;
                    # the one discarded does not stop the message's next result being taken.
                    a.results([(0, output(0, "w-a")), (2, output(2, "w-a"))])
                    await h.until("w-a's late results handled", lambda: h.counters()["done"] == 3)
                    assert h.counters()["discarded"] == 1
                    outcome = await asyncio.wait_for(job, WAIT)  # every task done: w-b's 2 is not waited for
                finally:
                    await b.close()
                    await a.close()
            assert outcome.state == JobState.DONE, outcome
            assert (outcome.counters["done"], outcome.counters["discarded"]) == (3, 1), outcome.counters

        run(main)
        assert [r.payload for r in h.records()] == [output(0, "w-b"), output(1, "w-b"), output(2, "w-a")]

    def test_arriving_before_the_retry_is_sent_the_retry_never_runs(self, harness: Callable[..., Harness]
                                                                     ) -> None:
        h = harness(3)

        async def main() -> None:
            async with h.running() as job:
                a, _held = await lose_silent_holder(h)
                # No other agent yet: 0 (one attempt used) and 1 wait in the retry queue.
                a.results([(0, output(0, "w-a"))])
                await h.until("w-a's late result recorded", lambda: h.counters()["done"] == 1)
                b = await h.dial("w-b")
                b.beat()
                try:
                    await b.load(h.job_id)
                    sent = await b.tasks()
                    assert tried(sent) == [(1, 1), (2, 1)], "a task finished while it waited in the retry " \
                        f"queue must not run again: {sent}"
                    b.results(answers(sent, "w-b"))
                    outcome = await asyncio.wait_for(job, WAIT)
                finally:
                    await b.close()
                    await a.close()
            assert outcome.state == JobState.DONE, outcome
            assert (outcome.counters["done"], outcome.counters["discarded"]) == (3, 0), outcome.counters

        run(main)
        assert [r.payload for r in h.records()] == [output(0, "w-a"), output(1, "w-b"), output(2, "w-b")]


async def loaded(h: Harness, node: str) -> tuple[AgentSide, list[tuple[int, int, bytes]]]:
    """A live (heartbeating) agent that loaded the job, and its first tasks."""
    side = await h.dial(node)
    side.beat()
    await side.load(h.job_id)
    return side, await side.tasks()


async def close_all(sides: list[AgentSide]) -> None:
    """Close ``sides`` in order, each even if closing an earlier one raised."""
    if sides:
        try:
            await sides[0].close()
        finally:
            await close_all(sides[1:])


@contextlib.asynccontextmanager
async def agents(h: Harness, *nodes: str) -> AsyncIterator[list[tuple[AgentSide, list[tuple[int, int, bytes]]]]]:
    """Each of ``nodes`` ``loaded`` in turn, as (side, first tasks); every side closed on
    exit (in the order loaded), whatever happens."""
    sides: list[tuple[AgentSide, list[tuple[int, int, bytes]]]] = []
    try:
        for node in nodes:
            sides.append(await loaded(h, node))
        yield sides
    finally:
        await close_all([side for side, _ in sides])


class TestFailedAttempts:
    def test_a_task_failing_every_attempt_is_written_failed_in_its_place(
            self, harness: Callable[..., Harness]) -> None:
        h = harness(3, max_attempts=3)

        async def main() -> None:
            async with h.running() as job, agents(h, "w-a") as [(a, first)]:
                assert tried(first) == [(0, 1), (1, 1)]
                a.results([(0, b"\xffboom"), (1, output(1, "w-a"))], failed={0})  # (not UTF-8)
                again = await a.tasks()  # the only agent: the retry comes back to it
                assert tried(again) == [(0, 2), (2, 1)], again
                assert (h.counters()["retried"], h.counters()["failed"]) == (1, 0)
                assert h.store.stored_batches(h.job_id).attempts == {0: (1, "attempt 1: w-a: \ufffdboom")}
                # the store keeps the accepted result only, never the failure beside it
                assert stored_work(h.store, h.job_id).results == {1: output(1, "w-a")}
                assert h.job is not None and h.job.next_write == 0  # 1 waits for 0
                a.results([(seq, b"boom again" if seq == 0 else output(seq, "w-a")) for seq, _, _ in again],
                          failed={0})
                last = await a.tasks()
                assert tried(last) == [(0, 3)], last
                assert h.counters()["retried"] == 2
                assert h.engine.snapshot()["nodes"]["w-a"]["done"] == 2
                a.results([(0, b"boom at last")], failed={0})
                outcome = await asyncio.wait_for(job, WAIT)
            assert outcome.state == JobState.DONE, outcome
            assert {k: outcome.counters[k] for k in ("done", "failed", "retried", "discarded")} == {
                "done": 2, "failed": 1, "retried": 2, "discarded": 0}, outcome.counters
            assert h.job is not None and (h.job.buffered, h.job.records) == (0, {})
            reason = "task 0 failed after 3 attempts; last: w-a: boom at last"
            assert [data for kind, data in h.events if kind == "task.failed"] == [{"seq": 0, "reason": reason}]

        run(main)
        assert [(r.seq, r.ok, r.payload) for r in h.records()] == [
            (0, False, b"attempt 3: w-a: boom at last"), (1, True, output(1, "w-a")), (2, True, output(2, "w-a"))]
        assert h.store.failed_tasks(h.job_id) == [(0, "attempt 3: w-a: boom at last")]
        failed = [e for e in h.store.events(job=h.job_id) if e.kind == "job.task_failed"]
        assert [(e.node, e.reason) for e in failed] == [
            ("w-a", "task 0 failed after 3 attempts; last: w-a: boom at last")]
        progress = h.store.job_progress(h.job_id)
        assert (progress["next_write"], progress["generated"]) == (3, 3)

    def test_on_task_failure_fail_ends_the_job_failed_at_the_first_task_given_up(
            self, harness: Callable[..., Harness]) -> None:
        h = harness(3, max_attempts=1, on_task_failure="fail")

        async def main() -> None:
            async with h.running() as job, agents(h, "w-a") as [(a, first)]:
                a.results([(seq, b"boom") for seq, _, _ in first[:1]], failed={0})
                outcome = await asyncio.wait_for(job, WAIT)
                await a.expect(P.UNLOAD)  # and no task sent after the failure
            assert outcome.state == JobState.FAILED, outcome
            assert outcome.reason == "task 0 failed after 1 attempts; last: w-a: boom"
            assert (outcome.counters["failed"], outcome.counters["retried"]) == (1, 0)

        run(main)
        job = h.store.get_job(h.job_id)
        assert (job.state, job.reason) == (JobState.FAILED, "task 0 failed after 1 attempts; last: w-a: boom")

    def test_a_failed_attempt_runs_again_on_another_node_when_there_is_one(
            self, harness: Callable[..., Harness]) -> None:
        h = harness(4)

        async def main() -> None:
            async with h.running() as job, agents(h, "w-a", "w-b") as [(a, first_a), (b, first_b)]:
                assert (tried(first_a), tried(first_b)) == ([(0, 1), (1, 1)], [(2, 1), (3, 1)])
                a.results([(0, b"boom")], failed={0})
                await h.until("0's attempt counted", lambda: h.counters()["retried"] == 1)
                b.results([(2, output(2, "w-b"))])  # b has room now: 0 goes there, not back to a
                moved = await b.tasks()
                assert tried(moved) == [(0, 2)], moved
                b.results([(3, output(3, "w-b")), (0, output(0, "w-b"))])
                a.results([(1, output(1, "w-a"))])
                outcome = await asyncio.wait_for(job, WAIT)
                assert await a.expect(P.UNLOAD)  # and nothing else before it: no task 0 for w-a
            assert outcome.state == JobState.DONE, outcome
            assert (outcome.counters["done"], outcome.counters["retried"]) == (4, 1), outcome.counters

        run(main)
        assert [r.payload for r in h.records()] == [output(0, "w-b"), output(1, "w-a"), output(2, "w-b"),
                                                     output(3, "w-b")]

    def test_a_late_failure_of_a_lost_node_counts_no_second_attempt(self, harness: Callable[..., Harness]) -> None:
        h = harness(2)

        async def main() -> None:
            async with h.running() as job:
                a, _held = await lose_silent_holder(h)
                # 0's attempt was counted when w-a was lost; 1 is still outstanding: its result counts
                a.results([(0, b"boom"), (1, output(1, "w-a"))], failed={0})
                await h.until("the late results handled", lambda: h.counters()["done"] == 1)
                assert (h.counters()["discarded"], h.counters()["retried"]) == (1, 1)
                assert stored_work(h.store, h.job_id).results == {1: output(1, "w-a")}, "a failure was stored"
                b, retried = await loaded(h, "w-b")
                try:
                    assert tried(retried) == [(0, 2)], retried
                    b.results(answers(retried, "w-b"))
                    outcome = await asyncio.wait_for(job, WAIT)
                finally:
                    await b.close()
                    await a.close()
            assert outcome.state == JobState.DONE, outcome

        run(main)
        assert [r.payload for r in h.records()] == [output(0, "w-b"), output(1, "w-a")]

    def test_two_new_results_beside_a_failed_attempt_are_stored_intact(self, harness: Callable[..., Harness]) -> None:
        """A message of a failed attempt and two new results is stored result by result (the
        failure left out); the batch is read back whole while 0, unwritten, keeps it there."""
        h = harness(8)

        async def main() -> None:
            async with h.running() as job, agents(h, "w-a") as [(a, _first)]:
                a.results([(0, b"boom"), (1, output(1, "w-a"))], failed={0}, seconds=0.02)
                again = await a.tasks()  # 3 deep now (0.05 s of work queued at 0.02 s a task)
                assert [(seq, attempt) for seq, attempt, _ in again] == [(0, 2), (2, 1), (3, 1)], again
                a.results([(0, b"boom again"), (2, output(2, "w-a")), (3, output(3, "w-a"))], failed={0},
                          seconds=0.02)
                more = await a.tasks()
                assert tried(more) == [(0, 3), (4, 1), (5, 1)], more
                assert h.job is not None and h.job.next_write == 0
                assert stored_work(h.store, h.job_id).results == {
                    1: output(1, "w-a"), 2: output(2, "w-a"), 3: output(3, "w-a")}
                assert h.store.stored_batches(h.job_id).attempts == {0: (2, "attempt 2: w-a: boom again")}
                a.results(answers(more, "w-a"), seconds=0.02)
                rest = await a.tasks()
                a.results(answers(rest, "w-a"), seconds=0.02)
                outcome = await asyncio.wait_for(job, WAIT)
            assert outcome.state == JobState.DONE, outcome

        run(main)
        assert [r.payload for r in h.records()] == [output(n, "w-a") for n in range(8)]


class TestResultsFromElsewhere:
    def test_a_result_for_a_task_the_node_was_not_sent_is_still_the_first_completion(
            self, harness: Callable[..., Harness]) -> None:
        """As a restarted port answers a task sent to the port that died before the
        scheduler heard of it: the seq is not in that port's queue, but it is outstanding."""
        h = harness(4)

        async def main() -> None:
            async with h.running() as job, agents(h, "w-a", "w-b") as [(a, first_a), (b, first_b)]:
                assert (tried(first_a), tried(first_b)) == ([(0, 1), (1, 1)], [(2, 1), (3, 1)])
                b.results([(0, output(0, "w-b")), (1, output(1, "w-b"))])  # w-b's queue is 2, 3
                await h.until("0 and 1 recorded", lambda: h.counters()["done"] == 2)
                assert not h.lost("w-b")
                a.results(answers(first_a, "w-a"))  # 0 and 1 again: both discarded
                await h.until("w-a's results discarded", lambda: h.counters()["discarded"] == 2)
                b.results(answers(first_b, "w-b"))
                outcome = await asyncio.wait_for(job, WAIT)
            assert outcome.state == JobState.DONE, outcome
            assert (outcome.counters["done"], outcome.counters["discarded"], outcome.counters["nodes_lost"]) == (
                4, 2, 0), outcome.counters

        run(main)
        assert [r.payload for r in h.records()] == [output(n, "w-b") for n in range(4)]


class TestPorts:
    def test_a_dead_port_costs_its_task_in_flight_one_attempt_and_the_rest_none(
            self, harness: Callable[..., Harness]) -> None:
        h = harness(3)

        async def main() -> None:
            async with h.running() as job, agents(h, "w-a") as [(a, first)]:
                assert tried(first) == [(0, 1), (1, 1)]
                a.control(P.PORT_DIED, port=0, seq=0, reason="killed by SIGSEGV")
                await h.until("the death counted", lambda: h.counters()["port_deaths"] == 1)
                assert h.counters()["retried"] == 1
                text = "port 0 on w-a died during task 0: killed by SIGSEGV"
                assert h.store.stored_batches(h.job_id).attempts == {0: (1, f"attempt 1: {text}")}
                died = [e for e in h.store.events(job=h.job_id) if e.kind == "job.port_died"]
                assert [(e.node, e.reason) for e in died] == [("w-a", text)]
                assert [data for kind, data in h.events if kind == "port.died"] == [
                    {"node": "w-a", "port": 0, "seq": 0, "reason": "killed by SIGSEGV"}]
                a.control(P.PORT_DIED, port=5, seq=None, reason="no such port")  # not loaded: ignored
                a.control(P.PORT_READY, port=0)  # restarted: the same tasks come back
                again = await a.tasks()
                assert tried(again) == [(0, 2), (1, 1)], again
                assert (h.counters()["port_deaths"], h.lost("w-a")) == (1, False)
                a.control(P.PORT_DIED, port=0, seq=0, reason="killed again")  # a second death
                await h.until("the second death counted", lambda: h.counters()["port_deaths"] == 2)
                a.control(P.PORT_READY, port=0)
                again = await a.tasks()
                assert tried(again) == [(0, 3), (1, 1)], again
                a.results(answers(again, "w-a"))
                rest = await a.tasks()
                assert tried(rest) == [(2, 1)]
                a.results(answers(rest, "w-a"))
                outcome = await asyncio.wait_for(job, WAIT)
            assert outcome.state == JobState.DONE, outcome
            assert {k: outcome.counters[k] for k in ("done", "port_deaths", "retried", "failed")} == {
                "done": 3, "port_deaths": 2, "retried": 2, "failed": 0}, outcome.counters

        run(main)
        assert [r.payload for r in h.records()] == [output(n, "w-a") for n in range(3)]

    def test_a_port_that_died_between_tasks_costs_no_attempt(self, harness: Callable[..., Harness]) -> None:
        h = harness(2)

        async def main() -> None:
            async with h.running() as job, agents(h, "w-a") as [(a, first)]:
                a.control(P.PORT_DIED, port=0, seq=None, reason="exit 3")
                await h.until("the death counted", lambda: h.counters()["port_deaths"] == 1)
                assert h.counters()["retried"] == 0
                a.control(P.PORT_READY, port=0)
                again = await a.tasks()
                assert tried(again) == tried(first) == [(0, 1), (1, 1)]
                a.results(answers(again, "w-a"))
                outcome = await asyncio.wait_for(job, WAIT)
            assert outcome.state == JobState.DONE and outcome.counters["retried"] == 0, outcome

        run(main)


class TestOrderAndProtocol:
    def test_output_is_written_in_seq_order_whatever_order_results_come_in(
            self, harness: Callable[..., Harness]) -> None:
        h = harness(4)

        async def main() -> None:
            async with h.running() as job, agents(h, "w-a", "w-b") as [(a, first_a), (b, first_b)]:
                assert h.job is not None
                b.results(answers(first_b, "w-b"))  # 2 and 3 before 0 and 1
                await h.until("2 and 3 recorded", lambda: h.counters()["done"] == 2)
                assert (h.job.next_write, sorted(h.job.records)) == (0, [2, 3])
                assert h.job.buffered == len(output(2, "w-b")) + len(output(3, "w-b"))
                a.results(answers(first_a, "w-a")[1:])  # out of turn: 1 before 0
                assert P.parse_control(P.ERROR, await a.expect(P.ERROR)) == {
                    "reason": "protocol error: port 0 answered seq 1 out of turn"}
                await h.until("w-a lost", lambda: h.lost("w-a"))
                assert (h.job.next_write, h.counters()["done"]) == (0, 2)
                moved = await b.tasks()
                assert tried(moved) == [(0, 2), (1, 1)], moved
                b.results(answers(moved, "w-b"))
                outcome = await asyncio.wait_for(job, WAIT)
            assert outcome.state == JobState.DONE, outcome
            assert h.job.next_write == 4 and h.job.buffered == 0

        run(main)
        assert [r.payload for r in h.records()] == [output(n, "w-b") for n in range(4)]
        assert h.store.job_progress(h.job_id)["next_write"] == 4

    def test_results_for_a_port_never_loaded_end_the_connection(self, harness: Callable[..., Harness]) -> None:
        h = harness(2)

        async def main() -> None:
            async with h.running() as job:
                a, _first = await loaded(h, "w-a")
                a.results([(0, output(0, "w-a"))], port=7)
                assert P.parse_control(P.ERROR, await a.expect(P.ERROR)) == {
                    "reason": "protocol error: RESULTS for port 7, which was not loaded"}
                await h.until("w-a lost", lambda: h.lost("w-a"))
                await a.close()
                assert h.counters()["done"] == 0
                b, _ = await loaded(h, "w-b")  # the same mistake: lost too
                b.results([(0, output(0, "w-b"))], port=9)
                await h.until("w-b lost", lambda: h.lost("w-b"))
                await b.close()
                assert h.counters()["nodes_lost"] == 2
                async with agents(h, "w-c") as [(c, retried)]:
                    c.results(answers(retried, "w-c"))
                    outcome = await asyncio.wait_for(job, WAIT)
            assert outcome.state == JobState.DONE, outcome

        run(main)
        assert [r.payload for r in h.records()] == [output(0, "w-c"), output(1, "w-c")]


class TestCommitsAndExec:
    def test_written_output_is_committed_while_the_job_runs(self, harness: Callable[..., Harness]) -> None:
        """Every COMMIT_INTERVAL the sink's checkpoint and the job's progress are stored and
        the batches of what is written are dropped: a scheduler killed now resumes from there."""
        h = harness(4)

        async def main() -> None:
            async with h.running() as job, agents(h, "w-a") as [(a, first)]:
                a.results(answers(first, "w-a"))
                rest = await a.tasks()
                assert tried(rest) == [(2, 1), (3, 1)]
                await h.until("the progress committed", lambda: h.store.job_progress(h.job_id).get(
                    "checkpoint") == {"next_seq": 2})
                progress = h.store.job_progress(h.job_id)
                assert (progress["next_write"], progress["generated"]) == (2, 4)
                stored = h.store.stored_batches(h.job_id)
                assert [[t[0] for t in decode_tasks(b)] for b in stored.task_batches] == [[2, 3]]
                assert stored.result_batches == []
                assert h.job is not None and not h.job.uncommitted
                a.results(answers(rest, "w-a"))
                outcome = await asyncio.wait_for(job, WAIT)
            assert outcome.state == JobState.DONE

        run(main)

    def test_an_exec_on_a_node_lost_meanwhile_answers_for_that_node_only(
            self, harness: Callable[..., Harness]) -> None:
        h = harness(2)

        async def main() -> None:
            async with h.running():
                a = await h.dial("w-a")  # silent from now on
                b = await h.dial("w-b")
                b.beat()
                try:
                    await b.expect(P.LOAD)  # (neither loads the job: exec needs none)
                    asked = asyncio.create_task(h.engine.exec({"w-a": 11, "w-b": 12}, "uname", 5, 1000, wait=WAIT))
                    request = P.parse_control(P.EXEC, await b.expect(P.EXEC))
                    assert (request["id"], request["command"]) == (12, "uname")
                    await h.until("w-a declared lost", lambda: "w-a" in h.engine.agents and h.engine.agents["w-a"].lost)
                    assert not asked.done()  # w-b has not answered yet
                    b.control(P.EXEC_DONE, id=12, exit=0, stdout="Linux\n", stderr="")
                    answers = await asyncio.wait_for(asked, WAIT)
                finally:
                    await b.close()
                    await a.close()
            assert h.counters()["nodes_lost"] == 0 and not h.lost("w-a"), "w-a never loaded the job"
            lost = answers.pop("w-a")
            assert lost["exit"] is None and lost["reason"].startswith("node w-a lost: silent for "), lost
            assert answers == {"w-b": {"id": 12, "exit": 0, "stdout": "Linux\n", "stderr": ""}}

        run(main)


def span(task: tuple[int, int, bytes]) -> int:
    """How many numbers a range task holds (its data is b"LOW HIGH")."""
    low, high = task[2].split()
    return int(high) - int(low)


class TestSizing:
    def test_a_fast_nodes_tasks_grow_and_its_size_is_recorded(self, harness: Callable[..., Harness]) -> None:
        h = harness(4, task_size=None)  # adaptive: from the smallest size (1 number of the 10 a task may hold)

        async def main() -> None:
            async with h.running() as job, agents(h, "w-a") as [(a, first)]:
                assert [span(t) for t in first] == [1, 1]
                a.results(answers(first, "w-a"), seconds=0.001)  # far under the 0.2 s target
                bigger = await a.tasks()
                assert h.engine.snapshot()["nodes"]["w-a"]["history"] == [0.001, 0.001]
                # x4, then x4 again, up to the largest size: the 38 numbers left in 4 tasks at once
                assert [span(t) for t in bigger] == [10, 10, 10, 8], bigger
                assert h.job is not None and h.job.sizes == {"w-a": 1.0}
                assert h.engine.snapshot()["nodes"]["w-a"]["size"] == 1.0
                a.results(answers(bigger, "w-a"))
                outcome = await asyncio.wait_for(job, WAIT)
            assert outcome.state == JobState.DONE
            assert not any(kind == "node.slow" for kind, _ in h.events)

        run(main)
        assert [r.seq for r in h.records()] == list(range(6))

    def test_a_node_too_slow_even_at_the_smallest_size_is_reported_once(
            self, harness: Callable[..., Harness]) -> None:
        h = harness(1, task_size=None)  # ten tasks of one number each at the smallest size

        async def main() -> None:
            async with h.running() as job, agents(h, "w-a") as [(a, tasks)]:
                answered = 0
                while True:
                    a.results(answers(tasks, "w-a"), seconds=1.0)  # the target is 0.2 s
                    answered += len(tasks)
                    if answered == 10:
                        break
                    tasks = await a.tasks()
                    assert {span(t) for t in tasks} == {1}
                outcome = await asyncio.wait_for(job, WAIT)
            assert outcome.state == JobState.DONE
            reason = "node w-a cannot meet the target of 0.2 s even at the smallest task size (1.000 s per task)"
            assert [data for kind, data in h.events if kind == "node.slow"] == [{"node": "w-a", "reason": reason}]
            slow = [e for e in h.store.events(job=h.job_id) if e.kind == "job.node_slow"]
            assert [(e.node, e.reason) for e in slow] == [("w-a", reason)]
            assert h.job is not None and h.job.sizes == {"w-a": 0.1}

        run(main)


async def serve(side: AgentSide) -> None:
    """Answer every TASKS until the job is unloaded."""
    while True:
        kind, body = await asyncio.wait_for(P.read_message(side.reader), WAIT)
        if kind == P.UNLOAD:
            return
        if kind == P.TASKS:
            _port, frames = P.parse_port(body)
            side.results([(seq, output(seq, side.node)) for seq, _attempt, _size, _data in decode_tasks(bytes(frames))])


class TestQueues:
    def test_a_retry_finished_meanwhile_is_skipped_and_the_next_still_taken(
            self, harness: Callable[..., Harness]) -> None:
        h = harness(3)

        async def main() -> None:
            async with h.running() as job:
                a, _held = await lose_silent_holder(h)  # 1 (untouched) and 0 (one attempt) wait
                a.results([(1, output(1, "w-a"))])  # late, but first: 1 is done
                await h.until("1 recorded", lambda: h.counters()["done"] == 1)
                b, sent = await loaded(h, "w-b")
                try:
                    assert tried(sent) == [(0, 2), (2, 1)], sent
                    b.results(answers(sent, "w-b"))
                    outcome = await asyncio.wait_for(job, WAIT)
                finally:
                    await b.close()
                    await a.close()
            assert outcome.state == JobState.DONE, outcome

        run(main)
        assert [r.payload for r in h.records()] == [output(0, "w-b"), output(1, "w-a"), output(2, "w-b")]

    def test_a_dead_ports_queue_goes_back_whole_past_a_task_finished_elsewhere(
            self, harness: Callable[..., Harness]) -> None:
        h = harness(4)

        async def main() -> None:
            async with h.running() as job, agents(h, "w-a", "w-b") as [(a, _first_a), (b, first_b)]:
                b.results([(0, output(0, "w-b"))])  # 0, in w-a's queue, is done by w-b
                await h.until("0 recorded", lambda: h.counters()["done"] == 1)
                a.control(P.PORT_DIED, port=0, seq=0, reason="killed by SIGKILL")
                await h.until("the death counted", lambda: h.counters()["port_deaths"] == 1)
                assert h.counters()["retried"] == 0, "a task done elsewhere used no attempt"
                moved = await b.tasks()  # 1 still runs: on w-b, which has room (w-a's port is down)
                assert tried(moved) == [(1, 1)], moved
                a.control(P.PORT_READY, port=0)
                b.results(answers(first_b + moved, "w-b"))
                outcome = await asyncio.wait_for(job, WAIT)
            assert outcome.state == JobState.DONE, outcome

        run(main)
        assert [r.payload for r in h.records()] == [output(n, "w-b") for n in range(4)]

    def test_a_port_death_on_the_last_attempt_writes_the_task_failed(self, harness: Callable[..., Harness]) -> None:
        h = harness(2, max_attempts=1)

        async def main() -> None:
            async with h.running() as job, agents(h, "w-a") as [(a, _first)]:
                a.control(P.PORT_DIED, port=0, seq=0, reason="killed by SIGSEGV")
                await h.until("0 given up", lambda: h.counters()["failed"] == 1)
                a.control(P.PORT_READY, port=0)
                again = await a.tasks()
                assert tried(again) == [(1, 1)], again
                a.results(answers(again, "w-a"))
                outcome = await asyncio.wait_for(job, WAIT)
            assert outcome.state == JobState.DONE, outcome

        run(main)
        error = "attempt 1: port 0 on w-a died during task 0: killed by SIGSEGV"
        assert [(r.seq, r.ok, r.payload) for r in h.records()] == [(0, False, error.encode()),
                                                                   (1, True, output(1, "w-a"))]
        assert h.store.failed_tasks(h.job_id) == [(0, error)]

    def test_a_port_deaths_retry_goes_to_another_node(self, harness: Callable[..., Harness]) -> None:
        h = harness(4)

        async def main() -> None:
            async with h.running() as job, agents(h, "w-a", "w-b") as [(a, _first_a), (b, first_b)]:
                a.control(P.PORT_DIED, port=0, seq=0, reason="killed by SIGSEGV")
                await h.until("the death counted", lambda: h.counters()["port_deaths"] == 1)
                a.control(P.PORT_READY, port=0)
                back = await a.tasks()
                assert tried(back) == [(1, 1)], back  # not 0: it died on w-a
                b.results(answers(first_b[:1], "w-b"))
                moved = await b.tasks()
                assert tried(moved) == [(0, 2)], moved
                a.results(answers(back, "w-a"))
                b.results(answers(first_b[1:] + moved, "w-b"))
                outcome = await asyncio.wait_for(job, WAIT)
            assert outcome.state == JobState.DONE, outcome

        run(main)

    def test_a_node_lost_with_nothing_in_flight_is_let_go_cleanly(self, harness: Callable[..., Harness]) -> None:
        h = harness(4)

        async def main() -> None:
            async with h.running() as job, agents(h, "w-a", "w-b") as [(a, first_a), (b, first_b)]:
                a.results(answers(first_a, "w-a"))  # all given out: w-a's queue stays empty
                await h.until("w-a's results recorded", lambda: h.counters()["done"] == 2)
                assert h.job is not None and h.job.exhausted
                assert a._beats is not None
                a._beats.cancel()  # silent from now on
                await h.until("w-a lost", lambda: h.lost("w-a"))
                agent = h.engine.agents["w-a"]
                assert (agent.ports, agent.loaded, h.counters()["retried"]) == ({}, False, 0)
                b.results(answers(first_b, "w-b"))
                outcome = await asyncio.wait_for(job, WAIT)
            assert outcome.state == JobState.DONE, outcome

        run(main)

    def test_output_waiting_past_the_limit_pauses_new_tasks(self, harness: Callable[..., Harness]) -> None:
        h = harness(8, max_unflushed_bytes=10)

        async def main() -> None:
            async with h.running() as job, agents(h, "w-a", "w-b") as [(a, first_a), (b, first_b)]:
                assert h.job is not None and h.job.generated == 4
                b.results(answers(first_b, "w-b"))  # 2 and 3 wait for 0: 18 bytes > 10
                await h.until("2 and 3 recorded", lambda: h.counters()["done"] == 2)
                assert h.job.paused() and h.job.generated == 4, "new tasks were made while paused"
                a.results(answers(first_a, "w-a"))  # 0..3 written: unpaused
                await asyncio.gather(serve(a), serve(b))
                outcome = await asyncio.wait_for(job, WAIT)
            assert outcome.state == JobState.DONE, outcome

        run(main)
        assert [r.seq for r in h.records()] == list(range(8))


class TestLongRuns:
    def test_more_results_than_the_history_keeps(self, harness: Callable[..., Harness]) -> None:
        """A node's first HISTORY task times are kept (sizing checks), then no more."""
        h = harness(120)

        async def main() -> None:
            async with h.running() as job, agents(h, "w-a") as [(a, first)]:
                a.results(answers(first, "w-a"))
                await serve(a)
                outcome = await asyncio.wait_for(job, WAIT)
                assert h.engine.agents["w-a"].history == [0.001] * HISTORY
            assert outcome.state == JobState.DONE and outcome.counters["done"] == 120, outcome

        run(main)
        assert [r.seq for r in h.records()] == list(range(120))


class TestClose:
    def test_an_agent_that_never_answers_the_close_is_ended_quietly(self, harness: Callable[..., Harness]) -> None:
        """``Engine.close`` cancels a handler whose peer never answers the TLS close; the
        cancelled handler must end without asyncio logging "Exception in callback" (3.11's
        streams call ``task.exception()`` on it: CI printed that traceback in a bench)."""
        h = harness(4)
        logged: list[dict[str, Any]] = []

        async def main() -> None:
            asyncio.get_running_loop().set_exception_handler(lambda _loop, context: logged.append(context))
            async with h.running():
                a = await h.dial("w-a")
                a.writer.transport.pause_reading()  # the scheduler's close_notify is never read
                await h.until("w-a admitted", lambda: "w-a" in h.engine.agents)
                started = time.monotonic()
                await h.engine.close()
                assert time.monotonic() - started < WAIT, "close waited for the silent agent"
                assert not h.engine._handlers, "a handler outlived close()"
                a.writer.transport.abort()
            await asyncio.sleep(0.1)  # a done callback runs on the next turns of the loop

        run(main)
        assert [c.get("message") for c in logged] == [], logged

    def test_a_lost_node_that_never_answers_the_close_is_cut_off_at_once(
            self, harness: Callable[..., Harness]) -> None:
        """A node declared lost may be cut off from the network: ``close`` aborts its
        connection instead of waiting (up to 2 s) for an answer to the TLS close that the
        node never sends."""
        h = harness(4)

        async def main() -> None:
            async with h.running():
                a, _held = await lose_silent_holder(h)
                transport = a.writer.transport
                assert isinstance(transport, asyncio.Transport)
                transport.pause_reading()  # it never reads the scheduler's close_notify
                started = time.monotonic()
                await h.engine.close()
                assert time.monotonic() - started < 1.0, "close waited for the lost node"
                transport.abort()

        run(main)


def numbers_out(data: bytes) -> bytes:
    """What the tests' work makes of a range task or piece (b"LOW HIGH"): each number on a line."""
    low, high = (int(x) for x in data.split())
    return b"".join(b"%d\n" % n for n in range(low, high))


class TestIsolation:
    """Poison isolation (scheduler/isolation.py) through the engine, one message at a time:
    a task that fails every attempt is cut in halves that run as pieces (wire seqs from
    PIECE_BASE), a piece failing its last attempt at the floor is failed and named, and
    the task's record is its ok pieces' output, in its place.  Tasks of two numbers
    (``max_span`` 2), so the first cut is at the floor."""

    def test_the_first_piece_failing_at_the_floor_is_failed_and_its_neighbour_takes_the_tasks_place(
            self, harness: Callable[..., Harness]) -> None:
        """Every event of the cut and of the failed piece names the node and the last error;
        the very first piece (wire seq PIECE_BASE itself) is a piece, not a task given up."""
        h = harness(3, input="0:6", module_options={"max_span": 2}, isolate_failures=True, max_attempts=1)

        async def main() -> None:
            async with h.running() as job, agents(h, "w-a") as [(a, first)]:
                assert tried(first) == [(0, 1), (1, 1)]
                a.results([(0, b"bad number 0")], failed={0})
                cut = await a.tasks()  # the first half of 0 (the second waits: the port is 2 deep)
                assert cut == [(PIECE_BASE, 1, b"0 1")], cut
                split = ("task 0 failed all 1 attempts (attempt 1: w-a: bad number 0); it runs again in halves: "
                         "numbers 0 and numbers 1")
                assert [data for kind, data in h.events if kind == "task.split"] == [
                    {"seq": 0, "node": "w-a", "reason": split}]
                assert [(e.node, e.reason) for e in h.store.events(job=h.job_id) if e.kind == "job.task_split"] == [
                    ("w-a", split)]
                assert h.counters()["split"] == 1

                a.results([(1, numbers_out(b"2 4")), (PIECE_BASE, b"bad number 0")], failed={PIECE_BASE},
                          seconds=1.0)
                rest = await a.tasks()
                assert tried(rest) == [(2, 1), (PIECE_BASE + 1, 1)], rest
                failed = "task 0: its piece numbers 0 failed after 1 attempts; last: w-a: bad number 0"
                assert [data for kind, data in h.events if kind == "piece.failed"] == [
                    {"seq": 0, "node": "w-a", "reason": failed}]
                stored = [(e.node, e.reason) for e in h.store.events(job=h.job_id) if e.kind == "job.piece_failed"]
                assert stored == [("w-a", failed)]
                assert not any(kind == "task.failed" for kind, _ in h.events)
                assert (h.counters()["pieces_failed"], h.counters()["failed"]) == (1, 0)

                a.results([(seq, numbers_out(data)) for seq, _, data in rest], seconds=1.0)
                outcome = await asyncio.wait_for(job, WAIT)
            assert outcome.state == JobState.DONE, outcome
            assert {k: outcome.counters[k] for k in ("done", "failed", "pieces_failed", "split", "retried")} == {
                "done": 3, "failed": 0, "pieces_failed": 1, "split": 1, "retried": 0}, outcome.counters

        run(main)
        assert [(r.seq, r.ok, r.payload) for r in h.records()] == [
            (0, True, b"1\n"), (1, True, b"2\n3\n"), (2, True, b"4\n5\n")]
        assert [(p["task"], p["first"], p["last"], p["attempts"], p["error"])
                for p in isolation.failed_pieces(h.store, h.job_id)] == [(0, 0, 0, 1, "attempt 1: w-a: bad number 0")]

    def test_the_store_holds_a_pieces_result_under_its_task_and_each_failed_attempt_of_a_piece(
            self, harness: Callable[..., Harness]) -> None:
        """What a resume would read, after each message: an ok piece's result is a batch of
        its own whose max_seq is its task's (it goes when the task is written, not when the
        ordinary result beside it in the message is), a piece's failed attempt is in the
        stored split; a port dying during a piece names the piece, and that death on the
        piece's last attempt fails it."""
        h = harness(4, input="0:8", module_options={"max_span": 2}, isolate_failures=True, max_attempts=2)
        piece, other = PIECE_BASE, PIECE_BASE + 1  # 0's halves: number 0 (good) and number 1 (bad)
        died = "port 0 on w-a died during task 0 (its piece numbers 1): killed by SIGSEGV"

        async def main() -> None:
            async with h.running() as job, agents(h, "w-a") as [(a, first)]:
                assert tried(first) == [(0, 1), (1, 1)]
                a.results([(0, b"bad number 1")], failed={0})
                assert tried(await a.tasks()) == [(0, 2)]
                a.results([(1, b"2\n3\n")], seconds=1.0)
                assert tried(await a.tasks()) == [(2, 1)]
                a.results([(0, b"bad number 1")], failed={0})  # 0's last attempt: cut in two
                assert await a.tasks() == [(piece, 1, b"0 1")]

                # An ordinary result and a piece's in one message, both new and ok.
                a.results([(2, b"4\n5\n"), (piece, b"0\n")], seconds=1.0)
                assert tried(await a.tasks()) == [(3, 1), (other, 1)]
                assert h.job is not None and h.job.next_write == 0, "0 waits for its other piece"
                assert stored_work(h.store, h.job_id).results == {1: b"2\n3\n", 2: b"4\n5\n", piece: b"0\n"}
                assert stored_work(h.store, h.job_id, from_seq=1).results == {1: b"2\n3\n", 2: b"4\n5\n"}, \
                        "the piece's result must be stored under its task's seq (0)"

                # The other piece fails its first attempt: the stored split says so.
                a.results([(other, b"bad number 1")], failed={other})
                assert tried(await a.tasks()) == [(other, 2)]
                [(seq, split)] = isolation.load(h.store, h.job_id).items()
                assert seq == 0
                leaves = [(f["wire"], f["state"], f["attempts"], f["error"]) for f in split["leaves"]]
                assert leaves == [(piece, "ok", 0, ""), (other, "pending", 1, "attempt 1: w-a: bad number 1")]
                assert h.store.stored_batches(h.job_id).attempts == {0: (1, "attempt 1: w-a: bad number 1")}
                assert h.counters()["retried"] == 2

                # 3 done; then the port dies running the piece's second (last) attempt.
                a.results([(3, b"6\n7\n")], seconds=1.0)
                await h.until("3 recorded", lambda: h.counters()["done"] == 3)
                a.control(P.PORT_DIED, port=0, seq=other, reason="killed by SIGSEGV")
                outcome = await asyncio.wait_for(job, WAIT)
            assert outcome.state == JobState.DONE, outcome
            assert [(e.node, e.reason) for e in h.store.events(job=h.job_id) if e.kind == "job.port_died"] == [
                ("w-a", died)]
            failed = f"task 0: its piece numbers 1 failed after 2 attempts; last: {died}"
            assert [data for kind, data in h.events if kind == "piece.failed"] == [
                {"seq": 0, "node": "w-a", "reason": failed}]
            assert {k: outcome.counters[k] for k in ("done", "failed", "pieces_failed", "split", "retried",
                                                     "port_deaths")} == {
                "done": 4, "failed": 0, "pieces_failed": 1, "split": 1, "retried": 2, "port_deaths": 1}

        run(main)
        assert [(r.seq, r.ok, r.payload) for r in h.records()] == [
            (0, True, b"0\n"), (1, True, b"2\n3\n"), (2, True, b"4\n5\n"), (3, True, b"6\n7\n")]
        assert isolation.failed_pieces(h.store, h.job_id) == [{
            "task": 0, "unit": "numbers", "first": 1, "last": 1, "items": 1, "attempts": 2,
            "error": f"attempt 2: {died}", "text": "numbers 1"}]


class TestFilling:
    def test_a_nodes_second_port_is_filled_while_its_first_is_full(self, harness: Callable[..., Harness]) -> None:
        """A node with two ports: when port 1 answers while port 0 still holds its tasks,
        port 1 is topped up at once, not only at port 0's next answer."""
        h = harness(8, ports_per_node=2)

        async def main() -> None:
            async with h.running() as job:
                a = await h.dial("w-a")
                a.beat()
                try:
                    assert P.parse_control(P.LOAD, await a.expect(P.LOAD))["ports"] == [0, 1]
                    a.control(P.LOADED, work=h.job_id, ports=[0, 1])

                    async def sent() -> tuple[int, list[int]]:
                        """The next TASKS, within WAIT (expect's own wait restarts at each heartbeat)."""
                        port, frames = P.parse_port(await asyncio.wait_for(a.expect(P.TASKS), WAIT))
                        return port, [seq for seq, *_ in decode_tasks(bytes(frames))]

                    assert sorted([await sent(), await sent()]) == [(0, [0, 1]), (1, [2, 3])]
                    a.results([(2, output(2, "w-a")), (3, output(3, "w-a"))], port=1, seconds=1.0)
                    assert await sent() == (1, [4, 5]), "port 1 was not filled while port 0 was full"
                    a.results([(0, output(0, "w-a")), (1, output(1, "w-a"))], port=0, seconds=1.0)
                    assert await sent() == (0, [6, 7])
                    a.results([(4, output(4, "w-a")), (5, output(5, "w-a"))], port=1, seconds=1.0)
                    a.results([(6, output(6, "w-a")), (7, output(7, "w-a"))], port=0, seconds=1.0)
                    outcome = await asyncio.wait_for(job, WAIT)
                finally:
                    await a.close()
            assert outcome.state == JobState.DONE, outcome

        run(main)
        assert [r.payload for r in h.records()] == [output(n, "w-a") for n in range(8)]

    def test_a_retry_this_node_must_avoid_is_passed_over_for_the_next_one(
            self, harness: Callable[..., Harness]) -> None:
        """The retry queue holds 2 (failed on w-b) before 0 (failed on w-a): w-b, with room,
        passes 2 over and takes 0, rather than stopping at 2 and making a new task."""
        h = harness(6)

        async def main() -> None:
            async with h.running() as job, agents(h, "w-a", "w-b") as [(a, first_a), (b, first_b)]:
                assert (tried(first_a), tried(first_b)) == ([(0, 1), (1, 1)], [(2, 1), (3, 1)])
                a.results([(0, b"boom")], failed={0})
                more_a = await a.tasks()
                assert tried(more_a) == [(4, 1)], more_a  # 0 is left for another node
                b.results([(2, b"boom")], failed={2})
                more_b = await b.tasks()
                assert tried(more_b) == [(0, 2)], more_b
                a.results([(1, output(1, "w-a")), (4, output(4, "w-a"))], seconds=1.0)
                last_a = await a.tasks()
                assert tried(last_a) == [(2, 2), (5, 1)], last_a
                b.results([(3, output(3, "w-b")), (0, output(0, "w-b"))], seconds=1.0)
                a.results([(seq, output(seq, "w-a")) for seq, _, _ in last_a], seconds=1.0)
                outcome = await asyncio.wait_for(job, WAIT)
            assert outcome.state == JobState.DONE, outcome
            assert (outcome.counters["done"], outcome.counters["retried"]) == (6, 2), outcome.counters

        run(main)
        assert [r.payload for r in h.records()] == [output(0, "w-b"), output(1, "w-a"), output(2, "w-a"),
                                                     output(3, "w-b"), output(4, "w-a"), output(5, "w-a")]
