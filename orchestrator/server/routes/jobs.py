"""Jobs, through ``scheduler/jobs.py`` as ``orch job ...`` does: list and submit
(``/jobs``), status, delete (``/jobs/{job_id}``), output (``/result``) and ``/resume``.
The app's ``JobRunner`` runs what is queued; a submit or resume wakes it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from orchestrator.errors import ConflictError
from orchestrator.server.bodies import JobRequest
from orchestrator.server.deps import SECURED, RunnerDep, StoreDep, WorkspaceDep

if TYPE_CHECKING:
    from orchestrator.scheduler.sinks import Record

router = APIRouter(tags=["jobs"], dependencies=SECURED)


@router.get("/jobs")
def list_jobs(db: StoreDep) -> list[dict[str, Any]]:
    """Jobs, oldest first, as `orch job list --json`."""
    from orchestrator.scheduler import jobs

    return [{"job": r.id, "work": f"{r.release}:{r.function}", "state": r.state.value, "reason": r.reason,
             "written": db.job_progress(r.id).get("next_write", 0), "created_at": r.created_at}
            for r in jobs.list_jobs(db)]


@router.post("/jobs", status_code=201)
def submit(request: JobRequest, ws: WorkspaceDep, db: StoreDep, runner: RunnerDep) -> dict[str, Any]:
    """Submit a job; the server's job runner runs queued jobs oldest first, one at a time."""
    from orchestrator.scheduler import jobs

    options = request.model_dump(exclude_none=True, exclude={"work", "input", "family", "sink", "work_module",
                                                             "module_options"})
    ref = jobs.submit(ws, db, request.work, input=request.input, sink=request.sink, family=request.family,
                      work_module=request.work_module, module_options=dict(request.module_options), **options)
    runner.wake()
    return {"job": ref.id, "release": ref.release, "function": ref.function, "state": "queued"}


@router.get("/jobs/{job_id}")
def job_status(job_id: str, db: StoreDep) -> dict[str, Any]:
    """Where a job stands (as `orch job status --json`)."""
    from orchestrator.scheduler import jobs

    return jobs.status(db, job_id)


@router.get("/jobs/{job_id}/result", response_class=StreamingResponse,
            responses={200: {"content": {"application/octet-stream": {}}}})
def job_result(job_id: str, ws: WorkspaceDep, db: StoreDep) -> StreamingResponse:
    """The job's output so far, in task order, failed tasks left out (as `orch job result`),
    streamed from its sink in pieces of about RESULT_PIECE bytes: never whole in memory."""
    from orchestrator.scheduler import jobs

    records = jobs.result(ws, db, job_id)
    try:  # the job and its sink are looked up now, so a missing one is still a 404
        first = _next_piece(records)
    except BaseException:
        _close(records)
        raise
    return StreamingResponse(_streamed(first, records), media_type="application/octet-stream")


RESULT_PIECE = 256 * 1024
"""About how much of a result each piece of the streamed answer holds (a record larger
than this, e.g. a file sink's 1 MiB reads, is one piece)."""


def _next_piece(records: Iterator[Record]) -> bytes | None:
    """The next ok payloads, joined up to about RESULT_PIECE bytes; None at the end."""
    parts: list[bytes] = []
    size = 0
    for record in records:
        if record.ok and record.payload:
            parts.append(record.payload)
            size += len(record.payload)
            if size >= RESULT_PIECE:
                break
    return b"".join(parts) if parts else None


async def _streamed(first: bytes | None, records: Iterator[Record]) -> AsyncIterator[bytes]:
    """The pieces, each read in the thread pool (a sink's reads block)."""
    try:
        piece = first
        while piece is not None:
            yield piece
            piece = await run_in_threadpool(_next_piece, records)
    finally:
        _close(records)  # the sink is closed at the end, and when the client leaves


def _close(records: Iterator[Record]) -> None:
    """Close the generator of ``jobs.result``, which closes the sink."""
    close = getattr(records, "close", None)
    if close is not None:
        close()


@router.post("/jobs/{job_id}/resume")
def job_resume(job_id: str, db: StoreDep, runner: RunnerDep) -> dict[str, Any]:
    """Queue a suspended, failed or orphaned job again (finished tasks are kept; as
    `orch job resume` while this server runs); one queued or running is left be."""
    from orchestrator.scheduler import jobs

    job = jobs.requeue(db, job_id, reason="queued again by `orch job resume`")
    runner.wake()
    return {"job": job.id, "state": job.state.value}


@router.delete("/jobs/{job_id}")
def job_delete(job_id: str, ws: WorkspaceDep, db: StoreDep, runner: RunnerDep) -> dict[str, Any]:
    """Delete a job and every trace of it (refused while it runs)."""
    from orchestrator.scheduler import jobs

    if runner.current == job_id:
        raise ConflictError(f"job {job_id} is running in this server", hint="wait for it to end")
    jobs.delete(ws, db, job_id)
    return {"job": job_id, "deleted": True}
