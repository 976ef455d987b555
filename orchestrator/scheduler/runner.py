"""``JobRunner``: runs queued jobs inside a long-running process (``orch serve``).

One background thread takes the oldest queued job and runs it to its end with
``jobs.run``, one job at a time (the workspace has one scheduler port), then the
next.  The thread opens its own store (SQLite connections belong to one thread).

A job that cannot start (no ready nodes, its release gone, the scheduler port taken)
is marked failed with that reason rather than retried for ever; ``orch job resume``
or a new submit runs it once the cause is fixed.  A job another scheduler has taken
(``orch job run`` in another process submits, then runs at once) is left alone.

**Stopping.** ``stop()`` lets no new job start and waits (up to ``timeout``) for the
current job to end.  It does not suspend the job itself: ``orch serve`` runs jobs on a
``SchedulerService`` (``run_job``), and suspends the running job through it before it
stops the runner; with plain ``jobs.run`` the engine's suspend is reachable only through
the SIGINT/SIGTERM handlers of the main thread.  When the wait runs out, ``stop`` returns False and
the thread (a daemon) dies with the process: the store then holds the job as a
killed scheduler leaves it (``running``, its scheduler gone), and
``orch job resume JOB`` finishes it without repeating finished tasks.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from orchestrator.errors import ConflictError, OrchError
from orchestrator.scheduler import jobs
from orchestrator.state import JobState, Store
from orchestrator.workspace import Workspace

log = logging.getLogger("orch.runner")


class JobRunner:
    """Runs the workspace's queued jobs, oldest first, one at a time, in a thread."""

    def __init__(self, ws: Workspace, *, poll_seconds: float = 1.0,
                 run_job: Callable[[Workspace, Store, str], object] | None = None) -> None:
        self.ws = ws
        self.poll_seconds = poll_seconds
        self._run_job = run_job or (lambda w, s, j: jobs.run(w, s, j))
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._current: str | None = None

    @property
    def current(self) -> str | None:
        """The id of the job running now, if any."""
        with self._lock:
            return self._current

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="orch-job-runner", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Look for queued jobs now rather than at the next poll (after a submit)."""
        self._wake.set()

    def stop(self, timeout: float | None = None) -> bool:
        """Start no new job and wait up to ``timeout`` s for the current one to end by
        itself (see the module docstring); True when the thread has ended."""
        self._stopping.set()
        self._wake.set()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- the thread ---------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            with Store.open(self.ws.state_db) as store:
                while not self._stopping.is_set():
                    job_id = self._next(store)
                    if job_id is None:
                        self._wake.wait(self.poll_seconds)
                        self._wake.clear()
                        continue
                    self._run_one(store, job_id)
        except Exception:  # the runner must not vanish silently
            log.exception("the job runner stopped on an error")

    def _next(self, store: Store) -> str | None:
        queued = store.list_jobs(states=[JobState.QUEUED])  # oldest first
        return queued[0].id if queued else None

    def _run_one(self, store: Store, job_id: str) -> None:
        with self._lock:
            self._current = job_id
        try:
            log.info("job %s: starting", job_id)
            self._run_job(self.ws, store, job_id)
            log.info("job %s: ended as %s", job_id, store.get_job(job_id).state.value)
        except ConflictError as exc:  # another scheduler (`orch job run`) has it: leave it be
            log.info("job %s: %s", job_id, exc)
        except OrchError as exc:
            self._give_up(store, job_id, str(exc))
        except Exception as exc:
            log.exception("job %s: internal error", job_id)
            self._give_up(store, job_id, f"internal error in the job runner: {type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                self._current = None

    def _give_up(self, store: Store, job_id: str, reason: str) -> None:
        log.warning("job %s: %s", job_id, reason)
        try:
            job = store.get_job(job_id)
            if job.state in (JobState.QUEUED, JobState.RUNNING):
                store.set_job_state(job_id, JobState.FAILED, reason=reason)
        except OrchError as exc:  # deleted meanwhile, or the store refuses: nothing more to do
            log.warning("job %s: could not record the failure: %s", job_id, exc)
