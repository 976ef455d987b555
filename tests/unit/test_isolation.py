"""Poison isolation (orchestrator/scheduler/isolation.py): a task that fails every attempt
is cut in halves that run again, down to the floor, and only the smallest failing pieces
are lost, named in input terms.

The work modules' pieces are tested directly; the splitting through the real engine, as
in ``orch job run`` (mutual TLS on 127.0.0.1, the workspace's CA, a SQLite store and
sink), with this test speaking the agent's side of the protocol: one agent, one port,
whose "work" echoes each number (or line, or byte) and fails the task (a failed result)
when it holds a bad one.  Each TASKS message is answered with one RESULTS message, so
the engine's decisions come in a fixed order and every run is the same.  Real crashes
of real C code on real nodes are tests/integration/test_poison.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from orchestrator.agent import protocol as P
from orchestrator.agent.frames import decode_tasks, encode_result
from orchestrator.deploy import pki
from orchestrator.scheduler import isolation, jobs
from orchestrator.scheduler.builtin_modules import ChunksModule, LinesModule, RangeModule
from orchestrator.scheduler.engine import Engine
from orchestrator.scheduler.isolation import PIECE_BASE
from orchestrator.scheduler.module_loader import load_work_module
from orchestrator.scheduler.run import JobRun, Outcome, ReleaseInfo, Task
from orchestrator.scheduler.sinks import Record, open_sink
from orchestrator.scheduler.spec import JobSpec
from orchestrator.scheduler.workmodules import WorkModule
from orchestrator.server.app import create_app
from orchestrator.state import JobState, Store
from orchestrator.workspace import Workspace
from tests.helpers.net import start_on_free_port

SECOND = 1_000_000_000
"""What the fake port reports as each task's elapsed time: the pipeline stays 2 deep."""

# -- the work modules' pieces ------------------------------------------------------------------


def test_range_pieces_are_numbers() -> None:
    module = RangeModule("0:100", {})
    data = b"1000 1064"
    assert module.can_split and module.origin() is None
    assert module.units(data) == 64
    assert module.cut(data, 0, 32) == b"1000 1032" and module.cut(data, 63, 64) == b"1063 1064"
    assert module.locate(data, None, 5, 6) == {"unit": "numbers", "first": 1005, "last": 1005}
    assert isolation.describe(module.locate(data, None, 5, 9)) == "numbers 1005-1008"


def test_lines_pieces_are_lines_counted_from_one(tmp_path: Path) -> None:
    path = tmp_path / "in.txt"
    path.write_bytes(b"a\nbb\n\nccc\nlast")
    with LinesModule(str(path), {"max_lines": 2}) as module:
        assert module.origin() == 0
        first = module.next(1.0)
        assert first == b"a\nbb\n" and module.origin() == 2
        data = module.next(1.0)
        third = module.next(1.0)
    assert data == b"\nccc\n" and third == b"last"
    assert module.units(data) == 2 and module.units(b"last") == 1 and module.units(b"x\ny") == 2
    assert [module.cut(data, i, i + 1) for i in range(2)] == [b"\n", b"ccc\n"]
    assert module.cut(b"x\ny", 1, 2) == b"y" and module.cut(b"x\ny", 0, 2) == b"x\ny"
    assert module.locate(data, 2, 1, 2) == {"unit": "lines", "first": 4, "last": 4}  # "ccc" is line 4


def test_chunks_pieces_are_byte_offsets(tmp_path: Path) -> None:
    path = tmp_path / "in.bin"
    path.write_bytes(bytes(range(10)))
    with ChunksModule(str(path), {"max_bytes": 4}) as module:
        module.next(1.0)
        assert module.origin() == 4
        data = module.next(1.0)
    assert data == bytes([4, 5, 6, 7]) and module.units(data) == 4
    assert module.cut(data, 1, 3) == bytes([5, 6])
    assert module.locate(data, 4, 1, 3) == {"unit": "bytes", "first": 5, "last": 6}


