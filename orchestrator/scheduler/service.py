"""``SchedulerService``: one engine for the life of ``orch serve``.

``orch job run`` starts an engine for its job and closes it at the end, so agents dial
in for each job.  A server keeps one: an asyncio loop in a thread of its own listens on
the workspace's scheduler port from start to stop, agents stay connected between jobs,
and so the server can

- run jobs (``run_job``, called by the ``JobRunner`` thread, one job at a time): the
  job is prepared, run and closed in the loop's thread (a SQLite sink is bound to the
  thread that opened it), and only the nodes whose agent is not connected yet are
  ensured over SSH;
- suspend the job it runs (``suspend``: on SIGTERM the server stops the job cleanly,
  and ``orch job resume`` or the next server goes on from there);
- run commands through the agents (``exec``, Salt-like): EXEC and EXEC_DONE over the
  agents' connections, for ``orch exec`` and ``POST /nodes/exec``;
- tell which nodes' agents are connected and when each was last heard from.

Any node that is a live, ready node of the workspace when its agent connects is
admitted (looked up in the store then), so nodes spawned after the server started join
it; so is a ready node being rolled in place (``NodeRecord.serving``), whose agent goes
on serving while its new release goes in.  The server listens on every address its
nodes dial (``scheduler_endpoint``); an address that appears later (a netns provider's
bridge) is added before the next job.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import threading
import time
from collections.abc import Sequence
from typing import Any

from orchestrator.errors import RemoteError, StateError
from orchestrator.scheduler import jobs
from orchestrator.scheduler.engine import Engine
from orchestrator.scheduler.run import EventSink, Outcome
from orchestrator.state import SERVING_STATES, NodeRecord, Store
from orchestrator.workspace import Workspace

EXEC_GRACE = 10.0
"""Seconds past a command's own timeout to wait for the agent's answer."""


SERVER_STOPPED = "the server stopped; the next `orch serve` (or `orch job resume JOB`) goes on"
"""The reason of a job a stopping server suspends: the next server queues it again."""

class SchedulerService:
    """A long-lived engine in a thread: start(), run_job() per job, exec(), stop()."""

    def __init__(self, ws: Workspace, *, on_event: EventSink | None = None) -> None:
        self.ws = ws
        self.on_event = on_event
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._engine: Engine | None = None
        self._store: Store | None = None
        self._hosts: set[str] = set()
        self._port: int | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._exec_ids = itertools.count(1)

    # -- life -----------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Start the loop thread and listen; raises StateError when the port is taken."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._main, name="orch-scheduler", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise StateError("the scheduler did not start in time")
        if self._failure is not None:
            failure, self._failure = self._failure, None
            self._thread.join(5)
            self._thread = None
            if isinstance(failure, StateError):
                raise failure
            raise StateError(f"the scheduler could not start: {failure}") from failure

    def stop(self, timeout: float = 15.0) -> None:
        """Suspend the running job (if any), close every connection, end the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self.suspend(SERVER_STOPPED)
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._stopping.set)
        thread.join(timeout)
        self._thread = None

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            if not self._ready.is_set():
                self._failure = exc
                self._ready.set()
            else:
                raise

    async def _serve(self) -> None:
        from orchestrator.deploy import pki

        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        with Store.open(self.ws.state_db) as store:
            self._store = store
            self._engine = Engine(store, ssl_context=pki.server_ssl_context(self.ws), admit=self._admit,
                                  peer_id=pki.peer_node_id, on_event=self.on_event)
            try:
                await self._listen(self._live_nodes(store), always=("127.0.0.1",))
                self._ready.set()
                keepalive = asyncio.create_task(self._engine.keepalive())
                try:
                    await self._stopping.wait()
                finally:
                    keepalive.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await keepalive
            finally:
                await self._engine.close()
                self._engine = None
                self._store = None

    async def _listen(self, nodes: Sequence[NodeRecord], always: Sequence[str] = ()) -> None:
        from orchestrator.deploy import agent_install

        hosts = set(always)
        for node in nodes:
            try:
                host, port = agent_install.scheduler_endpoint(self.ws, node, store=self._store)
            except Exception:
                continue
            hosts.add(host)
            self._port = port
        if self._port is None:
            self._port = agent_install.scheduler_port(self.ws, store=self._store)
        new = sorted(hosts - self._hosts)
        if not new:
            return
        assert self._engine is not None
        try:
            await self._engine.start(new, self._port)
        except OSError as exc:
            raise StateError(f"the scheduler cannot listen on {', '.join(new)} port {self._port}: {exc.strerror}",
                             hint="another `orch job run` or `orch serve` may be serving this workspace; "
                                  "or set scheduler_port in orch.yaml") from exc
        self._hosts.update(new)

    def _admit(self, node_id: str) -> str | None:
        assert self._store is not None
        try:
            node = self._store.get_node(node_id)
        except Exception:
            return None
        return node.family if node.serving else None  # ready, or rolled in place: its agent goes on

    @staticmethod
    def _live_nodes(store: Store) -> list[NodeRecord]:
        return [n for n in store.list_nodes(states=SERVING_STATES) if n.serving]

    def _call(self, coroutine: Any, timeout: float | None = None) -> Any:
        loop = self._loop
        if loop is None or self._engine is None:
            coroutine.close()
            raise StateError("the scheduler is not running")
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout)

    # -- jobs -----------------------------------------------------------------------------

    def run_job(self, ws: Workspace, store: Store, job_id: str) -> Outcome:
        """Run ``job_id`` on the service's engine until it ends (JobRunner's hook);
        ``store`` (the caller's) is not used: the loop thread has its own."""
        return self._call(self._run(job_id))  # type: ignore[no-any-return]

    async def _run(self, job_id: str) -> Outcome:
        from orchestrator.deploy import agent_install

        assert self._store is not None and self._engine is not None
        engine = self._engine
        with jobs.prepared(self.ws, self._store, job_id) as run:
            await self._listen(run.nodes)
            missing = [n for n in run.nodes if n.id not in engine.connected()]
            if missing:  # in a thread of the loop's pool; `ensure` pokes the idle agents
                await asyncio.get_running_loop().run_in_executor(
                    None, lambda: agent_install.ensure_agents(self.ws, None, missing, None))  # facts: cached
            return await engine.run(run.state, run.tasks)

    def suspend(self, reason: str) -> None:
        """End the running job as suspended (resumable), if one runs."""
        loop, engine = self._loop, self._engine
        if loop is not None and engine is not None and engine.job is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(engine.suspend, reason)

    # -- agents ---------------------------------------------------------------------------

    def connected(self) -> dict[str, float]:
        """Node id -> seconds since its agent was last heard from, for connected agents."""
        if self._engine is None:
            return {}
        now = time.monotonic()
        return {node: now - heard for node, heard in self._engine.connected().items()}

    def work(self) -> dict[str, Any]:
        """What the engine holds now, for the autoscaler: ``{"job", "family", "waiting",
        "busy"}``: the running job and its family (None: any), an estimate of its tasks
        waiting (not cut yet, or to be retried), and node id -> whether its agent has the
        job's work loaded."""
        if self._engine is None:
            return {"job": None, "family": None, "waiting": 0.0, "busy": {}}
        return self._call(self._work(), 10)  # type: ignore[no-any-return]

    async def _work(self) -> dict[str, Any]:
        assert self._engine is not None
        engine, job = self._engine, self._engine.job
        busy = {node: agent.loaded for node, agent in engine.agents.items() if not agent.lost}
        if job is None:
            return {"job": None, "family": None, "waiting": 0.0, "busy": busy}
        waiting = float(len(job.retry))
        done, total = job.module.progress()
        if not job.exhausted and total and done and job.generated:
            waiting += (total - done) / (done / job.generated)  # at the sizes cut so far
        elif not job.exhausted and not total:
            waiting += 1.0  # an input of unknown length: something waits
        return {"job": job.id, "family": job.spec.family, "waiting": waiting, "busy": busy}

    def exec(self, nodes: Sequence[NodeRecord], command: str, *, timeout: float | None = None,
             max_output: int = 1 << 20) -> dict[str, dict[str, Any]]:
        """Run ``command`` through the agents of those ``nodes`` that are connected, in
        parallel: node id -> ``{exit, stdout, stderr}`` or ``{error}`` (as ``orch exec
        --json``).  Nodes without a connected agent are left out of the answer."""
        seconds = timeout if timeout is not None else 60.0
        try:
            return self._call(self._exec([n.id for n in nodes], command, seconds, max_output),  # type: ignore[no-any-return]
                              seconds + 2 * EXEC_GRACE)
        except concurrent.futures.TimeoutError as exc:
            raise RemoteError(f"no answer from the agents within {seconds + 2 * EXEC_GRACE:g} s") from exc

    async def _exec(self, node_ids: list[str], command: str, timeout: float, max_output: int
                    ) -> dict[str, dict[str, Any]]:
        assert self._engine is not None
        engine = self._engine
        connected = engine.connected()
        requests = {node: next(self._exec_ids) for node in node_ids if node in connected}
        answers = await engine.exec(requests, command, timeout, max_output, timeout + EXEC_GRACE)
        return {node: _exec_json(answers[node]) for node in requests}


def _exec_json(answer: dict[str, Any]) -> dict[str, Any]:
    """EXEC_DONE (or the engine's error) as ``orch exec --json`` shows a node."""
    if answer.get("exit") is None:
        return {"error": str(answer.get("reason") or answer.get("error") or "the command did not finish")}
    return {"exit": int(answer["exit"]), "stdout": str(answer.get("stdout", "")),
            "stderr": str(answer.get("stderr", ""))}
