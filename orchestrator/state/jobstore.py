"""Jobs and tasks in the store (a part of ``Store``, kept in its own file).

A job's tasks are written when the work module makes them, before they are sent
anywhere (one row per dispatch round: the task frames); results are written when they
first arrive (one row per RESULTS message: the result frames the scheduler accepted,
first completion wins); once the sink has committed a prefix of the output, the batches
wholly inside it are deleted and the job's ``progress`` records the sink's checkpoint,
in the same transaction.  So after a crash the store holds at least every task not yet
in the sink, each either pending (to run again) or done (its result waiting to be
written), and where the work module and the sink stood.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from orchestrator.errors import NotFoundError, StateError
from orchestrator.state.records import JobRecord, JobState, row_to_job

JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.SUSPENDED, JobState.FAILED}),
    JobState.RUNNING: frozenset({JobState.DONE, JobState.SUSPENDED, JobState.FAILED, JobState.QUEUED}),
    JobState.SUSPENDED: frozenset({JobState.RUNNING, JobState.FAILED, JobState.QUEUED}),
    JobState.DONE: frozenset(),
    JobState.FAILED: frozenset({JobState.RUNNING, JobState.QUEUED}),
}
"""Legal job state changes; ``resume`` takes a suspended (or failed) job back to running,
``requeue`` back to queued for a server's runner (a running one only once its scheduler
is gone)."""


class JobStore:
    """The job and task methods of ``Store``."""

    if TYPE_CHECKING:  # provided by Store
        def transaction(self) -> AbstractContextManager[sqlite3.Connection]: ...
        def _query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]: ...
        def record_event(self, kind: str, *, reason: str = "", node: str | None = None,
                         family: str | None = None, job: str | None = None, provider: str | None = None,
                         data: dict[str, Any] | None = None) -> int: ...

    def add_job(self, job_id: str, *, release: str, function: str, spec: dict[str, Any]) -> JobRecord:
        now = time.time()
        with self.transaction() as conn:
            try:
                conn.execute(
                    "INSERT INTO jobs (id, release, function, state, spec, created_at, updated_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (job_id, release, function, JobState.QUEUED.value, json.dumps(spec), now, now),
                )
            except sqlite3.IntegrityError as exc:
                raise StateError(f"job {job_id!r} already exists") from exc
            self.record_event("job.queued", job=job_id, data={"release": release, "function": function})
        return self.get_job(job_id)

    def get_job(self, job_id: str) -> JobRecord:
        rows = self._query("SELECT * FROM jobs WHERE id=?", (job_id,))
        if not rows:
            raise NotFoundError(f"no job {job_id!r}", hint="see `orch job list`")
        return row_to_job(rows[0])

    def list_jobs(self, *, states: Iterable[JobState] | None = None) -> list[JobRecord]:
        if states is None:
            rows = self._query("SELECT * FROM jobs ORDER BY created_at, id")
        else:
            wanted = [s.value for s in states]
            rows = self._query(
                f"SELECT * FROM jobs WHERE state IN ({', '.join('?' * len(wanted))}) ORDER BY created_at, id", wanted
            )
        return [row_to_job(r) for r in rows]

    def set_job_state(self, job_id: str, state: JobState, *, reason: str = "",
                      progress: dict[str, Any] | None = None) -> JobRecord:
        """Move a job along JOB_TRANSITIONS (staying put is allowed), with its event."""
        with self.transaction() as conn:
            current = self.get_job(job_id)
            if state != current.state and state not in JOB_TRANSITIONS[current.state]:
                raise StateError(f"job {job_id} is {current.state}; it cannot become {state}",
                                 hint="see `orch job status`")
            sets, values = "state=?, reason=?, updated_at=?", [state.value, reason, time.time()]
            if progress is not None:
                sets += ", progress=?"
                values.append(json.dumps(progress))
            conn.execute(f"UPDATE jobs SET {sets} WHERE id=?", (*values, job_id))
            if state != current.state:
                self.record_event(f"job.{state.value}", job=job_id, reason=reason)
        return self.get_job(job_id)

    def job_progress(self, job_id: str) -> dict[str, Any]:
        rows = self._query("SELECT progress FROM jobs WHERE id=?", (job_id,))
        if not rows:
            raise NotFoundError(f"no job {job_id!r}", hint="see `orch job list`")
        value: dict[str, Any] = json.loads(rows[0][0] or "{}")
        return value

    def delete_job(self, job_id: str) -> None:
        """Remove the job, its tasks and its events (the sink's output is the caller's)."""
        with self.transaction() as conn:
            if conn.execute("DELETE FROM jobs WHERE id=?", (job_id,)).rowcount == 0:
                raise NotFoundError(f"no job {job_id!r}", hint="see `orch job list`")
            for table in ("task_batches", "result_batches", "task_attempts"):
                conn.execute(f"DELETE FROM {table} WHERE job=?", (job_id,))
            conn.execute("DELETE FROM events WHERE job=?", (job_id,))

    # -- tasks: on the scheduler's hot path, so written in batches -----------------------------

    def add_tasks(self, job_id: str, first_seq: int, last_seq: int, frames: bytes,
                  progress: dict[str, Any]) -> None:
        """New tasks first_seq..last_seq (their task frames), with the job's progress
        (the work module's position) after making them."""
        with self.transaction() as conn:
            conn.execute("INSERT INTO task_batches (job, first_seq, last_seq, frames) VALUES (?, ?, ?, ?)",
                         (job_id, first_seq, last_seq, frames))
            conn.execute("UPDATE jobs SET progress=?, updated_at=? WHERE id=?",
                         (json.dumps(progress), time.time(), job_id))

    def add_results(self, job_id: str, node: str | None, max_seq: int, frames: bytes,
                    failed: Sequence[tuple[int, int, str]] = ()) -> None:
        """Results recorded (first completion wins: the caller passes each seq once), as
        result frames; ``failed``: (seq, attempts, reason) of tasks given up."""
        with self.transaction() as conn:
            if frames:
                conn.execute(
                    "INSERT INTO result_batches (job, id, max_seq, node, frames) VALUES (?, "
                    "(SELECT coalesce(max(id), 0) + 1 FROM result_batches WHERE job=?), ?, ?, ?)",
                    (job_id, job_id, max_seq, node, frames))
            if failed:
                conn.executemany(
                    "INSERT INTO task_attempts (job, seq, attempts, error, failed) VALUES (?, ?, ?, ?, 1) "
                    "ON CONFLICT (job, seq) DO UPDATE SET attempts=excluded.attempts, error=excluded.error, failed=1",
                    [(job_id, seq, attempts, error) for seq, attempts, error in failed])

    def count_attempt(self, job_id: str, seq: int, attempts: int, error: str) -> None:
        """A try of a task ended without a result; it will run again."""
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO task_attempts (job, seq, attempts, error) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (job, seq) DO UPDATE SET attempts=excluded.attempts, error=excluded.error",
                (job_id, seq, attempts, error))

    def commit_output(self, job_id: str, next_seq: int, progress: dict[str, Any]) -> None:
        """The sink committed every record before ``next_seq``: drop the batches wholly
        before it and record where the sink stands (given-up tasks keep their row)."""
        with self.transaction() as conn:
            conn.execute("DELETE FROM task_batches WHERE job=? AND last_seq<?", (job_id, next_seq))
            conn.execute("DELETE FROM result_batches WHERE job=? AND max_seq<?", (job_id, next_seq))
            conn.execute("DELETE FROM task_attempts WHERE job=? AND seq<? AND failed=0", (job_id, next_seq))
            conn.execute("UPDATE jobs SET progress=?, updated_at=? WHERE id=?",
                         (json.dumps(progress), time.time(), job_id))

    def stored_batches(self, job_id: str, *, from_seq: int = 0) -> StoredBatches:
        """What a resume needs from ``from_seq`` on, as stored: the task and result
        batches that reach that far (blobs the store never reads), the attempts of the
        tasks that failed a try, and the ones given up."""
        stored = StoredBatches()
        for row in self._query("SELECT frames FROM task_batches WHERE job=? AND last_seq>=? ORDER BY first_seq",
                               (job_id, from_seq)):
            stored.task_batches.append(bytes(row[0]))
        for row in self._query("SELECT frames FROM result_batches WHERE job=? AND max_seq>=? ORDER BY id",
                               (job_id, from_seq)):
            stored.result_batches.append(bytes(row[0]))
        for row in self._query("SELECT seq, attempts, error, failed FROM task_attempts WHERE job=? AND seq>=?",
                               (job_id, from_seq)):
            (stored.failed if row["failed"] else stored.attempts)[row["seq"]] = (row["attempts"], row["error"])
        return stored

    def failed_tasks(self, job_id: str) -> list[tuple[int, str]]:
        """(seq, reason) of every task given up, in seq order."""
        rows = self._query("SELECT seq, error FROM task_attempts WHERE job=? AND failed=1 ORDER BY seq", (job_id,))
        return [(r[0], r[1]) for r in rows]


@dataclass
class StoredBatches:
    """A job's stored work from a seq on, as the scheduler wrote it: blobs of task frames
    and of result frames, in the order they were stored, and the attempts by seq."""

    task_batches: list[bytes] = field(default_factory=list)
    result_batches: list[bytes] = field(default_factory=list)
    attempts: dict[int, tuple[int, str]] = field(default_factory=dict)
    failed: dict[int, tuple[int, str]] = field(default_factory=dict)