def test_a_module_of_a_release_does_not_split_unless_it_says_so() -> None:
    class Own(WorkModule):
        name = "own"

        def next(self, size: float) -> bytes | None:
            return None

        def position(self) -> dict[str, Any]:
            return {}

        def progress(self) -> tuple[float, float | None]:
            return 0.0, None

    own = Own("", {})
    assert not own.can_split and own.origin() is None
    with pytest.raises(NotImplementedError, match="does not cut tasks in pieces"):
        own.units(b"x")


# -- the engine, driven over the protocol -------------------------------------------------------


Work = Callable[[bytes], "tuple[bool, bytes]"]


def numbers_work(bad: set[int]) -> Work:
    """The range work: each number on a line; fails when the task holds a bad number."""
    def work(data: bytes) -> tuple[bool, bytes]:
        low, high = (int(x) for x in data.split())
        hit = sorted(n for n in bad if low <= n < high)
        if hit:
            return False, f"bad number {hit[0]}".encode()
        return True, b"".join(b"%d\n" % n for n in range(low, high))
    return work


class Port:
    """The agent side of one node with one port, over the real protocol."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, work: Work) -> None:
        self.reader, self.writer, self.work = reader, writer, work
        self.ran: list[tuple[int, int, bytes, bool]] = []  # seq, attempt, data, ok: every task answered
        self.messages = 0

    async def serve(self, job: str, *, stop_after: int | None = None) -> None:
        """LOADED, then answer every TASKS with one RESULTS, until UNLOAD (or, with
        ``stop_after``, until that many TASKS were answered)."""
        load = P.parse_control(P.LOAD, await self._next(P.LOAD))
        assert load["work"] == job
        self.writer.write(P.control(P.LOADED, work=job, ports=[0]))
        while True:
            kind, body = await asyncio.wait_for(P.read_message(self.reader), 30)
            if kind in (P.HEARTBEAT,):
                self.writer.write(P.message(P.HEARTBEAT))
                continue
            if kind == P.UNLOAD:
                return
            assert kind == P.TASKS, P.KIND_NAMES[kind]
            port, frames = P.parse_port(body)
            answers = []
            for seq, attempt, _size, data in decode_tasks(bytes(frames)):
                ok, out = self.work(bytes(data))
                self.ran.append((seq, attempt, bytes(data), ok))
                answers.append(encode_result(seq, ok, SECOND, out))
            self.writer.write(P.port_message(P.RESULTS, port, b"".join(answers)))
            self.messages += 1
            if stop_after is not None and self.messages >= stop_after:
                return

    async def _next(self, kind: int) -> bytes:
        while True:
            got, body = await asyncio.wait_for(P.read_message(self.reader), 30)
            if got != P.HEARTBEAT:
                assert got == kind, P.KIND_NAMES[got]
                return body


class Harness:
    """A workspace, its store, one job and an engine that serves it on 127.0.0.1."""

    def __init__(self, folder: Path, **spec: Any) -> None:
        self.folder = folder
        self.ws = Workspace.init(folder / "ws")
        self.store = Store.open(self.ws.state_db)
        self.job_id = "jisolate"
        self.spec = JobSpec(release="iso@1", function="f", symbol="f", sink="sqlite:out.db", task_size=1,
                            max_attempts=2, agent_wait_seconds=10, **spec)
        self.store.add_job(self.job_id, release="iso@1", function="f", spec=self.spec.model_dump(mode="json"))
        self.events: list[tuple[str, dict[str, Any]]] = []
        cert, key = pki.issue_node_cert(self.ws, "w-1")
        (folder / "w-1.crt").write_bytes(cert)
        (folder / "w-1.key").touch(0o600)
        (folder / "w-1.key").write_bytes(key)

    def engine(self) -> Engine:
        return Engine(self.store, ssl_context=pki.server_ssl_context(self.ws), peer_id=pki.peer_node_id,
                      admit=lambda node: "workers" if node == "w-1" else None,
                      on_event=lambda kind, data: self.events.append((kind, data)))

    def job_run(self) -> tuple[JobRun, list[Task]]:
        """The job as `orch job run` and `resume` prepare it: module and sink at their stored
        positions, and the stored work restored (jobs._restore, the resume's own code)."""
        progress = self.store.job_progress(self.job_id)
        module = load_work_module(self.spec.work_module, self.spec.input, self.spec.module_options,
                                  progress.get("position"))
        sink = open_sink(self.spec.sink, root=self.ws.root)
        release = ReleaseInfo(folder="iso-1", sha256="0" * 64, library="libiso.so", build=[], tarball=lambda: b"")
        job = JobRun(self.job_id, self.spec, module, sink, release,
                     next_write=sink.open(self.job_id, progress.get("checkpoint")),
                     generated=int(progress.get("generated", 0)), checkpoint=progress.get("checkpoint"),
                     counters=progress.get("counters"))
        return job, jobs._restore(self.store, job)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[tuple[Engine, asyncio.Task[Outcome], int]]:
        job, tasks = self.job_run()
        engine = self.engine()
        try:
            port = await start_on_free_port(engine)
            run = asyncio.create_task(engine.run(job, tasks))
            try:
                yield engine, run, port
            finally:
                if not run.done():
                    engine.suspend("the test ended")
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(run, 10)
                await engine.close()
        finally:
            job.sink.close()
            job.module.close()

    async def dial(self, port: int, work: Work) -> Port:
        ctx = pki.client_ssl_context(pki.ca_cert_path(self.ws), self.folder / "w-1.crt", self.folder / "w-1.key")
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=P.SCHEDULER_NAME), 10)
        writer.write(P.control(P.HELLO, node="w-1", name="w-1", slots=1, releases=[],
                               version=P.PROTOCOL_VERSION, pid=0))
        side = Port(reader, writer, work)
        await side._next(P.WELCOME)
        return side

    def run_job(self, work: Work, *, stop_after: int | None = None) -> tuple[Outcome, Port]:
        """Run (or resume) the job with one agent doing ``work`` to its end (or, with
        ``stop_after``, suspend it after that many TASKS messages)."""
        async def main() -> tuple[Outcome, Port]:
            async with self.running() as (engine, run, port):
                side = await self.dial(port, work)
                try:
                    await side.serve(self.job_id, stop_after=stop_after)
                    if stop_after is not None:
                        engine.suspend("stopped by the test")
                    outcome = await asyncio.wait_for(run, 30)
                finally:
                    side.writer.close()
                    with contextlib.suppress(ConnectionError, ssl.SSLError, TimeoutError):
                        await asyncio.wait_for(side.writer.wait_closed(), 5)
            return outcome, side

        return asyncio.run(asyncio.wait_for(main(), 120))

    def records(self) -> list[Record]:
        with open_sink(self.spec.sink, root=self.ws.root) as sink:
            return list(sink.read(self.job_id))

    def status(self) -> dict[str, Any]:
        with Store.open(self.ws.state_db) as store:  # a store of its own, as after a restart
            return jobs.status(store, self.job_id)


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(**spec: Any) -> Harness:
        folder = tmp_path / f"h{len(made)}"
        folder.mkdir()
        made.append(Harness(folder, **spec))
        return made[-1]

    yield make
    for h in made:
        h.store.close()


