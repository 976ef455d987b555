"""Jobs, the cloud API: submit -> JobRef, run/resume, status, result, delete, list.

``submit`` validates everything up front (the release, the function, the work module's
input, the sink) and records a queued job; ``run`` (also ``resume``) embeds the
scheduler: it makes sure the nodes' agents are up, serves them over mutual TLS on the
workspace's scheduler port, and drives the job to its end.  The CLI (`orch job ...`)
and, later, `orch serve` are thin layers over these functions.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from pydantic import ValidationError

from orchestrator.config.models import ReleaseManifest
from orchestrator.deploy.builds import ReleaseBuilds, ensure_built_here
from orchestrator.deploy.releases import find_release, manifest_of, parse_ref, read_release
from orchestrator.errors import ConflictError, InputError, NotFoundError, StateError
from orchestrator.scheduler import isolation
from orchestrator.scheduler.engine import Engine
from orchestrator.scheduler.module_loader import check_work_module, load_work_module
from orchestrator.scheduler.run import EventSink, JobRun, Outcome, ReleaseInfo, Task
from orchestrator.scheduler.sinks import Record, Sink, check_sink_url, open_sink
from orchestrator.scheduler.spec import JobSpec
from orchestrator.scheduler.stored import stored_work
from orchestrator.scheduler.workmodules import WorkModule
from orchestrator.state import SERVING_STATES, JobRecord, JobState, NodeRecord, NodeState, ReleaseRecord, Store
from orchestrator.workspace import Workspace

RESUMABLE = frozenset({JobState.QUEUED, JobState.SUSPENDED, JobState.FAILED, JobState.RUNNING})


@dataclass(frozen=True)
class JobRef:
    """A submitted job."""

    id: str
    release: str
    function: str


def parse_function_ref(ref: str) -> tuple[str, str]:
    """``RELEASE[@VERSION]:FUNCTION`` -> (release ref, function)."""
    release, sep, function = ref.rpartition(":")
    if not sep or not release or not function:
        raise InputError(f"work {ref!r}: expected RELEASE:FUNCTION", hint="e.g. orch job run primes:count_primes ...")
    return release, function


def submit(ws: Workspace, store: Store, work: str, *, input: str, sink: str | None = None,
           family: str | None = None, work_module: str | None = None,
           module_options: dict[str, Any] | None = None, **options: Any) -> JobRef:
    """Validate and record a queued job; nothing runs yet (see ``run``).

    The job's release is pinned here, to ``name@version``, for the job's whole life (a
    resume, a roll of its nodes to another version meanwhile: their agents keep the old
    release's folder beside the new one).  A bare ``name`` is the version the job's
    nodes run (``_running_release``), else the version uploaded last."""
    release_ref, function = parse_function_ref(work)
    record = _running_release(store, release_ref, family) or find_release(store, release_ref)
    manifest = manifest_of(record)
    declared = {f.name: f for f in manifest.functions}
    if function not in declared:
        raise InputError(f"release {record.ref} has no function {function!r} (it has: {', '.join(sorted(declared))})",
                         hint="see release.yaml `functions`")
    fn = declared[function]
    if family is not None and not any(n.family == family for n in store.list_nodes()):
        raise NotFoundError(f"--family {family}: no node of that family", hint=f"orch spawn {family}")
    job_id = "j" + uuid.uuid4().hex[:10]
    module = work_module or fn.work_module
    opts = dict(module_options or {})
    check_work_module(module, input, opts, release_source=_release_source(ws, record))
    sink = sink or f"file:{ws.relative(ws.runtime_dir / 'jobs' / f'{job_id}.out')}"
    check_sink_url(sink)
    if urlsplit(sink).password:
        raise InputError("--sink: the URL holds a password, which would be stored with the job",
                         hint="drop it from the URL and set PGPASSWORD or ~/.pgpass instead")
    options.setdefault("task_timeout", fn.timeout_seconds)
    try:
        spec = JobSpec(release=record.ref, function=function, symbol=fn.c_symbol, work_module=module, input=input,
                       module_options=opts, family=family, sink=sink, **options)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(p) for p in error["loc"])
        raise InputError(f"--{field.replace('_', '-')}: {error['msg']}", hint="see `orch job run --help`") from exc
    store.add_job(job_id, release=record.ref, function=function, spec=spec.model_dump(mode="json"))
    return JobRef(job_id, record.ref, function)


def _running_release(store: Store, ref: str, family: str | None) -> ReleaseRecord | None:
    """For a bare release ``name``: the version the ready nodes (of ``family``, when
    given) run, when they all run one version of it (a family rolled back to an older
    version runs that one); None otherwise (a version given, none or several running)."""
    name, version = parse_ref(ref)
    if version is not None:
        return None
    running = {n.release for n in store.list_nodes(family=family, states=[NodeState.READY])
               if n.release and parse_ref(n.release)[0] == name}
    if len(running) != 1:
        return None
    try:
        return find_release(store, running.pop())
    except NotFoundError:
        return None


def get(store: Store, job_id: str) -> JobRecord:
    return store.get_job(job_id)


def list_jobs(store: Store) -> list[JobRecord]:
    return store.list_jobs()


def requeue(store: Store, job_id: str, reason: str) -> JobRecord:
    """Queue a suspended, failed or orphaned (running, its scheduler gone) job again, for
    the runner of ``orch serve``; its progress is kept, so finished tasks are not run
    again.  A job already queued, or running in a live scheduler, is left as it is."""
    job = store.get_job(job_id)
    if job.state == JobState.DONE:
        raise ConflictError(f"job {job_id} is already done", hint=f"see `orch job result {job_id}`")
    if job.state == JobState.QUEUED or scheduler_alive(job, store.job_progress(job_id)) is not None:
        return job
    return store.set_job_state(job_id, JobState.QUEUED, reason=reason)


def scheduler_alive(job: JobRecord, progress: dict[str, Any]) -> int | None:
    """The pid of the scheduler running ``job`` on this machine, if it is alive."""
    owner = progress.get("scheduler") or {}
    pid = owner.get("pid")
    if job.state != JobState.RUNNING or not pid or owner.get("host") != socket.gethostname():
        return None
    if pid == os.getpid():
        return os.getpid()
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return int(pid)
    return int(pid)


def status(store: Store, job_id: str) -> dict[str, Any]:
    """queued | running (where) | done | suspended (why) | failed (why), with counters."""
    job = store.get_job(job_id)
    progress = store.job_progress(job_id)
    alive = scheduler_alive(job, progress)
    state = job.state.value
    reason = job.reason
    if job.state == JobState.RUNNING and alive is None:
        reason = f"its scheduler is gone; `orch job resume {job_id}` finishes it"
    return {
        "id": job.id, "release": job.release, "function": job.function, "state": state, "reason": reason,
        "spec": job.spec, "written": progress.get("next_write", 0), "generated": progress.get("generated", 0),
        "counters": progress.get("counters", {}), "nodes": progress.get("nodes", {}),
        "sizes": progress.get("sizes", {}),
        "scheduler_pid": alive, "failed_tasks": store.failed_tasks(job_id),
        "failed_pieces": isolation.failed_pieces(store, job_id),
        "created_at": job.created_at, "updated_at": job.updated_at,
    }


def result(ws: Workspace, store: Store, job_id: str) -> Iterator[Record]:
    """The job's output records, in seq order, from its sink."""
    job = store.get_job(job_id)
    sink = open_sink(job.spec["sink"], root=ws.root)
    try:
        yield from sink.read(job_id)
    finally:
        sink.close()


def delete(ws: Workspace, store: Store, job_id: str) -> None:
    """Remove every trace of the job: its output, tasks, events and record."""
    job = store.get_job(job_id)
    pid = scheduler_alive(job, store.job_progress(job_id))
    if pid is not None and pid != os.getpid():
        raise ConflictError(f"job {job_id} is running (scheduler pid {pid})", hint="stop it first (Ctrl-C)")
    sink = open_sink(job.spec["sink"], root=ws.root)
    try:
        sink.delete(job_id)
    finally:
        sink.close()
    with store.transaction():
        store.delete_job(job_id)
        store.kv_clear(scope=isolation.scope(job_id))


# -- running ---------------------------------------------------------------------------------------


@dataclass
class PreparedRun:
    """A job ready for an engine: its run state, the stored tasks to run again, its nodes."""

    state: JobRun
    tasks: list[Task]
    nodes: list[NodeRecord]


@contextlib.contextmanager
def prepared(ws: Workspace, store: Store, job_id: str) -> Iterator[PreparedRun]:
    """Check that ``job_id`` can run here and now, open its work module and sink at
    their stored positions, and restore its stored work; the module and sink are closed
    on exit.  Everything is opened in the calling thread (a SQLite sink is bound to it),
    so the engine that runs it must run there too."""
    job = store.get_job(job_id)
    if job.state == JobState.DONE:
        raise ConflictError(f"job {job_id} is already done", hint=f"see `orch job result {job_id}`")
    progress = store.job_progress(job_id)
    pid = scheduler_alive(job, progress)
    if pid is not None:
        raise ConflictError(f"job {job_id} is running in scheduler pid {pid}", hint="wait for it, or stop it first")
    spec = JobSpec.model_validate(job.spec)
    release = find_release(store, spec.release)
    manifest = manifest_of(release)
    nodes = _job_nodes(store, spec)
    module = load_work_module(spec.work_module, spec.input, spec.module_options, progress.get("position"),
                              release_source=_release_source(ws, release))
    try:
        sink = open_sink(spec.sink, root=ws.root)
    except BaseException:
        module.close()
        raise
    try:
        next_write = sink.open(job_id, progress.get("checkpoint"))
        run_state = JobRun(job_id, spec, module, sink, _release_info(ws, store, release, manifest),
                           next_write=next_write, generated=int(progress.get("generated", 0)),
                           checkpoint=progress.get("checkpoint"), counters=progress.get("counters"))
        yield PreparedRun(run_state, _restore(store, run_state), nodes)
    finally:
        sink.close()
        module.close()


def run(ws: Workspace, store: Store, job_id: str, *, on_event: EventSink | None = None) -> Outcome:
    """Run (or resume) ``job_id`` on the workspace's ready nodes until it ends, with an
    engine of its own (``orch job run``; ``orch serve`` keeps one engine, see service.py)."""
    from orchestrator.deploy import agent_install, pki

    with prepared(ws, store, job_id) as run_state:
        nodes = run_state.nodes
        endpoints = {agent_install.scheduler_endpoint(ws, node) for node in nodes}
        hosts = sorted({host for host, _ in endpoints})
        port = next(iter(endpoints))[1]
        allowed = {node.id: node.family for node in nodes}

        def admit(node_id: str) -> str | None:
            return allowed.get(node_id)

        engine = Engine(store, ssl_context=pki.server_ssl_context(ws), admit=admit, peer_id=pki.peer_node_id,
                        on_event=on_event)
        # Listen first: `ensure` pokes an idle agent, which then dials at once.
        return asyncio.run(_serve(engine, hosts, port, run_state.state, run_state.tasks,
                                  lambda: agent_install.ensure_agents(ws, store, nodes, None)))


async def _serve(engine: Engine, hosts: list[str], port: int, job: JobRun, tasks: list[Task],
                 ensure_agents: Callable[[], object]) -> Outcome:
    try:
        await engine.start(hosts, port)
    except OSError as exc:
        raise StateError(f"the scheduler cannot listen on {', '.join(hosts)} port {port}: {exc.strerror}",
                         hint="another `orch job run` may be serving this workspace; "
                              "or set scheduler_port in orch.yaml") from exc
    loop = asyncio.get_running_loop()
    try:
        await loop.run_in_executor(None, ensure_agents)
    except BaseException:
        await engine.close()
        raise
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGINT, engine.suspend, f"interrupted; `orch job resume {job.id}` goes on")
        loop.add_signal_handler(signal.SIGTERM, engine.suspend, f"stopped; `orch job resume {job.id}` goes on")
    try:
        return await engine.run(job, tasks)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signum)
        await engine.close()


