"""Ports on the node: one ``orch-port`` process per index, fed TASKS on its stdin,
read in large chunks on its stdout (result frames relayed as RESULTS), restarted when
it dies (PORT_DIED naming the task in flight, then PORT_READY), SIGKILLed past a
task's timeout.  See the agent's docstring for the whole story.

Why a port ended is never read from its exit code alone, which a work function can
give as well (``exit(3)``): the runner speaks for itself on a status pipe
(``--status-fd``, see worker_native/PROTOCOL.md): ``ready`` once its library is loaded,
``refused ...`` when it will not run the library, ``error ...`` when it ends on its own.
A port that ends after ``ready`` without an ``error`` line ended because of its work."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from . import frames, protocol
from .errors import TIMEOUTS
from .frames import HEADER_LEN, RESULT_HEADER, RESULT_MAGIC, TASK_HEADER, TASK_MAGIC
from .protocol import PORT_DIED, PORT_READY, RESULTS

if TYPE_CHECKING:
    from .config import Config, Log


class PortOwner(Protocol):
    """What a port needs of the agent that holds it (the agent is the one owner)."""

    cfg: Config
    log: Log

    def send(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def forget_port(self, port: Port) -> None: ...

READ_CHUNK = 1 << 20
LOAD_GRACE = 0.5  # longest wait for a new port to show it loaded its library
QUICK_DEATH = 1.0  # a port that dies this soon after starting, with no task, is restarted
RESTART_CAP = 5.0  # ... after 0.1 s, doubling up to this
STATUS_READY = "ready"
STATUS_REFUSED = "refused"
STATUS_ERROR = "error"
STDERR_LINES_PER_WINDOW = 20  # per port, logged per 10 s; the rest is counted


class Port:
    """One port process and what it owes: the seqs sent to it without a result yet."""

    def __init__(self, agent: PortOwner, index: int, work: str, library: Path, function: str,
                 timeout: float | None) -> None:
        self.agent, self.index, self.work = agent, index, work
        self.library, self.function, self.timeout = library, function, timeout
        self.proc: asyncio.subprocess.Process | None = None
        self.pending: collections.deque[int] = collections.deque()
        self.head_since = 0.0
        self.loading = False
        self.stopping = False
        self.timed_out: int | None = None
        self.corrupt = ""
        self.last_stderr = ""
        self.watcher: asyncio.Task[None] | None = None
        self.stderr_task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self._window = (0.0, 0, 0)  # start, lines logged, lines dropped
        self.started_at = 0.0
        self.quick_deaths = 0  # deaths in a row right after a start, with no task in flight
        self.ready = False  # the runner said "ready": an end from now on is the work's (or an "error")
        self.runner_said: tuple[str, str] | None = None  # its "refused"/"error" line: (word, message)
        self.status_task: asyncio.Task[None] | None = None
        self.first_status: asyncio.Future[None] | None = None  # done at the first status line or EOF

    # -- life ---------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.agent.cfg
        self.pending.clear()
        self.timed_out, self.corrupt, self.last_stderr = None, "", ""
        self.ready, self.runner_said = False, None
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        try:
            proc = await asyncio.create_subprocess_exec(
                str(cfg.port_binary), f"--status-fd={status_w}", str(self.library), self.function, cfg.name,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                limit=READ_CHUNK, close_fds=True, pass_fds=(status_w,),
            )
        except BaseException:
            os.close(status_r)
            raise
        finally:
            os.close(status_w)
        self.proc = proc
        self.started_at = time.monotonic()
        if self.stopping:  # stop() came while the process started: stop() waits for it
            proc.kill()
        loop = asyncio.get_running_loop()
        self.first_status = loop.create_future()
        self.status_task = asyncio.ensure_future(self._read_status(status_r, self.first_status))
        self.stderr_task = asyncio.ensure_future(self._drain_stderr(proc))
        self.watcher = asyncio.ensure_future(self._watch(proc))

    async def loaded(self) -> str | None:
        """None once the port is past loading its library (its runner said ``ready``),
        else why it ended.  Waits at most LOAD_GRACE; a port still busy then is taken as
        loaded (a late refusal becomes a PORT_DIED, and the port is not restarted)."""
        proc = self.proc
        assert proc is not None and self.first_status is not None
        with contextlib.suppress(*TIMEOUTS):
            await asyncio.wait_for(asyncio.shield(self.first_status), LOAD_GRACE)
        if self.ready and not self.corrupt:
            return None
        if proc.returncode is None:
            if not self.first_status.done():
                return None  # still busy loading: taken as loaded
            # It refused, or its status pipe closed without a word: it is ending now (or
            # it is no runner of ours, and goes on: taken as loaded).
            with contextlib.suppress(*TIMEOUTS):
                await asyncio.wait_for(proc.wait(), LOAD_GRACE)
            if proc.returncode is None:
                return None
        await proc.wait()
        await self._stderr_done()
        await self._status_done()
        if self.corrupt:
            return f"corrupt result stream ({self.corrupt}); killed"
        return self._exit_reason(proc.returncode)

    async def stop(self) -> None:
        """Kill the port (SIGKILL) and reap it; nothing is reported."""
        self.stopping = True
        self._disarm()
        while True:
            proc = self.proc
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            if proc is not None:
                await proc.wait()
            watcher = self.watcher
            if watcher is not None and not watcher.done():  # nothing it would still do is wanted
                watcher.cancel()
                await asyncio.wait([watcher])
            for reader in (self.stderr_task, self.status_task):
                if reader is not None and not reader.done():  # ends with the process; unless a
                    await asyncio.wait([reader], timeout=2.0)  # grandchild holds the pipe
                    reader.cancel()
            if self.proc is proc:  # a restart in flight made no new process meanwhile
                return

    # -- tasks in, results out --------------------------------------------------------

    def send_tasks(self, data: memoryview) -> None:
        seqs = []
        pos, end = 0, len(data)
        while end - pos >= HEADER_LEN:
            magic, seq, _attempt, _size, data_len = TASK_HEADER.unpack_from(data, pos)
            if magic != TASK_MAGIC:
                break  # the port will refuse the frame (exit 2): PORT_DIED says so
            seqs.append(seq)
            pos += HEADER_LEN + data_len
        proc = self.proc
        if proc is None or proc.returncode is not None or proc.stdin is None or proc.stdin.is_closing():
            # A dead port, or one being started again: these tasks reach no process, so they
            # are owed by none (PORT_DIED must name the task the process really ran), and the
            # scheduler, which counted them in flight on this port, requeues them when it hears
            # of the death.
            return
        if seqs and not self.pending:
            self.head_since = asyncio.get_running_loop().time()
        self.pending.extend(seqs)
        proc.stdin.write(data)
        self._arm()

    def _complete(self, buffer: bytearray) -> int:
        """The length of the complete result frames at the start of ``buffer``; their
        seqs are no longer owed.  A corrupt frame sets ``corrupt`` and ends the count."""
        pos, end = 0, len(buffer)
        pending = self.pending
        while end - pos >= HEADER_LEN:
            magic, seq, status, _elapsed, length = RESULT_HEADER.unpack_from(buffer, pos)
            if magic != RESULT_MAGIC or status > frames.STATUS_FAILED or length > frames.MAX_OUTPUT:
                self.corrupt = f"bad result header (magic {bytes(magic)!r}, status {status}, length {length})"
                break
            if pos + HEADER_LEN + length > end:
                break
            pos += HEADER_LEN + length
            if pending and pending[0] == seq:
                pending.popleft()
            elif seq in pending:
                pending.remove(seq)
            else:
                self.agent.log(f"port {self.index}: result for seq {seq}, which it was not sent")
        if pos:
            self.head_since = asyncio.get_running_loop().time()
        return pos

    async def _watch(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        buffer = bytearray()
        while not self.corrupt:
            chunk = await proc.stdout.read(READ_CHUNK)
            if not chunk:
                break
            buffer += chunk
            done = self._complete(buffer)
            if done:
                # the temporary view is gone when port_message returns, so the del works
                self.agent.send(protocol.port_message(RESULTS, self.index, memoryview(buffer)[:done]))
                del buffer[:done]
                self._arm()
                await self.agent.drain()
        if self.corrupt and proc.returncode is None:  # frames we cannot trust: the port goes
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await proc.wait()
        if self.stopping or self.loading:
            return
        self._disarm()
        await self._stderr_done()
        await self._status_done()
        if self.stopping:
            return
        rc = proc.returncode
        assert rc is not None
        seq = self.pending[0] if self.pending else None
        if self.timed_out is not None:
            reason = f"task {self.timed_out} ran past its timeout of {self.timeout:g} s (killed)"
        elif self.corrupt:
            reason = f"corrupt result stream ({self.corrupt}); killed"
        else:
            reason = self._exit_reason(rc)
        self.agent.log(f"port {self.index} ({self.work}) died: {reason}; task in flight: {seq}")
        self.agent.send(protocol.control(PORT_DIED, port=self.index, seq=seq, reason=reason))
        cannot_load = (self.runner_said is not None and self.runner_said[0] == STATUS_REFUSED) or (
            not self.ready and not self.corrupt and self.timed_out is None and rc >= 0)
        if cannot_load:
            self.agent.log(f"port {self.index} cannot load its library; not restarting it")
            self.agent.forget_port(self)
            return
        if seq is None and time.monotonic() - self.started_at < QUICK_DEATH:
            self.quick_deaths += 1  # dying with nothing to do: restart ever more slowly
            await asyncio.sleep(min(RESTART_CAP, 0.1 * 2 ** min(self.quick_deaths - 1, 8)))
        else:
            self.quick_deaths = 0
        if self.stopping:
            return
        try:
            await self.start()
        except OSError as exc:
            self.agent.log(f"port {self.index}: cannot start again: {exc}")
            self.agent.forget_port(self)
            return
        self.agent.send(protocol.control(PORT_READY, port=self.index))

    def _exit_reason(self, rc: int) -> str:
        """Why the port ended: the runner's own word when it gave one, else the work's doing
        (after ``ready``) or a death while loading the library (before it)."""
        said = self.runner_said
        if said is not None and said[0] == STATUS_REFUSED:
            return f"the port runner refused the library: {said[1]}"
        if said is not None:
            return f"the port runner failed: {said[1]}"
        how = frames.describe_exit(rc)
        if not self.ready:
            reason = f"the port ended while loading {self.library.name} ({how}), before its runner checked it"
            return reason + (f"; its last stderr line: {self.last_stderr}" if self.last_stderr else "")
        if rc < 0:
            return how  # killed by SIGSEGV, SIGABRT, ...: a crash of the work (or the agent's kill)
        reason = f"the work exited with status {rc}"
        return reason + (f"; its last stderr line: {self.last_stderr}" if self.last_stderr else "")

    # -- the runner's status channel --------------------------------------------------------

    async def _read_status(self, fd: int, first: asyncio.Future[None]) -> None:
        """Read the runner's status lines until the pipe ends (the runner exited)."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=8192)
        pipe = os.fdopen(fd, "rb", buffering=0)
        try:
            transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
        except BaseException:
            pipe.close()
            if not first.done():
                first.set_result(None)
            raise
        try:
            while True:
                try:
                    raw = await reader.readline()
                except ValueError:  # a line past the limit: not our runner's
                    raw = b"error an overlong status line\n"
                if not raw:
                    break
                word, _, message = raw.decode("utf-8", "replace").rstrip("\n").partition(" ")
                if word == STATUS_READY:
                    self.ready = True
                elif word in (STATUS_REFUSED, STATUS_ERROR) and self.runner_said is None:
                    self.runner_said = (word, message[:1000])
                if not first.done():
                    first.set_result(None)
        finally:
            transport.close()
            if not first.done():
                first.set_result(None)

    async def _status_done(self) -> None:
        task = self.status_task
        if task is not None and not task.done():
            with contextlib.suppress(*TIMEOUTS):  # a grandchild may hold the pipe open: stop waiting
                await asyncio.wait_for(asyncio.shield(task), 1.0)

    # -- stderr ---------------------------------------------------------------------------

    async def _drain_stderr(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        partial = b""
        while True:
            chunk = await proc.stderr.read(65536)
            if not chunk:
                break
            lines = (partial + chunk).split(b"\n")
            partial = lines.pop()
            if len(partial) > 4096:
                lines.append(partial)
                partial = b""
            for line in lines:
                self._stderr_line(line)
        if partial:
            self._stderr_line(partial)
        start, logged, dropped = self._window
        if dropped:
            self.agent.log(f"port {self.index} stderr: ... {dropped} more line(s) not logged")
            self._window = (start, logged, 0)

    def _stderr_line(self, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip()[:500]
        if not text:
            return
        self.last_stderr = text
        now = time.monotonic()
        start, logged, dropped = self._window
        if now - start > 10.0:
            if dropped:
                self.agent.log(f"port {self.index} stderr: ... {dropped} more line(s) not logged")
            start, logged, dropped = now, 0, 0
        if logged < STDERR_LINES_PER_WINDOW:
            self.agent.log(f"port {self.index} stderr: {text}")
            logged += 1
        else:
            dropped += 1
        self._window = (start, logged, dropped)

    async def _stderr_done(self) -> None:
        task = self.stderr_task
        if task is not None and not task.done():
            with contextlib.suppress(*TIMEOUTS):  # a grandchild may hold stderr open: stop waiting
                await asyncio.wait_for(asyncio.shield(task), 1.0)

    # -- task timeout ---------------------------------------------------------------------

    def _arm(self) -> None:
        if self.timeout and self.pending and self.timer is None and not self.stopping:
            loop = asyncio.get_running_loop()
            self.timer = loop.call_at(self.head_since + self.timeout, self._check_timeout)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _check_timeout(self) -> None:
        self.timer = None
        proc = self.proc
        if not self.pending or self.stopping or proc is None or proc.returncode is not None or not self.timeout:
            return
        loop = asyncio.get_running_loop()
        due = self.head_since + self.timeout
        if loop.time() < due:
            self.timer = loop.call_at(due, self._check_timeout)
            return
        self.timed_out = self.pending[0]
        self.agent.log(f"port {self.index}: task {self.timed_out} ran past {self.timeout:g} s; killing the port")
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