def numbers(low: int, high: int, without: set[int] | frozenset[int] = frozenset()) -> bytes:
    return b"".join(b"%d\n" % n for n in range(low, high) if n not in without)


def pieces(status: dict[str, Any]) -> list[tuple[int, int, int]]:
    return [(p["task"], p["first"], p["last"]) for p in status["failed_pieces"]]


BAD = {5, 70, 71, 300, 639}


def test_five_bad_numbers_are_isolated_to_themselves_and_everything_else_is_written_once_in_order(
        harness: Callable[..., Harness]) -> None:
    h = harness(work_module="range", input="0:640", module_options={"max_span": 64})
    outcome, port = h.run_job(numbers_work(BAD))
    assert outcome.state == JobState.DONE, outcome
    # One record per task, in order, each ok: the job lost the bad numbers only.
    records = h.records()
    assert [(r.seq, r.ok) for r in records] == [(seq, True) for seq in range(10)]
    assert b"".join(r.payload for r in records) == numbers(0, 640, BAD)
    status = h.status()
    assert pieces(status) == [(0, 5, 5), (1, 70, 70), (1, 71, 71), (4, 300, 300), (9, 639, 639)]
    assert {p["unit"] for p in status["failed_pieces"]} == {"numbers"}
    assert all(p["attempts"] == 2 and "bad number" in p["error"] for p in status["failed_pieces"])
    assert status["failed_tasks"] == [] and status["state"] == "done"
    counters = outcome.counters
    assert (counters["done"], counters["failed"], counters["pieces_failed"]) == (10, 0, 5)
    # Each bad number was cut down from its task of 64 in halves: 6 cuts each (70 and
    # 71 share theirs: the last cut made them two pieces), every piece tried twice
    # before it was cut or failed.
    assert counters["split"] == 6 * 4
    wires = [seq for seq, *_ in port.ran if seq >= PIECE_BASE]
    assert wires and len(set(wires)) * 2 >= len(wires)
    # Every good number was computed by exactly one successful task or piece.
    good = [n for seq, _, data, ok in port.ran if ok for n in range(*map(int, data.split()))]
    assert sorted(good) == sorted(set(range(640)) - BAD)


