"""Jobs and tasks in the store (a part of ``Store``, kept in its own file).

A job's tasks are written when the work module makes them, before they are sent
anywhere; a result is written when it first arrives (first completion wins: a task that
is already done keeps its first result); once the sink has committed a prefix of the
output, the done tasks of that prefix are deleted and the job's ``progress`` records
the sink's checkpoint, in the same transaction.  So after a crash the store holds
exactly: the tasks not yet in the sink, each either pending (to run again) or done (its
result waiting to be written), and where the work module and the sink stood.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from orchestrator.errors import NotFoundError, StateError
from orchestrator.state.records import JobRecord, JobState, TaskRecord, TaskState, row_to_job, row_to_task

JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.SUSPENDED, JobState.FAILED}),
    JobState.RUNNING: frozenset({JobState.DONE, JobState.SUSPENDED, JobState.FAILED}),
    JobState.SUSPENDED: frozenset({JobState.RUNNING, JobState.FAILED}),
    JobState.DONE: frozenset(),
    JobState.FAILED: frozenset({JobState.RUNNING}),
}
"""Legal job state changes; ``resume`` takes a suspended (or failed) job back to running."""


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
            conn.execute("DELETE FROM tasks WHERE job=?", (job_id,))
            conn.execute("DELETE FROM events WHERE job=?", (job_id,))

    # -- tasks: these run on the scheduler's hot path, in batches -------------------------------

    def add_tasks(self, job_id: str, tasks: Sequence[tuple[int, float, bytes]],
                  progress: dict[str, Any]) -> None:
        """New tasks (seq, size, data), pending, with the job's progress after making them."""
        with self.transaction() as conn:
            conn.executemany(
                "INSERT INTO tasks (job, seq, state, size, data) VALUES (?, ?, 'pending', ?, ?)",
                [(job_id, seq, size, data) for seq, size, data in tasks],
            )
            conn.execute("UPDATE jobs SET progress=?, updated_at=? WHERE id=?",
                         (json.dumps(progress), time.time(), job_id))

    def finish_tasks(self, job_id: str,
                     results: Sequence[tuple[int, str, int, str | None, bytes | None, str]]) -> None:
        """Finished tasks: (seq, state 'done' or 'failed', attempts, node, result, error)."""
        with self.transaction() as conn:
            conn.executemany(
                "UPDATE tasks SET state=?, attempts=?, node=?, result=?, error=? WHERE job=? AND seq=?",
                [(state, attempts, node, result, error, job_id, seq)
                 for seq, state, attempts, node, result, error in results],
            )

    def count_attempt(self, job_id: str, seq: int, attempts: int, error: str) -> None:
        """A try of a task ended without a result; it stays pending."""
        with self.transaction() as conn:
            conn.execute("UPDATE tasks SET attempts=?, error=? WHERE job=? AND seq=?", (attempts, error, job_id, seq))

    def commit_output(self, job_id: str, next_seq: int, progress: dict[str, Any]) -> None:
        """The sink committed every record before ``next_seq``: drop those done tasks
        (failed ones stay, for their reasons) and record where the sink stands."""
        with self.transaction() as conn:
            conn.execute("DELETE FROM tasks WHERE job=? AND seq<? AND state='done'", (job_id, next_seq))
            conn.execute("UPDATE jobs SET progress=?, updated_at=? WHERE id=?",
                         (json.dumps(progress), time.time(), job_id))

    def unfinished_tasks(self, job_id: str, *, from_seq: int = 0) -> Iterator[TaskRecord]:
        """The job's tasks at or after ``from_seq``, in seq order (for resume)."""
        for row in self._query("SELECT * FROM tasks WHERE job=? AND seq>=? ORDER BY seq", (job_id, from_seq)):
            yield row_to_task(row)

    def failed_tasks(self, job_id: str) -> list[TaskRecord]:
        rows = self._query("SELECT * FROM tasks WHERE job=? AND state=? ORDER BY seq", (job_id, TaskState.FAILED.value))
        return [row_to_task(r) for r in rows]

    def task_counts(self, job_id: str) -> dict[str, int]:
        rows = self._query("SELECT state, count(*) FROM tasks WHERE job=? GROUP BY state", (job_id,))
        return {r[0]: int(r[1]) for r in rows}