def _job_nodes(store: Store, spec: JobSpec) -> list[NodeRecord]:
    """The nodes whose agents may join the job: ready ones, and those being rolled in
    place (their agents go on serving; see ``NodeRecord.serving``)."""
    nodes = [n for n in store.list_nodes(family=spec.family, states=SERVING_STATES) if n.serving]
    if not nodes:
        where = f"of family {spec.family} " if spec.family else ""
        raise StateError(f"no ready nodes {where}to run the job on",
                         hint=f"orch spawn {spec.family or 'FAMILY'}, then run the job again")
    return nodes


def _restore(store: Store, job: JobRun) -> list[Task]:
    """The work the store holds past the sink's end: done tasks go to the output buffer,
    given-up ones are written as failed, pending ones run again (keeping their attempts);
    a task being isolated (cut in pieces) goes on with the pieces still to run."""
    work = stored_work(store, job.id, from_seq=job.next_write)
    piece_results = {}
    for seq, payload in work.results.items():
        if seq >= isolation.PIECE_BASE:
            piece_results[seq] = payload
            continue
        job.records[seq] = Record(seq, True, payload)
        job.buffered += len(payload)
    for seq, (_attempts, error) in work.failed.items():
        job.records.setdefault(seq, Record(seq, False, error.encode()))
    pending = []
    split: set[int] = set()
    origins: dict[int, int] = {}
    iso = job.isolation
    if iso is not None:
        for seq, stored in isolation.load(store, job.id).items():
            if seq < job.next_write or seq in job.records or seq not in work.tasks:
                continue  # written, given up whole, or settled and stored as failed
            restored, pieces = iso.restore(stored, work.tasks[seq][1], piece_results)
            split.add(seq)
            for piece in pieces:
                pending.append(Task.make(piece.wire, piece.size, piece.data, piece.attempts))
            if restored.settled():  # every piece was done before the stop: the task's record
                record, message = iso.settle(restored)
                job.records[seq] = record
                job.buffered += len(record.payload)
                if not record.ok:
                    store.add_results(job.id, None, seq, b"", [(seq, 0, message)])
        origins = isolation.origins(job.module, work.tasks, job.generated)
    for seq in work.pending():
        if seq in split:
            continue
        size, data = work.tasks[seq]
        task = Task.make(seq, size, data, work.attempts.get(seq, (0, ""))[0])
        task.origin = origins.get(seq)
        pending.append(task)
    return pending


