"""A real protocol peer for tests: a scheduler stand-in that speaks
``orchestrator.agent.protocol`` over mutual TLS (``orchestrator.deploy.pki``), on an asyncio
loop of its own in a thread, driven by plain synchronous test code.

>>> with AgentPeer(server_ssl_context(ws), heartbeat=0.5) as peer:      # doctest: +SKIP
...     session = peer.wait_session()
...     session.control(LOAD, work="w", ...)
...     session.expect(LOADED)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from orchestrator.agent import protocol
from orchestrator.agent.frames import PortResult, decode_results
from orchestrator.agent.protocol import ERROR, HEARTBEAT, HELLO, KIND_NAMES, RESULTS, TASKS, WELCOME
from orchestrator.deploy.pki import peer_node_id


@dataclass
class Received:
    kind: int
    at: float
    body: dict[str, Any] = field(default_factory=dict)  # control messages
    port: int | None = None  # RESULTS
    frames: bytes = b""

    def __repr__(self) -> str:
        what = f"port {self.port}, {len(self.frames)} bytes" if self.port is not None else self.body
        return f"<{KIND_NAMES[self.kind]} {what}>"


class PeerSession:
    """One agent's connection: what it sent (``messages``), and ways to answer."""

    def __init__(self, peer: AgentPeer, number: int, node: str, hello: dict[str, Any],
                 writer: asyncio.StreamWriter) -> None:
        self.peer, self.number, self.node, self.hello = peer, number, node, hello
        self.writer = writer
        self.messages: list[Received] = []
        self.taken: set[int] = set()
        self.cond = threading.Condition()
        self.closed = threading.Event()
        self.closed_at = 0.0
        self.silent = False  # stop sending heartbeats (the agent should then give up on us)
        self.last_sent = time.monotonic()

    # -- sending (thread-safe) -------------------------------------------------------------

    def send(self, data: bytes) -> None:
        def write() -> None:
            if not self.writer.is_closing():
                self.writer.write(data)
                self.last_sent = time.monotonic()

        self.peer.loop.call_soon_threadsafe(write)

    def control(self, kind: int, **fields: Any) -> None:
        self.send(protocol.control(kind, **fields))

    def tasks(self, port: int, frames: bytes) -> None:
        self.send(protocol.port_message(TASKS, port, frames))

    def close(self) -> None:
        self.peer.loop.call_soon_threadsafe(self.writer.close)

    # -- receiving ----------------------------------------------------------------------------

    def _add(self, item: Received) -> None:
        with self.cond:
            self.messages.append(item)
            self.cond.notify_all()

    def expect(self, kind: int, timeout: float = 10.0, where: Callable[[Received], bool] | None = None) -> Received:
        """The first message of ``kind`` (matching ``where``) not taken before; waits."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for i, item in enumerate(self.messages):
                    if i not in self.taken and item.kind == kind and (where is None or where(item)):
                        self.taken.add(i)
                        return item
                left = deadline - time.monotonic()
                if left <= 0 or self.closed.is_set():
                    raise AssertionError(f"no {KIND_NAMES[kind]} within {timeout}s; got {self.control_log()}")
                self.cond.wait(min(left, 0.05))

    def expect_any(self, kinds: tuple[int, ...], timeout: float = 10.0,
                   where: Callable[[Received], bool] | None = None) -> Received:
        """Like expect, for the first of several kinds that comes."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for i, item in enumerate(self.messages):
                    if i not in self.taken and item.kind in kinds and (where is None or where(item)):
                        self.taken.add(i)
                        return item
                left = deadline - time.monotonic()
                if left <= 0 or self.closed.is_set():
                    names = [KIND_NAMES[k] for k in kinds]
                    raise AssertionError(f"none of {names} within {timeout}s; got {self.control_log()}")
                self.cond.wait(min(left, 0.05))

    def control_log(self) -> list[Received]:
        with self.cond:
            return [m for m in self.messages if m.kind not in (RESULTS, HEARTBEAT)]

    def results(self, port: int) -> list[PortResult]:
        """Every result relayed for ``port`` so far, in arrival order."""
        with self.cond:
            data = b"".join(m.frames for m in self.messages if m.kind == RESULTS and m.port == port)
        results, rest = decode_results(data)
        assert rest == b"", "a RESULTS message ended inside a frame"
        return results

    def wait_results(self, port: int, count: int, timeout: float = 20.0) -> list[PortResult]:
        deadline = time.monotonic() + timeout
        while True:
            got = self.results(port)
            if len(got) >= count:
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"port {port}: {len(got)} of {count} results within {timeout}s; "
                                     f"{self.control_log()}")
            with self.cond:
                self.cond.wait(0.05)

    def count(self, kind: int) -> int:
        with self.cond:
            return sum(1 for m in self.messages if m.kind == kind)