def test_the_floor_stops_the_cutting_and_only_pieces_that_small_are_lost(harness: Callable[..., Harness]) -> None:
    h = harness(work_module="range", input="0:640", module_options={"max_span": 64}, isolate_floor=8)
    outcome, _ = h.run_job(numbers_work(BAD))
    assert outcome.state == JobState.DONE
    lost = pieces(h.status())
    assert lost == [(0, 0, 7), (1, 64, 71), (4, 296, 303), (9, 632, 639)]
    gone = {n for _, first, last in lost for n in range(first, last + 1)}
    assert b"".join(r.payload for r in h.records()) == numbers(0, 640, gone)


def test_a_work_that_fails_on_everything_is_isolated_only_so_far(harness: Callable[..., Harness]) -> None:
    h = harness(work_module="range", input="0:640", module_options={"max_span": 64})
    everything = set(range(128, 640))
    outcome, port = h.run_job(numbers_work(everything))
    assert outcome.state == JobState.DONE
    records = h.records()
    assert [(r.seq, r.ok) for r in records] == [(0, True), (1, True)] + [(seq, False) for seq in range(2, 10)]
    assert b"".join(r.payload for r in records if r.ok) == numbers(0, 128)
    assert "every piece failed" in records[2].payload.decode()
    status = h.status()
    assert [seq for seq, _ in status["failed_tasks"]] == list(range(2, 10))
    kinds = [kind for kind, _ in h.events]
    assert kinds.count("job.isolation_stopped") == 1
    # Bounded: at most MAX_FAILED_RUNS runs that fail all attempts per task, for the few
    # tasks cut before isolation stopped, and the rest failed whole.
    assert len(port.ran) < 3 * 2 * (isolation.MAX_FAILED_RUNS + 1) * 2 + 8 * 2, len(port.ran)
    assert outcome.counters["failed"] == 8


def test_without_isolation_a_failing_task_is_lost_whole(harness: Callable[..., Harness]) -> None:
    h = harness(work_module="range", input="0:640", module_options={"max_span": 64}, isolate_failures=False)
    outcome, port = h.run_job(numbers_work({70}))
    assert outcome.state == JobState.DONE
    assert b"".join(r.payload for r in h.records() if r.ok) == numbers(0, 64) + numbers(128, 640)
    status = h.status()
    assert [seq for seq, _ in status["failed_tasks"]] == [1] and status["failed_pieces"] == []
    assert all(seq < PIECE_BASE for seq, *_ in port.ran)