def _release_info(ws: Workspace, store: Store, record: ReleaseRecord, manifest: ReleaseManifest) -> ReleaseInfo:
    """The job's release as agents get it: its build for each platform (this machine's
    made now when it can be), or its source when it is built on each node."""
    builds = None
    if manifest.build_on == "builder":
        ensure_built_here(ws, store, record)
        found = ReleaseBuilds(ws, store, record)
        builds = {p: (a.sha256, _loader(found, p)) for p, a in found.by_platform.items()}
    return ReleaseInfo(folder=f"{record.name}-{record.version}", sha256=record.sha256, library=manifest.library,
                       build=list(manifest.build), tarball=lambda: read_release(ws, record), builds=builds,
                       ref=record.ref)


def _loader(builds: ReleaseBuilds, platform: str) -> Callable[[], bytes]:
    return lambda: builds.for_platform(platform, node="").load()


def _release_source(ws: Workspace, record: ReleaseRecord) -> Any:
    """``path -> bytes`` of a file in the release (for work modules a release ships)."""
    def source(path: str) -> bytes:
        import io
        import tarfile

        with tarfile.open(fileobj=io.BytesIO(read_release(ws, record)), mode="r:gz") as tar:
            for member in tar.getmembers():
                inner = member.name.split("/", 1)[1] if "/" in member.name else member.name
                if inner == path and member.isfile():
                    handle = tar.extractfile(member)
                    if handle is not None:
                        return handle.read()
        raise NotFoundError(f"release {record.ref} has no file {path!r}", hint="check the work module's path")
    return source


__all__ = ["JobRef", "Outcome", "Sink", "WorkModule", "delete", "get", "list_jobs", "result", "run", "status",
           "submit"]
