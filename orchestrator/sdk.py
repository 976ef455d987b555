"""The Python cloud API: drive a workspace's nodes and jobs from a Python program.

``Cloud`` is a thin layer over the engine (``fleet``, ``scheduler.jobs``) and the state
store, the same calls the ``orch`` command line makes::

    from orchestrator import Cloud

    with Cloud("~/my-workspace") as cloud:          # None: found like the CLI finds it
        cloud.add_node("workers", count=2)           # grow the family by two nodes
        job = cloud.add_job("primes:count_primes", input="0:200000")
        outcome = cloud.run(job)                     # runs here, with the embedded scheduler
        print(outcome.state, cloud.status(job)["state"])
        total = sum(int(n) for n in cloud.result(job).split())

        def bump(tx: KVTransaction) -> int:
            seen = tx.fetch(job, "seen", 0)
            tx.store(job, "seen", seen + 1)
            return seen + 1

        cloud.mutate_store(bump)                     # atomic; conflicts re-run ``bump``
        cloud.delete_job(job)                        # output, tasks, events, kv values
        for node in cloud.nodes():
            cloud.remove_node(node.id)

**Jobs.** ``add_job(work, input=..., **options)`` validates and queues a job (the
options are ``scheduler.jobs.submit``'s: ``sink``, ``family``, ``task_size``,
``max_attempts``, ...) and returns a ``JobRef``; every method that takes a job takes a
``JobRef`` or a job id string.  ``run`` drives the job to its end in this process and
returns the engine's ``Outcome``; ``status`` is ``orch job status`` as a dict;
``result`` the ok outputs concatenated in task order (``orch job result``); ``jobs``
the job records; ``delete_job`` removes every trace, the job's kv values included.

**Nodes.** ``add_node(family, count)`` spawns ``count`` more nodes of the family
(``fleet.spawn`` with the family's live count + ``count``) and returns the new ready
nodes, raising ``FleetIncomplete`` when some could not be brought up; ``remove_node``
stops one node (an id or a resource path); ``nodes`` lists the live nodes; ``info``
is what ``orch info`` shows: nodes by state, family and provider, jobs by state, totals.

**The key-value store.** ``mutate_store(fn)`` runs ``fn(tx)`` as one transaction over
the store's kv table and returns what ``fn`` returned.  ``tx.fetch(job, key, default)``
and ``tx.store(job, key, value)`` read and write values scoped to a job (the scope
``job:ID``; a job of None is the global scope ``global``); values are anything
``json.dumps`` accepts (no NaN), checked when stored.  ``fetch`` sees the transaction's
own writes; a fetched value is a fresh copy.  The transaction is optimistic: reads
remember each key's version, and at the end the store (``Store.kv_apply``) checks in
one ``BEGIN IMMEDIATE`` write transaction that none of them changed and applies every
write, or nothing.  On a conflict with another thread or process, ``fn`` is run again
from the start (up to ``max_attempts`` times, then ``ConflictError``), so ``fn`` must
have no side effects other than through ``tx``.

- ``fn`` returning normally commits; so does ``tx.commit()``, which applies at once (a
  conflict there re-runs ``fn``); afterwards ``tx`` refuses further use.
- ``tx.fail(reason)`` discards every write of the transaction and raises
  ``MutationFailed(reason)``, out of ``fn`` and then out of ``mutate_store`` (even when
  ``fn`` catches it).  Failing is final: it is never retried.
- An exception raised by ``fn`` discards the writes and propagates unchanged.

A ``Cloud`` may be shared by threads: each thread gets its own ``Store`` (SQLite
connection); ``close`` (or leaving the ``with`` block) closes them all.
"""

from __future__ import annotations

import json
import math
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from orchestrator.errors import ConflictError, FleetIncomplete, InputError, OrchError, StateError
from orchestrator.state import JobRecord, NodeRecord, NodeState, Store
from orchestrator.workspace import Workspace

if TYPE_CHECKING:
    from orchestrator.scheduler.jobs import JobRef
    from orchestrator.scheduler.run import EventSink, Outcome

T = TypeVar("T")

GLOBAL_SCOPE = "global"
MAX_ATTEMPTS = 10_000


class MutationFailed(OrchError):
    """(cloud) ``tx.fail(reason)`` ended a ``mutate_store`` transaction; nothing was written."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"the store mutation failed: {reason}")


def job_id_of(job_ref: object) -> str:
    """The job id of a ``JobRef`` or a job id string."""
    if isinstance(job_ref, str) and job_ref:
        return job_ref
    job_id = getattr(job_ref, "id", None)
    if isinstance(job_id, str) and job_id:
        return job_id
    raise InputError(f"{job_ref!r} is not a job", hint="pass a JobRef from add_job, or a job id string")


def job_scope(job_ref: object | None) -> str:
    """The kv scope of a job's values (``job:ID``), or the global scope for None."""
    return GLOBAL_SCOPE if job_ref is None else f"job:{job_id_of(job_ref)}"


