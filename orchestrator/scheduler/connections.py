"""The scheduler's connection layer: agents dial in, stay heard, and run commands.

``AgentServer`` owns everything about the agents' connections and nothing about jobs:
listening over mutual TLS and closing (``start``, ``close``); each connection's life
(admission by the client certificate's node and HELLO, WELCOME, reading messages until
the connection ends, replacing a node's older connection); heartbeats (``keepalive``
between jobs, ``_beat`` losing the agents silent for three intervals); which agents are
connected (``connected``); and the agents' command fan-out (``exec``, EXEC and its
EXEC_DONE).

The engine (``engine.Engine``) subclasses it and supplies the hooks this layer calls:
``_handle`` (each message of a joined agent), ``_lose`` (an agent is gone), ``_joined``
(an agent was welcomed) and ``_job_heartbeat`` (the running job's interval, if any).
Admission itself is the ``admit`` and ``peer_id`` callables given to the constructor.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import ssl
import time
from collections.abc import Callable, Iterable
from typing import Any

from orchestrator.agent import protocol as P
from orchestrator.agent.frames import FrameError
from orchestrator.scheduler.run import Agent, EventSink

HELLO_TIMEOUT = 10.0
BETWEEN_JOBS_HEARTBEAT = 1.0
"""Seconds between heartbeats while no job runs (a job has its own ``heartbeat_seconds``)."""


class AgentServer(abc.ABC):
    """The agents' connections: listening, admission, heartbeats, EXEC fan-out."""

    def __init__(self, *, ssl_context: ssl.SSLContext, admit: Callable[[str], str | None],
                 peer_id: Callable[[Any], str | None], on_event: EventSink | None = None) -> None:
        self.ssl_context = ssl_context
        self.admit = admit
        """node id -> its family when it may join, else None."""
        self.peer_id = peer_id
        self.on_event = on_event or (lambda kind, data: None)
        self.agents: dict[str, Agent] = {}
        self._servers: list[asyncio.Server] = []
        self._handlers: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._lost_writers: set[asyncio.StreamWriter] = set()
        """The writers of lost agents: ``close`` aborts them instead of waiting (``_lose`` adds)."""
        self._execs: dict[int, tuple[Agent, asyncio.Future[dict[str, Any]]]] = {}
        """exec id -> the agent running it and its answer (``_lose`` ends those of a lost agent)."""

    # -- the hooks: what the connection layer asks of the engine ----------------------------

    @abc.abstractmethod
    def _handle(self, agent: Agent, kind: int, body: bytes) -> None:
        """One message from a joined agent (its EXEC_DONE passed on to ``_exec_done``);
        raises ``P.ProtocolError`` to drop the connection."""

    @abc.abstractmethod
    def _lose(self, agent: Agent, why: str) -> None:
        """The agent is gone (its connection ended, it connected again, or it went silent).
        The engine marks it ``lost``, adds its writer to ``_lost_writers`` and answers its
        pending ``_execs`` with ``{exit: None, reason}``, as well as its own part."""

    @abc.abstractmethod
    def _joined(self, agent: Agent) -> None:
        """The agent was just welcomed (the engine offers it the running job, if any)."""

    @abc.abstractmethod
    def _job_heartbeat(self) -> float | None:
        """The running job's heartbeat interval, or None between jobs (then ``keepalive``
        beats, every ``BETWEEN_JOBS_HEARTBEAT``)."""

    # -- serving ------------------------------------------------------------------------------

    async def start(self, hosts: Iterable[str], port: int) -> None:
        for host in sorted(set(hosts)):
            server = await asyncio.start_server(self._connection, host, port, ssl=self.ssl_context,
                                                reuse_address=True, ssl_handshake_timeout=HELLO_TIMEOUT)
            self._servers.append(server)

    async def close(self) -> None:
        """Stop listening and end every connection (agents dial again later)."""
        for server in self._servers:
            server.close()
        for writer in list(self._writers):
            if writer in self._lost_writers:
                writer.transport.abort()  # a lost node may never answer a close: do not wait for it
            else:
                writer.close()  # each handler then reads the end of its stream and finishes
        handlers = list(self._handlers)
        if handlers:
            _, stuck = await asyncio.wait(handlers, timeout=2)
            for task in stuck:  # (each ends quietly: see _connection)
                task.cancel()
            await asyncio.gather(*stuck, return_exceptions=True)
        for writer in list(self._writers):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)
        self._servers.clear()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        self._writers.add(writer)
        try:
            await self._converse(reader, writer)
        except asyncio.CancelledError:
            # close() cancelled a handler whose peer never answered the close.  This task
            # belongs to asyncio's streams, which (3.11) call task.exception() on it and
            # log a cancelled one as an error: end it as finished instead.
            writer.transport.abort()
        finally:
            writer.close()
            if task is not None:
                self._handlers.discard(task)
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(writer.wait_closed(), 2)
            self._writers.discard(writer)
            self._lost_writers.discard(writer)

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        agent: Agent | None = None
        why = "connection closed"
        try:
            node = self.peer_id(writer.get_extra_info("ssl_object"))
            family = self.admit(node) if node else None
            if node is None or family is None:
                writer.write(P.control(P.ERROR, reason=f"node {node!r} is not a live node of this workspace"))
                return
            kind, body = await asyncio.wait_for(P.read_message(reader), HELLO_TIMEOUT)
            hello = P.parse_control(kind, body)
            if kind != P.HELLO or hello.get("node") != node:
                writer.write(P.control(P.ERROR, reason="expected HELLO from the certificate's node"))
                return
            agent = self._join(node, family, hello, writer)
            while True:
                kind, body = await P.read_message(reader)
                agent.last_heard = time.monotonic()
                if agent.lost and kind != P.RESULTS:
                    why = "came back after it was declared lost; it must dial again"
                    break
                self._handle(agent, kind, body)
                if writer.transport.get_write_buffer_size() > (4 << 20):
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, OSError, TimeoutError) as exc:
            why = f"connection lost ({type(exc).__name__})"
        except (P.ProtocolError, FrameError) as exc:
            why = f"protocol error: {exc}"
            with contextlib.suppress(Exception):
                writer.write(P.control(P.ERROR, reason=why))
        finally:
            if agent is not None:
                if not agent.lost:
                    self._lose(agent, why)
                if self.agents.get(agent.node) is agent:
                    del self.agents[agent.node]

    def _join(self, node: str, family: str, hello: dict[str, Any], writer: asyncio.StreamWriter) -> Agent:
        old = self.agents.get(node)
        if old is not None and not old.lost:
            self._lose(old, "it connected again")
            old.writer.close()
        agent = Agent(node=node, name=str(hello.get("name") or node), family=family,
                      slots=max(1, int(hello.get("slots") or 1)), writer=writer,
                      platform=str(hello["platform"]) if hello.get("platform") else None)
        self.agents[node] = agent
        agent.heartbeat = self._heartbeat()
        agent.send(P.control(P.WELCOME, session=f"{node}-{time.time_ns()}", heartbeat=agent.heartbeat))
        self.on_event("agent.joined", {"node": node, "slots": agent.slots})
        self._joined(agent)
        return agent

    # -- heartbeats -----------------------------------------------------------------------------

    def _heartbeat(self) -> float:
        beat = self._job_heartbeat()
        return BETWEEN_JOBS_HEARTBEAT if beat is None else beat

    async def keepalive(self) -> None:
        """Between jobs (a server's engine), heartbeat the connected agents, which give up a
        silent scheduler after three intervals, and lose the agents that went silent."""
        heartbeat = self._heartbeat()
        while True:
            await asyncio.sleep(heartbeat)
            if self._job_heartbeat() is None:  # else the job's _tick beats
                self._beat(time.monotonic(), heartbeat)

    def _beat(self, now: float, heartbeat: float) -> None:
        """Heartbeat every live agent; lose those silent for three of its intervals.  An
        agent told another interval (welcomed between jobs, beating every second, and now
        a job with its own ``heartbeat_seconds``, or the other way) is told this one."""
        beat = P.message(P.HEARTBEAT)
        for agent in list(self.agents.values()):
            if agent.lost:
                continue
            if now - agent.last_heard > 3 * max(heartbeat, agent.heartbeat):
                self._lose(agent, f"silent for {now - agent.last_heard:.1f} s")
            elif agent.heartbeat != heartbeat:
                agent.heartbeat = heartbeat
                agent.send(P.control(P.HEARTBEAT, heartbeat=heartbeat))
            else:
                agent.send(beat)

    # -- agents outside jobs (orch serve) -------------------------------------------------------

    def connected(self) -> dict[str, float]:
        """Node id -> when (time.monotonic) its connected agent was last heard from."""
        return {node: agent.last_heard for node, agent in self.agents.items() if not agent.lost}

    async def exec(self, requests: dict[str, int], command: str, timeout: float, max_output: int,
                   wait: float) -> dict[str, dict[str, Any]]:
        """Run ``command`` through the agents of ``requests`` (node -> exec id) at once:
        node -> its EXEC_DONE, or ``{exit: None, reason}`` when the agent is not
        connected, is lost meanwhile, or does not answer within ``wait`` seconds (one
        deadline for all)."""
        answers: dict[str, dict[str, Any]] = {}
        futures: dict[str, asyncio.Future[dict[str, Any]]] = {}
        loop = asyncio.get_running_loop()
        for node, exec_id in requests.items():
            agent = self.agents.get(node)
            if agent is None or agent.lost:
                answers[node] = {"exit": None, "reason": f"the agent of node {node} is not connected"}
                continue
            futures[node] = future = loop.create_future()
            self._execs[exec_id] = (agent, future)
            agent.send(P.control(P.EXEC, id=exec_id, command=command, timeout=timeout, max_output=max_output))
        try:
            if futures:
                await asyncio.wait(futures.values(), timeout=wait)
        finally:
            for exec_id in requests.values():
                self._execs.pop(exec_id, None)
        for node, future in futures.items():
            if future.done():
                answers[node] = future.result()
            else:
                future.cancel()
                name = self.agents[node].name if node in self.agents else node
                answers[node] = {"exit": None, "reason": f"no answer from the agent of {name} within {wait:g} s"}
        return answers

    def _exec_done(self, agent: Agent, msg: dict[str, Any]) -> None:
        """An agent's EXEC_DONE: the answer of its pending exec (a late or foreign one is dropped)."""
        pending = self._execs.get(int(msg.get("id", -1)))
        if pending is not None and pending[0] is agent and not pending[1].done():
            pending[1].set_result(msg)
