"""Jobs, through ``scheduler/jobs.py`` as ``orch job ...`` does: list and submit
(``/jobs``), status, delete (``/jobs/{job_id}``), output (``/result``) and ``/resume``.
The app's ``JobRunner`` runs what is queued; a submit or resume wakes it."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response

from orchestrator.errors import ConflictError
from orchestrator.server.bodies import JobRequest
from orchestrator.server.deps import SECURED, RunnerDep, StoreDep, WorkspaceDep

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


@router.get("/jobs/{job_id}/result", response_class=Response)
def job_result(job_id: str, ws: WorkspaceDep, db: StoreDep) -> Response:
    """The job's output so far, in task order, failed tasks left out (as `orch job result`)."""
    from orchestrator.scheduler import jobs

    body = b"".join(r.payload for r in jobs.result(ws, db, job_id) if r.ok)
    return Response(body, media_type="application/octet-stream")


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