class _Conflict(BaseException):
    """Control flow: a commit found a changed key, so ``fn`` runs again.  A BaseException
    so that ``except Exception`` in ``fn`` does not swallow it."""


class KVTransaction:
    """What ``Cloud.mutate_store`` hands its function: job-scoped fetch and store."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._reads: dict[tuple[str, str], tuple[str, int] | None] = {}
        self._writes: dict[tuple[str, str], str] = {}
        self._jobs_seen: set[str] = set()
        self.state = "open"
        """open | committed | failed | conflict"""
        self.reason = ""

    def fetch(self, job_ref: JobRef | str | None, key: str, default: Any = None) -> Any:
        """The value of ``key`` in the job's scope (this transaction's own writes first)."""
        slot = self._slot(job_ref, key)
        text = self._writes.get(slot)
        if text is None:
            if slot not in self._reads:
                self._reads[slot] = self._store.kv_read(slot[1], scope=slot[0])
            seen = self._reads[slot]
            if seen is None:
                return default
            text = seen[0]
        return json.loads(text)

    def store(self, job_ref: JobRef | str | None, key: str, value: Any) -> None:
        """Set ``key`` in the job's scope to ``value`` (JSON-able), when the transaction commits."""
        slot = self._slot(job_ref, key)
        try:
            text = json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InputError(f"store {key!r}: the value is not JSON-able ({exc})",
                             hint="use dicts, lists, str, int, float (not NaN or infinity), bool, None") from exc
        self._writes[slot] = text

    def commit(self) -> None:
        """Apply the writes now; the transaction ends (a conflict re-runs the function)."""
        self._check_open()
        if not self._writes and len(self._reads) <= 1:
            self.state = "committed"  # a single read needs no check and no write lock
            return
        if not self._store.kv_apply(self._reads, self._writes):
            self.state = "conflict"
            raise _Conflict
        self.state = "committed"

    def fail(self, reason: str) -> None:
        """Discard every write and end the transaction: raises ``MutationFailed(reason)``."""
        self._check_open()
        self.state, self.reason = "failed", reason
        self._writes.clear()
        raise MutationFailed(reason)

    def _check_open(self) -> None:
        if self.state != "open":
            raise StateError(f"the store transaction is already {self.state}",
                             hint="do not use tx after commit() or fail()")

    def _slot(self, job_ref: object | None, key: str) -> tuple[str, str]:
        self._check_open()
        if not isinstance(key, str) or not key:
            raise InputError(f"store key {key!r}: keys are non-empty strings")
        scope = job_scope(job_ref)
        if job_ref is not None:
            job_id = job_id_of(job_ref)
            if job_id not in self._jobs_seen:
                self._store.get_job(job_id)  # NotFoundError for a job that does not exist
                self._jobs_seen.add(job_id)
        return scope, key