def test_a_job_told_to_fail_on_a_failed_task_is_not_isolated(harness: Callable[..., Harness]) -> None:
    h = harness(work_module="range", input="0:640", module_options={"max_span": 64}, on_task_failure="fail")
    outcome, port = h.run_job(numbers_work({70}))
    assert outcome.state == JobState.FAILED and "task 1 failed after 2 attempts" in outcome.reason
    assert all(seq < PIECE_BASE for seq, *_ in port.ran)


def test_a_failing_task_of_one_number_is_named_too(harness: Callable[..., Harness]) -> None:
    h = harness(work_module="range", input="0:20", module_options={"max_span": 1})
    outcome, _ = h.run_job(numbers_work({7}))
    assert outcome.state == JobState.DONE
    status = h.status()
    assert pieces(status) == [(7, 7, 7)] and [seq for seq, _ in status["failed_tasks"]] == [7]


def test_tasks_of_one_line_are_failed_whole_and_named_by_line(harness: Callable[..., Harness], tmp_path: Path) -> None:
    """A task at the floor is not cut: it is failed whole, and still named in input terms
    (its line, from where the task starts in the file), each such task counted once in
    ``pieces_failed``; the store keeps it as a split of one failed leaf (its size and origin)."""
    path = tmp_path / "in.txt"
    path.write_bytes(b"a\npoison\nc\npoison\ne\n")

    def echo_lines(data: bytes) -> tuple[bool, bytes]:
        return (False, b"poisoned") if data == b"poison\n" else (True, data)

    h = harness(work_module="lines", input=str(path), module_options={"max_lines": 1})
    outcome, port = h.run_job(echo_lines)
    assert outcome.state == JobState.DONE
    assert (outcome.counters["failed"], outcome.counters["pieces_failed"], outcome.counters["split"]) == (2, 2, 0)
    assert all(seq < PIECE_BASE for seq, *_ in port.ran)
    assert [(r.seq, r.ok, r.payload) for r in h.records()] == [
        (0, True, b"a\n"), (1, False, b"attempt 2: w-1: poisoned"), (2, True, b"c\n"),
        (3, False, b"attempt 2: w-1: poisoned"), (4, True, b"e\n")]
    assert h.status()["failed_pieces"] == [
        {"task": seq, "unit": "lines", "first": seq + 1, "last": seq + 1, "items": 1, "attempts": 2,
         "error": "attempt 2: w-1: poisoned", "text": f"lines {seq + 1}"} for seq in (1, 3)]
    with Store.open(h.ws.state_db) as store:
        stored = isolation.load(store, h.job_id)
    assert [(seq, s["size"], s["origin"], s["units"]) for seq, s in sorted(stored.items())] == [
        (1, 1.0, 1, 1), (3, 1.0, 3, 1)]


def test_lines_are_named_by_line_number(harness: Callable[..., Harness], tmp_path: Path) -> None:
    lines = [b"poison\n" if i in (6, 63, 64) else b"line %d\n" % i for i in range(150)]
    path = tmp_path / "in.txt"
    path.write_bytes(b"".join(lines))

    def echo_lines(data: bytes) -> tuple[bool, bytes]:
        return (False, b"poisoned") if b"poison\n" in data.splitlines(keepends=True) else (True, data)

    h = harness(work_module="lines", input=str(path), module_options={"max_lines": 16})
    outcome, _ = h.run_job(echo_lines)
    assert outcome.state == JobState.DONE
    assert [(p["unit"], p["first"], p["last"]) for p in h.status()["failed_pieces"]] == [
        ("lines", 7, 7), ("lines", 64, 64), ("lines", 65, 65)]
    assert b"".join(r.payload for r in h.records() if r.ok) == b"".join(
        line for i, line in enumerate(lines) if i not in (6, 63, 64))