class AgentPeer:
    """A TLS server on 127.0.0.1 (a free port) that welcomes agents and records all.

    ``port``: where to listen (0: any free port); ``reject=True``: close every
    connection right after the handshake (for backoff);
    ``accepts`` holds the times of completed handshakes (asyncio reports a refused
    handshake only in debug mode), ``loop_errors`` what else the loop reported.
    """

    def __init__(self, context: ssl.SSLContext, *, heartbeat: float = 1.0, reject: bool = False,
                 port: int = 0) -> None:
        self.context, self.heartbeat, self.reject = context, heartbeat, reject
        self.loop = asyncio.new_event_loop()
        self.sessions: list[PeerSession] = []
        self.accepts: list[float] = []
        self.loop_errors: list[str] = []
        self.refused: list[str] = []
        self.cond = threading.Condition()
        self.port = port
        self._numbers = itertools.count(1)
        self._thread = threading.Thread(target=self._run, name="agent-peer", daemon=True)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._started = threading.Event()

    def __enter__(self) -> AgentPeer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> int:
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("the peer did not start")
        return self.port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.set_exception_handler(self._on_loop_error)
        self.loop.run_until_complete(self._serve())
        self.loop.run_forever()
        self.loop.run_until_complete(self._shutdown())
        self.loop.close()

    async def _serve(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, ssl=self.context,
                                                  ssl_handshake_timeout=5)
        self.port = self._server.sockets[0].getsockname()[1]
        self._started.set()

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        with self.cond:
            self.loop_errors.append(f"{context.get('message')}: {exc!r}")
            self.cond.notify_all()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        session: PeerSession | None = None
        try:
            node = peer_node_id(writer.get_extra_info("ssl_object"))
            with self.cond:
                self.accepts.append(time.monotonic())
                self.cond.notify_all()
            if self.reject:
                return
            kind, body = await protocol.read_message(reader)
            hello = protocol.parse_control(kind, body) if kind == HELLO else {}
            if kind != HELLO or hello.get("node") != node:
                writer.write(protocol.control(ERROR, reason=f"HELLO for {hello.get('node')!r} over {node!r}'s cert"))
                with self.cond:
                    self.refused.append(node)
                return
            session = PeerSession(self, next(self._numbers), node, hello, writer)
            with self.cond:
                self.sessions.append(session)
                self.cond.notify_all()
            writer.write(protocol.control(WELCOME, session=session.number, heartbeat=self.heartbeat))
            beats = asyncio.ensure_future(self._beat(session))
            try:
                while True:
                    kind, body = await protocol.read_message(reader)
                    item = Received(kind, time.monotonic())
                    if kind == RESULTS:
                        item.port, view = protocol.parse_port(body)
                        item.frames = bytes(view)
                    else:
                        item.body = protocol.parse_control(kind, body)
                    session._add(item)
            finally:
                beats.cancel()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, OSError, protocol.ProtocolError):
            pass
        finally:
            if session is not None:
                session.closed_at = time.monotonic()
                session.closed.set()
                with session.cond:
                    session.cond.notify_all()
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1)
            self._tasks.discard(task)

    async def _beat(self, session: PeerSession) -> None:
        while True:
            await asyncio.sleep(self.heartbeat)
            if not session.silent and not session.writer.is_closing():
                session.writer.write(protocol.control(HEARTBEAT))
                session.last_sent = time.monotonic()

    def wait_session(self, index: int | None = None, timeout: float = 15.0) -> PeerSession:
        """Session number ``index`` (0-based), or the next one after those seen so far."""
        want = len(self.sessions) if index is None else index
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.sessions) <= want:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no agent session #{want} within {timeout}s "
                                         f"(loop errors: {self.loop_errors[-3:]})")
                self.cond.wait(min(left, 0.1))
            return self.sessions[want]

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for session in self.sessions:
            session.writer.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2)
        if self._server is not None:
            await self._server.wait_closed()

    def stop(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
