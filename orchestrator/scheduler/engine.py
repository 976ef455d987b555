"""The scheduler's engine: the task flow of a job, agents in, tasks out, each result recorded once.

``Engine`` owns the job: one asyncio loop does everything (no threads): it loads the
job's work on the agents' ports, cuts tasks with the work module at each node's adaptive
size, keeps every port's pipeline full, records results first-completion-wins, writes
the output to the sink strictly in seq order, and retries what died elsewhere.
The agents' connections (listening, admission, heartbeats, the EXEC fan-out) are its
base class's, ``connections.AgentServer``; the engine answers that layer's hooks
(``_handle`` each message, ``_lose`` an agent, ``_joined``, ``_job_heartbeat``).

The store is written in batches on this path: the tasks a dispatch round made (with the
work module's position) before they are sent; the results of one RESULTS message as it
arrives; and, every ``COMMIT_INTERVAL``, the sink's checkpoint together with dropping
the done tasks it now holds.  A crash at any point leaves the job resumable from the
store: pending tasks run again, done ones are written, nothing done is computed twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from orchestrator.agent import protocol as P
from orchestrator.agent.frames import (
    HEADER_LEN,
    TASK_HEADER,
    TASK_MAGIC,
    decode_result_tuples,
    encode_result,
)
from orchestrator.scheduler import isolation as iso_store
from orchestrator.scheduler.connections import AgentServer
from orchestrator.scheduler.isolation import PIECE_BASE, Isolation, Split, describe
from orchestrator.scheduler.run import Agent, EventSink, Finished, JobRun, Outcome, Port, Task
from orchestrator.scheduler.sinks import Record
from orchestrator.scheduler.sizing import Sizer
from orchestrator.state import JobState, Store

COMMIT_INTERVAL = 0.2
"""Seconds between sink commits (each an fsync or a database COMMIT)."""
PIPELINE_SECONDS = 0.05
"""Work queued on a port beyond the task it runs, so it never waits for the network."""
MAX_DEPTH = 1000
HISTORY = 100


class Engine(AgentServer):
    """The scheduler: runs one job at a time on the agents its base class serves."""

    def __init__(self, store: Store, *, ssl_context: ssl.SSLContext, admit: Callable[[str], str | None],
                 peer_id: Callable[[Any], str | None], on_event: EventSink | None = None) -> None:
        super().__init__(ssl_context=ssl_context, admit=admit, peer_id=peer_id, on_event=on_event)
        self.store = store
        self.job: JobRun | None = None
        self._done: asyncio.Event | None = None
        self._no_agents_since: float | None = None

    # -- the connection layer's hooks (connections.AgentServer) --------------------------------

    def _joined(self, agent: Agent) -> None:
        if self.job is not None:
            self._offer(agent)

    def _job_heartbeat(self) -> float | None:
        return self.job.spec.heartbeat_seconds if self.job else None

    # -- messages -------------------------------------------------------------------------------

    def _handle(self, agent: Agent, kind: int, body: bytes) -> None:
        if kind == P.RESULTS:
            self._results(agent, body)
        elif kind == P.HEARTBEAT:
            pass
        elif kind == P.PORT_DIED:
            msg = P.parse_control(kind, body)
            self._port_died(agent, int(msg["port"]), msg.get("seq"), str(msg.get("reason", "")))
        elif kind == P.PORT_READY:
            port = agent.ports.get(int(P.parse_control(kind, body)["port"]))
            if port is not None:
                port.ready = True
                self._pump()
        elif kind == P.LOADED:
            self._loaded(agent, P.parse_control(kind, body))
        elif kind == P.LOAD_FAILED:
            self._load_failed(agent, P.parse_control(kind, body))
        elif kind == P.EXEC_DONE:
            self._exec_done(agent, P.parse_control(kind, body))
        elif kind == P.ERROR:
            raise P.ProtocolError(f"the agent reported: {P.parse_control(kind, body).get('reason')}")
        else:
            raise P.ProtocolError(f"unexpected {P.KIND_NAMES[kind]} from an agent")

    def _offer(self, agent: Agent) -> None:
        """Ask the agent to load the job's work on its ports."""
        job = self.job
        if job is None or agent.excluded:
            return
        spec = job.spec
        if spec.family is not None and agent.family != spec.family:
            return
        try:
            sha, _build, _tarball = job.release.for_platform(agent.platform)
        except LookupError as exc:
            self._exclude(job, agent, str(exc))
            return
        count = spec.ports_per_node or agent.slots
        agent.sizer = self._sizer(job)
        agent.send(P.control(
            P.LOAD, work=job.id, release=job.release.folder, sha256=sha,
            library=job.release.library, function=spec.symbol, ports=list(range(count)),
            task_timeout=spec.task_timeout,
        ))

    def _sizer(self, job: JobRun) -> Sizer:
        spec = job.spec
        initial = spec.initial_task_size if spec.initial_task_size is not None else max(job.module.min_size, 1e-3)
        return Sizer(target=spec.target_task_seconds, min_size=job.module.min_size, initial=initial,
                     fixed=spec.task_size)

    def _loaded(self, agent: Agent, msg: dict[str, Any]) -> None:
        if self.job is None or msg.get("work") != self.job.id:
            return
        agent.ports = {int(i): Port(int(i)) for i in msg.get("ports", [])}
        agent.loaded = True
        self.job.where[agent.node] = "running"
        self.on_event("agent.loaded", {"node": agent.node, "ports": len(agent.ports)})
        self._pump()

    def _load_failed(self, agent: Agent, msg: dict[str, Any]) -> None:
        job = self.job
        if job is None:
            return
        if msg.get("missing") and not agent.release_sent:
            agent.release_sent = True
            sha, build, tarball = job.release.for_platform(agent.platform)  # _offer checked it has one
            header = {"release": job.release.folder, "sha256": sha, "build": build}
            agent.send(P.release_message(header, tarball()))
            self.on_event("agent.release_sent", {"node": agent.node, "release": job.release.folder})
            self._offer(agent)  # the agent handles control messages in order: installed, then loaded
            return
        self._exclude(job, agent, str(msg.get("reason") or "the work could not be loaded"))

    def _exclude(self, job: JobRun, agent: Agent, reason: str) -> None:
        """Leave the agent out of this job, saying why."""
        agent.excluded = reason
        job.where[agent.node] = f"excluded: {agent.excluded}"
        self.store.record_event("job.node_excluded", job=job.id, node=agent.node, reason=agent.excluded)
        self.on_event("agent.excluded", {"node": agent.node, "reason": agent.excluded})

    # -- dispatch -------------------------------------------------------------------------------

    def _depth(self, agent: Agent) -> int:
        assert agent.sizer is not None
        expected = agent.sizer.expected_seconds()
        if expected <= 0:
            return 2
        return max(2, min(MAX_DEPTH, int(PIPELINE_SECONDS / expected) + 1))

    def _pump(self) -> None:
        """Top up every ready port's pipeline; new tasks are stored before they are sent."""
        job = self.job
        if job is None or job.failure:
            return
        made: list[Task] = []
        sends: list[tuple[Agent, int, list[Task]]] = []
        for agent in self.agents.values():
            if agent.lost or not agent.loaded:
                continue
            depth = self._depth(agent)
            low_water = depth // 2  # top up in batches of at least half the depth
            for port in agent.ports.values():
                if not port.ready or len(port.inflight) > low_water:
                    continue
                want = depth - len(port.inflight)
                batch = self._take(job, agent, want, made)
                if not batch:
                    break
                port.inflight.extend(batch)
                sends.append((agent, port.index, batch))
        if made:
            self.store.add_tasks(job.id, made[0].seq, made[-1].seq, b"".join([t.frame for t in made]), job.progress())
        for agent, index, batch in sends:
            agent.send(P.port_message(P.TASKS, index, b"".join([t.frame_for_try() for t in batch])))
        self._check_done()

    def _take(self, job: JobRun, agent: Agent, want: int, made: list[Task]) -> list[Task]:
        out: list[Task] = []
        if job.retry:
            others = any(a is not agent and a.loaded and not a.lost for a in self.agents.values())
            skipped: list[Task] = []
            while job.retry and len(out) < want:
                task = job.retry.popleft()
                if task.seq not in job.outstanding:
                    continue  # finished meanwhile (a late result)
                if others and task.avoid == agent.node:
                    skipped.append(task)
                    continue
                out.append(task)
            job.retry.extendleft(reversed(skipped))
        if len(out) < want and not job.exhausted and not job.paused():
            assert agent.sizer is not None
            size = agent.sizer.size
            count = want - len(out)
            origin = job.module.origin() if job.isolation is not None else None
            datas = job.module.next_many(size, count)
            if len(datas) < count:
                job.exhausted = True
            seq = job.generated
            outstanding, pack = job.outstanding, TASK_HEADER.pack
            fresh = []
            for data in datas:
                task = Task(seq, size, pack(TASK_MAGIC, seq, 1, size, len(data)) + data)
                outstanding[seq] = task
                fresh.append(task)
                seq += 1
            job.generated = seq
            if origin is not None and job.isolation is not None:  # a file module's tasks: where each starts
                for task, at in zip(fresh, job.isolation.origins(datas, origin), strict=True):
                    task.origin = at
            made += fresh
            out += fresh
        return out

    # -- results --------------------------------------------------------------------------------

    def _results(self, agent: Agent, body: bytes) -> None:
        job = self.job
        index, frames = P.parse_port(body)
        results = decode_result_tuples(frames)
        if job is None:
            return
        port = agent.ports.get(index)
        if not agent.lost and port is None:
            raise P.ProtocolError(f"RESULTS for port {index}, which was not loaded")
        finished = Finished()
        outstanding, records, counters = job.outstanding, job.records, job.counters
        sizer = agent.sizer
        observe = sizer.observe if sizer is not None else None
        history = agent.history if len(agent.history) < HISTORY else None
        inflight = port.inflight if port is not None and not agent.lost else None
        accepted = finished.accepted
        buffered = done = 0
        for seq, ok, elapsed_ns, payload in results:
            task: Task | None
            if inflight is not None and inflight and inflight[0].seq == seq:
                task = inflight.popleft()
            elif inflight is not None and any(t.seq == seq for t in inflight):
                raise P.ProtocolError(f"port {index} answered seq {seq} out of turn")
            else:
                # A lost agent's answer, or a task sent to a port that died before the scheduler
                # heard of it, run by the restarted port: the first completion still wins.
                task = outstanding.get(seq)
                if task is not None and not ok:
                    task = None  # that attempt was already counted, and the task is queued again
            if task is None or seq not in outstanding:
                counters.discarded += 1  # another node finished it first
                finished.all_accepted = False
                continue
            if ok:
                if seq >= PIECE_BASE:  # a piece of a failing task (isolation.py)
                    finished.all_accepted = False
                    self._piece_ok(job, task, elapsed_ns, payload, finished)
                    continue
                # The hot path (one pass per task): record, account, adapt.
                seconds = elapsed_ns * 1e-9
                if observe is not None:
                    observe(task.size, seconds)
                if history is not None and len(history) < HISTORY:
                    history.append(seconds)
                del outstanding[seq]
                records[seq] = Record(seq, True, payload)
                buffered += len(payload)
                done += 1
                accepted.append((seq, elapsed_ns, payload))
            else:
                finished.all_accepted = False
                message = payload.decode("utf-8", "replace")
                self._attempt_failed(job, task, agent.node, f"{agent.name}: {message}", finished)
        job.buffered += buffered
        counters.done += done
        agent.done += done
        if accepted:
            finished.max_seq = max(finished.max_seq, max([a[0] for a in accepted]))
        if finished.all_accepted and finished.accepted:
            # The common case: every result was new and ok; store the frames as they came.
            self.store.add_results(job.id, agent.node, finished.max_seq, bytes(frames), finished.failed)
        else:
            self._store_results(job, agent.node, finished)
        if sizer is not None:
            job.sizes[agent.node] = sizer.size
        if sizer is not None and sizer.slow and not agent.reported_slow:
            agent.reported_slow = True
            reason = (f"node {agent.name} cannot meet the target of {job.spec.target_task_seconds} s "
                      f"even at the smallest task size ({sizer.elapsed:.3f} s per task)")
            self.store.record_event("job.node_slow", job=job.id, node=agent.node, reason=reason)
            self.on_event("node.slow", {"node": agent.node, "reason": reason})
        self._write_output(job)
        self._pump()

    def _give_up(self, job: JobRun, task: Task, finished: Finished) -> None:
        """The task failed its last attempt: it is written as failed, in its place."""
        del job.outstanding[task.seq]
        payload = task.error.encode()
        job.records[task.seq] = Record(task.seq, False, payload)
        job.buffered += len(payload)
        job.counters.failed += 1
        finished.failed.append((task.seq, task.attempts, task.error))

    def _store_results(self, job: JobRun, node: str | None, finished: Finished) -> None:
        if finished.accepted or finished.failed:
            frames = b"".join([encode_result(seq, True, ns, payload) for seq, ns, payload in finished.accepted])
            self.store.add_results(job.id, node, finished.max_seq, frames, finished.failed)
        for parent, frame in finished.pieces:  # kept until their task is written, as its own results are
            self.store.add_results(job.id, node, parent, frame)

    def _attempt_failed(self, job: JobRun, task: Task, node: str | None, reason: str, finished: Finished) -> None:
        task.attempts += 1
        task.avoid = node
        task.error = f"attempt {task.attempts}: {reason}"
        iso = job.isolation
        if task.attempts >= job.spec.max_attempts:
            if iso is not None and self._isolate(job, iso, task, node):
                return
            if iso is not None and task.seq >= PIECE_BASE:
                self._piece_failed(job, iso, task, node, reason, finished)
                return
            self._give_up(job, task, finished)
            message = f"task {task.seq} failed after {task.attempts} attempts; last: {reason}"
            self.store.record_event("job.task_failed", job=job.id, node=node, reason=message)
            self.on_event("task.failed", {"seq": task.seq, "reason": message})
            if iso is not None:  # named in input terms like a failed piece
                job.counters.pieces_failed += 1
                iso_store.save(self.store, job.id, iso.whole_failed(
                    task.seq, task.size, task.frame[HEADER_LEN:], task.origin, task.attempts, task.error))
            if job.spec.on_task_failure == "fail":
                job.failure = message
                self._check_done()
            return
        job.counters.retried += 1
        if iso is not None and task.seq >= PIECE_BASE:
            iso_store.save(self.store, job.id, iso.piece_attempt(task.seq, task.attempts, task.error))
        else:
            self.store.count_attempt(job.id, task.seq, task.attempts, task.error)
        job.retry.appendleft(task)

    # -- isolation: a task that failed every attempt runs again in halves (isolation.py) --------

    def _isolate(self, job: JobRun, iso: Isolation, task: Task, node: str | None) -> bool:
        """Cut the task (or piece) in halves that run next, unless it is at the floor."""
        label = iso.label(task.seq)
        if task.seq >= PIECE_BASE:
            cut = iso.split_piece(task.seq, task.avoid)
        else:
            cut = iso.split_task(task.seq, task.size, task.frame[HEADER_LEN:], task.origin, task.avoid)
        if cut is None:
            return False
        split, pieces = cut
        del job.outstanding[task.seq]
        made = []
        for piece in pieces:
            made.append(Task.make(piece.wire, piece.size, piece.data, piece.attempts))
            made[-1].avoid = piece.avoid
            job.outstanding[piece.wire] = made[-1]
        job.retry.extendleft(reversed(made))
        job.counters.split += 1
        iso_store.save(self.store, job.id, split)
        message = (f"task {label} failed all {task.attempts} attempts ({task.error}); "
                   f"it runs again in halves: {' and '.join(iso.place(piece.seq) for piece in made)}")
        self.store.record_event("job.task_split", job=job.id, node=node, reason=message)
        self.on_event("task.split", {"seq": split.seq, "node": node or "", "reason": message})
        return True

    def _piece_ok(self, job: JobRun, task: Task, elapsed_ns: int, payload: bytes, finished: Finished) -> None:
        assert job.isolation is not None
        del job.outstanding[task.seq]
        split, settled = job.isolation.piece_ok(task.seq, payload)
        finished.pieces.append((split.seq, encode_result(task.seq, True, elapsed_ns, payload)))
        if settled:
            self._settle(job, job.isolation, split, finished)

    def _piece_failed(self, job: JobRun, iso: Isolation, task: Task, node: str | None, reason: str,
                      finished: Finished) -> None:
        del job.outstanding[task.seq]
        split, leaf = iso.piece_failed(task.seq, task.attempts, task.error)
        job.counters.pieces_failed += 1
        iso_store.save(self.store, job.id, split)
        message = (f"task {split.seq}: its piece {describe(leaf.where or {})} failed after {task.attempts} "
                   f"attempts; last: {reason}")
        self.store.record_event("job.piece_failed", job=job.id, node=node, reason=message)
        self.on_event("piece.failed", {"seq": split.seq, "node": node or "", "reason": message})
        if split.settled():
            self._settle(job, iso, split, finished)

    def _settle(self, job: JobRun, iso: Isolation, split: Split, finished: Finished) -> None:
        """Every piece of a split task is ok or failed: its record takes its place."""
        was_stopped = iso.stopped
        record, message = iso.settle(split)
        job.records[split.seq] = record
        job.buffered += len(record.payload)
        iso_store.save(self.store, job.id, split)
        if record.ok:
            job.counters.done += 1
        else:
            job.counters.failed += 1
            finished.failed.append((split.seq, max(leaf.attempts for leaf in split.leaves), message))
            text = f"task {split.seq} failed: {message}"
            self.store.record_event("job.task_failed", job=job.id, reason=text)
            self.on_event("task.failed", {"seq": split.seq, "reason": text})
        if iso.stopped and not was_stopped:
            self.store.record_event("job.isolation_stopped", job=job.id, reason=iso.stopped)
            self.on_event("job.isolation_stopped", {"reason": iso.stopped})

    def _requeue(self, job: JobRun, agent: Agent, port: Port, in_flight: int | None, reason: str) -> None:
        """A port's tasks come back: the one in flight has used an attempt, the rest ran never."""
        tasks, port.inflight = port.inflight, deque()
        finished = Finished()
        untouched: list[Task] = []
        for task in tasks:
            if task.seq not in job.outstanding:
                continue
            if task.seq == in_flight:
                self._attempt_failed(job, task, agent.node, reason, finished)
            else:
                untouched.append(task)
        job.retry.extendleft(reversed(untouched))
        self._store_results(job, agent.node, finished)

    def _port_died(self, agent: Agent, index: int, seq: Any, reason: str) -> None:
        port = agent.ports.get(index)
        job = self.job
        if port is None or job is None:
            return
        port.ready = False
        job.counters.port_deaths += 1
        in_flight = int(seq) if seq is not None else None
        if in_flight is None:
            text = f"port {index} on {agent.name} died with no task in flight: {reason}"
        else:
            label = job.isolation.label(in_flight) if job.isolation is not None else str(in_flight)
            text = f"port {index} on {agent.name} died during task {label}: {reason}"
        self.store.record_event("job.port_died", job=job.id, node=agent.node, reason=text)
        self.on_event("port.died", {"node": agent.node, "port": index, "seq": in_flight, "reason": reason})
        self._requeue(job, agent, port, in_flight, text)
        self._write_output(job)
        self._pump()

    def _lose(self, agent: Agent, why: str) -> None:
        """The agent is gone (or silent): everything it held runs elsewhere."""
        agent.lost = True
        self._lost_writers.add(agent.writer)
        for owner, future in self._execs.values():
            if owner is agent and not future.done():
                future.set_result({"exit": None, "reason": f"node {agent.name} lost: {why}"})
        job = self.job
        if job is None or not agent.loaded:
            return
        job.counters.nodes_lost += 1
        job.where[agent.node] = f"lost: {why}"
        text = f"node {agent.name} lost: {why}"
        self.store.record_event("job.node_lost", job=job.id, node=agent.node, reason=text)
        self.on_event("node.lost", {"node": agent.node, "reason": why})
        for port in agent.ports.values():
            head = port.inflight[0].seq if port.inflight else None
            self._requeue(job, agent, port, head, text)
        agent.ports = {}
        agent.loaded = False
        self._write_output(job)
        self._pump()

    # -- output ---------------------------------------------------------------------------------

    def _write_output(self, job: JobRun) -> None:
        records = job.records
        if job.next_write not in records:
            return
        batch: list[Record] = []
        seq = job.next_write
        while seq in records:
            record = records.pop(seq)
            job.buffered -= len(record.payload)
            batch.append(record)
            seq += 1
        job.sink.write(batch)
        job.next_write = seq
        job.uncommitted = True

    def _commit(self, job: JobRun) -> None:
        if not job.uncommitted:
            return
        job.checkpoint = job.sink.commit()
        job.uncommitted = False
        self.store.commit_output(job.id, job.next_write, job.progress())

    def _check_done(self) -> None:
        job = self.job
        if job is not None and self._done is not None and (job.failure or job.finished()):
            self._done.set()

    # -- running a job --------------------------------------------------------------------------

    async def run(self, job: JobRun, resume_tasks: Iterable[Task] = ()) -> Outcome:
        """Run ``job`` to its end (done or failed) or until no agent is left for the job's
        ``agent_wait_seconds`` (suspended); the store is left consistent either way."""
        self.job = job
        self._done = asyncio.Event()
        for task in resume_tasks:
            job.outstanding[task.seq] = task
            job.retry.append(task)
        if job.module.progress()[1] is not None and job.module.progress()[0] >= (job.module.progress()[1] or 0):
            job.exhausted = True
        self.store.set_job_state(job.id, JobState.RUNNING, reason="", progress=job.progress())
        for agent in list(self.agents.values()):
            if not agent.lost:
                self._offer(agent)
        self._write_output(job)
        self._check_done()
        ticker = asyncio.create_task(self._tick(job))
        try:
            await self._done.wait()
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
            self._commit(job)
            for agent in self.agents.values():
                if agent.loaded and not agent.lost:
                    agent.send(P.control(P.UNLOAD, work=job.id))
                agent.loaded = False
                agent.ports = {}
            self.job = None
            # back to the interval between jobs at once: an agent told a job's shorter one
            # would give us up before the keepalive's next beat
            self._beat(time.monotonic(), self._heartbeat())
        seconds = time.monotonic() - job.started
        if job.failure:
            state, reason = JobState.FAILED, job.failure
        elif job.finished():
            state, reason = JobState.DONE, ""
        else:
            state, reason = JobState.SUSPENDED, self._suspend_reason
        self.store.set_job_state(job.id, state, reason=reason, progress=job.progress())
        return Outcome(state, reason, job.counters.as_dict(), seconds)

    _suspend_reason = ""

    def suspend(self, reason: str) -> None:
        """Stop dispatching and end ``run`` with the job suspended (e.g. on Ctrl-C)."""
        self._suspend_reason = reason
        if self._done is not None:
            self._done.set()

    async def _tick(self, job: JobRun) -> None:
        heartbeat = job.spec.heartbeat_seconds
        last_beat = last_commit = time.monotonic()
        while True:
            await asyncio.sleep(min(COMMIT_INTERVAL, heartbeat) / 2)
            now = time.monotonic()
            if now - last_commit >= COMMIT_INTERVAL:
                last_commit = now
                self._commit(job)
            if now - last_beat >= heartbeat:
                last_beat = now
                self._beat(now, heartbeat)
            usable = [a for a in self.agents.values() if not a.lost and not a.excluded]
            if usable:
                self._no_agents_since = None
            elif self._no_agents_since is None:
                self._no_agents_since = now
            elif now - self._no_agents_since > job.spec.agent_wait_seconds:
                self.suspend(f"no agent connected for {job.spec.agent_wait_seconds:g} s; "
                             f"check the nodes (`orch nodes`), then `orch job resume {job.id}`")
            self.on_event("job.tick", self.snapshot())

    def snapshot(self) -> dict[str, Any]:
        """Where the job stands, for progress displays and `orch job status`."""
        job = self.job
        if job is None:
            return {}
        done, total = job.module.progress()
        return {
            "job": job.id,
            "written": job.next_write,
            "generated": job.generated,
            "exhausted": job.exhausted,
            "buffered": job.buffered,
            "paused": job.paused(),
            "input_done": done,
            "input_total": total,
            "counters": job.counters.as_dict(),
            "seconds": time.monotonic() - job.started,
            "nodes": {
                a.node: {"name": a.name, "ports": len(a.ports), "done": a.done,
                         "size": a.sizer.size if a.sizer else None,
                         "task_seconds": a.sizer.elapsed if a.sizer else None, "history": list(a.history),
                         "lost": a.lost, "excluded": a.excluded}
                for a in self.agents.values()
            },
        }