def test_chunks_are_named_by_byte_offset(harness: Callable[..., Harness], tmp_path: Path) -> None:
    content = bytearray(b"abcdefgh" * 100)
    for offset in (10, 411):
        content[offset] = 0xFF
    path = tmp_path / "in.bin"
    path.write_bytes(bytes(content))

    def echo_bytes(data: bytes) -> tuple[bool, bytes]:
        return (False, b"a 0xff byte") if b"\xff" in data else (True, data)

    h = harness(work_module="chunks", input=str(path), module_options={"max_bytes": 100})
    outcome, _ = h.run_job(echo_bytes)
    assert outcome.state == JobState.DONE
    assert [(p["unit"], p["first"], p["last"], p["task"]) for p in h.status()["failed_pieces"]] == [
        ("bytes", 10, 10, 0), ("bytes", 411, 411, 4)]
    assert b"".join(r.payload for r in h.records() if r.ok) == bytes(content[:10] + content[11:411] + content[412:])


def test_a_resume_in_the_middle_of_an_isolation_goes_on_from_the_stored_pieces(
        harness: Callable[..., Harness]) -> None:
    h = harness(work_module="range", input="0:640", module_options={"max_span": 64})
    first, _ = h.run_job(numbers_work(BAD), stop_after=12)
    assert first.state == JobState.SUSPENDED
    with Store.open(h.ws.state_db) as store:
        stored = isolation.load(store, h.job_id)
    assert stored, "the stop must come while a task is cut in pieces"
    written_before = h.store.job_progress(h.job_id)["next_write"]
    assert written_before < 10

    second, resumed = h.run_job(numbers_work(BAD))
    assert second.state == JobState.DONE, second
    records = h.records()
    assert [(r.seq, r.ok) for r in records] == [(seq, True) for seq in range(10)]
    assert b"".join(r.payload for r in records) == numbers(0, 640, BAD)
    assert pieces(h.status()) == [(0, 5, 5), (1, 70, 70), (1, 71, 71), (4, 300, 300), (9, 639, 639)]
    # The resumed run went on with the pieces: its first tasks are pieces, not the whole task again.
    assert resumed.ran[0][0] >= PIECE_BASE
    assert second.counters["pieces_failed"] == 5


def test_status_names_the_failed_pieces_after_the_engine_is_gone(harness: Callable[..., Harness]) -> None:
    h = harness(work_module="range", input="0:640", module_options={"max_span": 64})
    h.run_job(numbers_work({300}))
    status = h.status()
    assert status["failed_pieces"] == [{
        "task": 4, "unit": "numbers", "first": 300, "last": 300, "items": 1, "attempts": 2,
        "error": "attempt 2: w-1: bad number 300", "text": "numbers 300"}]
    kinds = [kind for kind, _ in h.events]
    assert kinds.count("task.split") == 6 and kinds.count("piece.failed") == 1
    with Store.open(h.ws.state_db) as store:
        reasons = [e.reason for e in store.events(job=h.job_id) if e.kind == "job.task_split"]
    assert reasons[0].startswith("task 4 failed all 2 attempts (attempt 2: w-1: bad number 300); it runs again "
                                 "in halves: numbers 256-287 and numbers 288-319")


def test_the_apis_job_view_names_the_failed_pieces(harness: Callable[..., Harness]) -> None:
    """GET /jobs/{id} (in process, without the server's lifespan) answers what `orch job
    status --json` prints, the failed pieces included."""
    h = harness(work_module="range", input="0:640", module_options={"max_span": 64})
    h.run_job(numbers_work({70, 71}))

    async def view() -> httpx.Response:
        app = create_app(h.ws, token="t0ken")
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://orch") as client:
                return await client.get(f"/jobs/{h.job_id}", headers={"Authorization": "Bearer t0ken"})
        finally:
            app.state.stores.close()

    response = asyncio.run(view())
    assert response.status_code == 200
    assert [(p["task"], p["text"]) for p in response.json()["failed_pieces"]] == [(1, "numbers 70"), (1, "numbers 71")]
    assert response.json()["failed_pieces"] == h.status()["failed_pieces"]