class Cloud:
    """A workspace driven from Python; see the module docstring."""

    def __init__(self, workspace: str | Path | None = None) -> None:
        self.workspace = Workspace.find(explicit=workspace) if workspace is not None else Workspace.find()
        self.workspace.ensure_runtime()
        self._local = threading.local()
        self._stores: list[Store] = []
        self._lock = threading.Lock()
        self._closed = False
        self.store  # noqa: B018 - open (and migrate) the store now, so errors show here

    # -- life ------------------------------------------------------------------------------------

    @property
    def store(self) -> Store:
        """This thread's store (opened on first use)."""
        store: Store | None = getattr(self._local, "store", None)
        if store is None:
            with self._lock:
                if self._closed:
                    raise StateError("this Cloud is closed", hint="make a new Cloud(...)")
                store = Store.open(self.workspace.state_db)
                self._stores.append(store)
            self._local.store = store
        elif self._closed:
            raise StateError("this Cloud is closed", hint="make a new Cloud(...)")
        return store

    def close(self) -> None:
        """Close every thread's store connection."""
        with self._lock:
            self._closed = True
            stores, self._stores = self._stores, []
        for store in stores:
            store.close()

    def __enter__(self) -> Cloud:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Cloud({str(self.workspace.root)!r})"

    # -- jobs ------------------------------------------------------------------------------------

    def add_job(self, work: str, *, input: str, **options: Any) -> JobRef:
        """Validate and queue a job (``RELEASE[@VERSION]:FUNCTION``); nothing runs yet."""
        from orchestrator.scheduler import jobs

        return jobs.submit(self.workspace, self.store, work, input=input, **options)

    def status(self, job_ref: JobRef | str) -> dict[str, Any]:
        """``orch job status``: state, reason, counters, failed tasks..."""
        from orchestrator.scheduler import jobs

        return jobs.status(self.store, job_id_of(job_ref))

    def result(self, job_ref: JobRef | str) -> bytes:
        """The job's ok outputs concatenated in task order (failed tasks are left out)."""
        from orchestrator.scheduler import jobs

        return b"".join(r.payload for r in jobs.result(self.workspace, self.store, job_id_of(job_ref)) if r.ok)

    def run(self, job_ref: JobRef | str, *, on_event: EventSink | None = None) -> Outcome:
        """Run (or resume) the job here on the ready nodes until it ends; its outcome."""
        from orchestrator.scheduler import jobs

        return jobs.run(self.workspace, self.store, job_id_of(job_ref), on_event=on_event)

    def delete_job(self, job_ref: JobRef | str) -> None:
        """Remove every trace of the job: output, tasks, events, record and kv values."""
        from orchestrator.scheduler import jobs

        job_id = job_id_of(job_ref)
        store = self.store
        with store.transaction():
            jobs.delete(self.workspace, store, job_id)
            store.kv_clear(scope=job_scope(job_id))

    def jobs(self) -> list[JobRecord]:
        """Every job, oldest first."""
        return self.store.list_jobs()

    # -- nodes -----------------------------------------------------------------------------------

    def add_node(self, family: str, count: int = 1) -> list[NodeRecord]:
        """Grow ``family`` by ``count`` nodes; the new ready nodes.

        This is ``fleet.spawn`` with the family's live count + ``count``, so, like
        ``orch spawn``, it also settles interrupted work and rolls nodes whose config changed.
        """
        from orchestrator import fleet

        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise InputError(f"add_node count must be an integer >= 1, not {count!r}")
        store = self.store
        current = len(store.list_nodes(family=family, states=fleet.UP))
        report = fleet.spawn(self.workspace, store, family, count=current + count)
        if not report.ok:
            last = f": {report.failures[-1]}" if report.failures else ""
            raise FleetIncomplete(f"family {family} has {len(report.ready)} of {report.target} nodes ready{last}",
                                  hint="see the logs under .orch/logs/")
        return [store.get_node(node_id) for node_id in report.created if node_id in report.ready]

    def remove_node(self, node_id: str) -> NodeRecord:
        """Stop one live node (an id or a resource path); its record afterwards."""
        from orchestrator import fleet

        store = self.store
        chosen = fleet.select_nodes(store, node_ids=[node_id])  # NotFoundError when none is live
        if len(chosen) != 1:
            raise InputError(f"{node_id!r} names {len(chosen)} nodes: {', '.join(n.id for n in chosen[:5])}",
                             hint="remove_node takes one node; pass its id")
        fleet.stop(self.workspace, store, chosen)
        return store.get_node(chosen[0].id)

    def nodes(self, *, family: str | None = None, all: bool = False) -> list[NodeRecord]:
        """The live nodes (of ``family``); ``all=True`` includes stopped ones."""
        states = None if all else [s for s in NodeState if s.live]
        return self.store.list_nodes(family=family, states=states)

    def info(self) -> dict[str, Any]:
        """What ``orch info`` and ``GET /info`` show (``orchestrator.state.info.workspace_info``):
        nodes by state (every state, zeros too), live nodes by family and provider, jobs
        by state, and totals."""
        from orchestrator.state.info import workspace_info

        return workspace_info(self.workspace, self.store)

    # -- the key-value store -----------------------------------------------------------------------

    def mutate_store(self, fn: Callable[[KVTransaction], T], *, max_attempts: int = MAX_ATTEMPTS) -> T:
        """Run ``fn(tx)`` as one optimistic transaction; what ``fn`` returned.

        See the module docstring: conflicts re-run ``fn``; ``tx.fail`` raises
        ``MutationFailed``; an exception from ``fn`` propagates; either writes nothing.
        """
        store = self.store
        for attempt in range(max_attempts):
            tx = KVTransaction(store)
            try:
                value = fn(tx)
                if tx.state == "open":
                    tx.commit()
            except _Conflict:
                pass
            else:
                if tx.state == "committed":
                    return value
                if tx.state == "failed":  # fn caught MutationFailed: still failed
                    raise MutationFailed(tx.reason)
            if attempt >= 2:
                # Let the other writer finish: a short random pause, growing with conflicts.
                time.sleep(random.uniform(0, min(0.05, 0.0002 * math.pow(2, min(attempt, 10)))))
        raise ConflictError(f"the store mutation conflicted with other writers {max_attempts} times in a row",
                            hint="retry later, or make the transaction touch fewer keys")


__all__ = ["GLOBAL_SCOPE", "Cloud", "KVTransaction", "MutationFailed", "job_id_of", "job_scope"]
