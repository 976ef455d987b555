"""The node agent: dials the scheduler over mutual TLS and runs ports for it.

Standard library only, relative imports only: on a node this package is a copy in
``~/orch/agent/orch_agent/``, run as ``python3 -m orch_agent run --config agent.json``
(by the supervisor, ``python3 -m orch_agent supervise``; see ``supervisor.py``), which
starts in ``launch.py`` and comes here once a scheduler accepts connections.

One asyncio loop does everything; nothing blocks it (tarballs are unpacked in a thread,
builds and ports are subprocesses).  Per connection (see ``protocol.py``):

- HELLO, then WELCOME; HEARTBEAT every ``heartbeat`` seconds; a scheduler silent for
  three intervals is lost.  When the connection ends for any reason, every port is
  killed (SIGKILL, reaped) and the agent dials again with exponential backoff and
  jitter (0.1 s doubling to 2 s), forever, cycling through the scheduler addresses.
- LOAD starts one port per index (``orch-port LIBRARY FUNCTION NODE_NAME``), after
  stopping whatever ran there; a release folder that is not installed with that
  sha256 is LOAD_FAILED ``missing``; a port whose runner refuses the library (it
  could not load it, the ABI version differs, no such function: the runner says so on
  its status pipe) is LOAD_FAILED with the runner's own reason.
- RELEASE installs a release: checked against its sha256, unpacked safely into
  ``releases/NAME``, built, then marked with ``.orch-sha256``.
- TASKS are written to the port's stdin unchanged; only the 28-byte headers are read,
  to remember which seqs the port owes.  The port's stdout is read in large chunks and
  every complete result frame available is relayed in one RESULTS message.
- When a port dies, every result it wrote is relayed first, then PORT_DIED names the
  first seq sent without a result, then the port is started again: PORT_READY.  A port
  whose runner refused its library (or that ended before its runner said ``ready``) is
  not restarted; an exit status after ``ready`` is the work's (``exit(3)`` included).
- A task that runs past the work's ``task_timeout`` (counted from when it was sent or,
  if later, from the previous result) gets its port SIGKILLed.
- EXEC runs a shell command at once (a task of its own, beside everything else) in a
  session of its own, reading its stdout and stderr through pipes the loop watches
  (capped, the rest dropped); past its timeout, or when the connection ends, its whole
  process group is SIGKILLed.  EXEC_DONE answers it.

This module is the connection, the dispatch of what the scheduler sends and the
agent's ports; the pieces it drives are ``releases.py`` (``NodeReleases``: LOAD, UNLOAD,
RELEASE, the port runner; installed releases, safe unpacking), ``ports.py`` (``Port``:
one ``orch-port`` process) and ``commands.py`` (``Commands``: the running EXECs).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import ssl
import traceback
from typing import Any

from . import protocol
from .commands import Commands
from .config import PARENT_ENV, POKE, Config, ConfigError, Log
from .errors import TIMEOUTS
from .errors import describe as _describe
from .frames import HEADER_LEN, TASK_HEADER
from .platforms import host_platform
from .ports import READ_CHUNK, Port
from .protocol import (
    ERROR,
    EXEC,
    HEARTBEAT,
    HELLO,
    KIND_NAMES,
    LOAD,
    PORT_DIED,
    PROTOCOL_VERSION,
    RELEASE,
    SCHEDULER_NAME,
    TASKS,
    UNLOAD,
    WELCOME,
    ProtocolError,
)
from .releases import NodeReleases

LOST_AFTER = 3  # heartbeat intervals of silence
CONNECT_TIMEOUT = 10.0


class SessionEnded(Exception):
    """The connection with the scheduler is over (the message says why)."""


# -- the agent ---------------------------------------------------------------------------


class Agent:
    """The agent's state across connections: config, log, the ports of this session; its
    releases (``NodeReleases``) and commands (``Commands``) are objects it holds."""

    def __init__(self, cfg: Config, log: Log) -> None:
        self.cfg = cfg
        self.log = log
        self.ports: dict[int, Port] = {}
        self.writer: asyncio.StreamWriter | None = None
        self.heartbeat = cfg.heartbeat
        self.retimed = asyncio.Event()  # set when the scheduler changes the heartbeat
        self.last_heard = 0.0
        self.stop_event = asyncio.Event()
        self.poked = asyncio.Event()  # POKE: a scheduler has just started; dial now
        self.releases = NodeReleases(self)  # LOAD, UNLOAD, RELEASE; the port runner
        self.commands = Commands(self)  # EXECs running (this connection)

    # -- sending ------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        writer = self.writer
        if writer is not None and not writer.is_closing():
            writer.write(data)

    async def drain(self) -> None:
        writer = self.writer
        if writer is not None and not writer.is_closing():
            with contextlib.suppress(OSError, RuntimeError, ssl.SSLError):  # the session notices a loss
                await writer.drain()

    def forget_port(self, port: Port) -> None:
        if self.ports.get(port.index) is port:
            del self.ports[port.index]

    async def kill_ports(self) -> None:
        ports = list(self.ports.values())
        self.ports.clear()
        if ports:
            await asyncio.gather(*(p.stop() for p in ports))
            self.log(f"killed ports {sorted(p.index for p in ports)}")

    # -- the connection loop --------------------------------------------------------------

    async def run(self) -> None:
        cfg = self.cfg
        failures, turn = 0, 0  # failures: dials in a row that did not reach WELCOME
        while not self.stop_event.is_set():
            host, port = cfg.scheduler[turn % len(cfg.scheduler)]
            turn += 1
            welcomed = False
            try:
                welcomed = await self.session(host, port)
            except (*TIMEOUTS, OSError, ssl.SSLError, asyncio.IncompleteReadError, SessionEnded, ProtocolError,
                    ConfigError, ValueError) as exc:
                failures += 1
                if failures & (failures - 1) == 0:  # 1, 2, 4, 8, ...: a dead scheduler does not flood the log
                    self.log(f"scheduler {host}:{port}: {_describe(exc)} (attempt {failures}; retrying)")
            except Exception as exc:
                failures += 1
                self.log(f"internal error: {exc!r}: {' | '.join(traceback.format_exc().splitlines()[-6:])}")
            finally:
                await self.kill_ports()
            if welcomed:
                failures = 0
            if self.stop_event.is_set():
                break
            delay = min(cfg.backoff_cap, cfg.backoff_start * 2 ** min(max(failures - 1, 0), 16))
            if self.poked.is_set():
                self.poked.clear()
                failures, turn, delay = 0, 0, 0.0
            await self.backoff(random.uniform(delay / 2, delay))

    async def backoff(self, delay: float) -> None:
        """Sleep ``delay`` seconds, or less when stopped or poked."""
        waits = [asyncio.ensure_future(self.stop_event.wait()), asyncio.ensure_future(self.poked.wait())]
        try:
            await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()

    def client_context(self) -> ssl.SSLContext:
        cfg = self.cfg
        try:
            ctx = ssl.create_default_context(cafile=str(cfg.ca))
            ctx.check_hostname = False
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(str(cfg.cert), str(cfg.key))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the CA or this node's certificate: {exc}") from exc
        return ctx

    async def session(self, host: str, port: int) -> bool:
        """One connection, from dial to close; True when the scheduler welcomed us."""
        ctx = self.client_context()
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ctx, server_hostname=SCHEDULER_NAME,
                                    ssl_handshake_timeout=CONNECT_TIMEOUT, limit=READ_CHUNK),
            CONNECT_TIMEOUT + 1,
        )
        welcomed = False
        tasks: list[asyncio.Task[Any]] = []
        try:
            name = _common_name(writer.get_extra_info("peercert"))
            if name != SCHEDULER_NAME:
                raise SessionEnded(f"the peer's certificate is for {name!r}, not {SCHEDULER_NAME!r}")
            self.writer = writer
            self.releases.new_connection()  # a new connection may send the release again
            self.last_heard = asyncio.get_running_loop().time()
            self.send(protocol.control(
                HELLO, node=self.cfg.node, name=self.cfg.name, slots=self.cfg.slots,
                releases=self.releases.installed(), version=PROTOCOL_VERSION, pid=os.getpid(),
                platform=host_platform(),
            ))
            await self.drain()
            try:
                kind, body = await asyncio.wait_for(self.read(reader), LOST_AFTER * self.cfg.heartbeat)
            except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError) as exc:
                raise SessionEnded(f"the scheduler closed the connection before WELCOME ({_describe(exc)}); "
                                   "does it trust this node's certificate?") from exc
            if kind == ERROR:
                raise SessionEnded(f"the scheduler refused us: {protocol.parse_control(kind, body).get('reason')}")
            if kind != WELCOME:
                raise SessionEnded(f"expected WELCOME, got {KIND_NAMES[kind]}")
            welcome = protocol.parse_control(kind, body)
            self.heartbeat = float(welcome.get("heartbeat") or self.cfg.heartbeat)
            if self.heartbeat <= 0:
                self.heartbeat = self.cfg.heartbeat
            self.retimed.clear()
            welcomed = True
            self.log(f"connected to the scheduler at {host}:{port} (session {welcome.get('session')}, "
                     f"heartbeat {self.heartbeat:g} s)")
            control: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
            tasks = [
                asyncio.ensure_future(self._receive(reader, control)),
                asyncio.ensure_future(self._heartbeats()),
                asyncio.ensure_future(self._control(control)),
                asyncio.ensure_future(self.stop_event.wait()),
            ]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    error = task.exception()
                    if isinstance(error, ProtocolError):
                        self.send(protocol.control(ERROR, reason=str(error)))
                    self.log(f"connection to {host}:{port} ended: {_describe(error)}")
                    break
            else:
                if self.stop_event.is_set():
                    self.log("stopping")
                else:
                    self.log(f"connection to {host}:{port} ended")
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(BaseException):
                    await task
            self.writer = None
            await self.commands.kill_execs()
            await self.kill_ports()
            writer.close()
            with contextlib.suppress(*TIMEOUTS, OSError, ssl.SSLError, asyncio.IncompleteReadError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
        return welcomed

    async def read(self, reader: asyncio.StreamReader) -> tuple[int, bytes]:
        """The next message; any bytes that arrive count as hearing from the scheduler."""
        loop = asyncio.get_running_loop()
        header = await reader.readexactly(protocol.HEADER_LEN)
        self.last_heard = loop.time()
        kind, length = protocol.parse_header(header)
        if length <= READ_CHUNK:
            body = await reader.readexactly(length) if length else b""
        else:
            parts: list[bytes] = []
            left = length
            while left:
                part = await reader.read(min(left, READ_CHUNK))
                if not part:
                    raise asyncio.IncompleteReadError(b"".join(parts), length)
                parts.append(part)
                left -= len(part)
                self.last_heard = loop.time()
            body = b"".join(parts)
        self.last_heard = loop.time()
        return kind, body

    async def _receive(self, reader: asyncio.StreamReader, control: asyncio.Queue[tuple[int, bytes]]) -> None:
        while True:
            kind, body = await self.read(reader)
            if kind == TASKS:
                index, data = protocol.parse_port(body)
                port = self.ports.get(index)
                if port is None or port.stopping:  # gone, or going (UNLOAD reaping it): never run
                    seq = TASK_HEADER.unpack_from(data)[1] if len(data) >= HEADER_LEN else None
                    self.send(protocol.control(PORT_DIED, port=index, seq=seq, reason=f"port {index} is not running"))
                else:
                    port.send_tasks(data)
            elif kind == HEARTBEAT:
                if body not in (b"", b"{}"):  # {heartbeat: s}: the scheduler changed the interval (a job's own)
                    beat = protocol.parse_control(kind, body)
                    if "heartbeat" in beat:
                        self._retime(beat["heartbeat"])
            elif kind in (LOAD, UNLOAD, RELEASE):
                control.put_nowait((kind, body))
            elif kind == EXEC:
                self.commands.start_exec(protocol.parse_control(kind, body))
            elif kind == ERROR:
                reason = protocol.parse_control(kind, body).get("reason")
                raise SessionEnded(f"the scheduler sent ERROR: {reason}")
            else:
                self.log(f"ignoring an unexpected {KIND_NAMES[kind]} from the scheduler")

    def _retime(self, heartbeat: object) -> None:
        if isinstance(heartbeat, bool) or not isinstance(heartbeat, (int, float)) or not 0 < heartbeat < 3600:
            raise ProtocolError(f"HEARTBEAT: heartbeat {heartbeat!r} is not a positive number of seconds")
        if heartbeat != self.heartbeat:
            self.log(f"heartbeat {self.heartbeat:g} s -> {heartbeat:g} s")
            self.heartbeat = float(heartbeat)
            self.retimed.set()

    async def _heartbeats(self) -> None:
        loop = asyncio.get_running_loop()
        last_beat = float("-inf")
        while True:
            now = loop.time()
            silent = now - self.last_heard
            if silent > LOST_AFTER * self.heartbeat:
                raise SessionEnded(f"nothing from the scheduler for {silent:.1f} s (heartbeat {self.heartbeat:g} s)")
            if now >= last_beat + self.heartbeat:
                self.send(protocol.control(HEARTBEAT))
                last_beat = now
            wake = min(last_beat + self.heartbeat, self.last_heard + LOST_AFTER * self.heartbeat + 0.01)
            self.retimed.clear()  # a new interval wakes us: a shorter one may be due at once
            with contextlib.suppress(*TIMEOUTS):
                await asyncio.wait_for(self.retimed.wait(), max(0.005, wake - loop.time()))

    async def _control(self, queue: asyncio.Queue[tuple[int, bytes]]) -> None:
        while True:
            kind, body = await queue.get()
            if kind == LOAD:
                await self.releases.load(protocol.parse_control(kind, body))
            elif kind == UNLOAD:
                await self.releases.unload(protocol.parse_control(kind, body))
            else:
                header, tarball = protocol.parse_release(body)
                await self.releases.install(header, tarball)
            await self.drain()


def _common_name(cert: Any) -> str:
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return ""


# -- entry point -----------------------------------------------------------------------------


async def _main(cfg: Config, log: Log) -> None:
    agent = Agent(cfg, log)
    agent.releases.build_port_binary()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(signum, agent.stop_event.set)
    loop.add_signal_handler(getattr(signal, POKE), agent.poked.set)
    parent = os.environ.get(PARENT_ENV)
    watch = asyncio.ensure_future(_watch_parent(int(parent), agent)) if parent and parent.isdigit() else None
    try:
        await agent.run()
    finally:
        if watch is not None:
            watch.cancel()
        await agent.commands.kill_execs()
        await agent.kill_ports()


async def _watch_parent(pid: int, agent: Agent) -> None:
    """A supervised agent ends when its supervisor is gone (never two agents per node)."""
    while os.getppid() == pid:
        await asyncio.sleep(1.0)
    agent.log(f"the supervisor (pid {pid}) is gone; stopping")
    agent.stop_event.set()


def run_agent(cfg: Config, log: Log) -> int:
    """The agent proper, until SIGTERM (``launch.run`` starts it once a scheduler answers)."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(cfg, log))
    log(f"agent {cfg.node} stopped")
    return 0
