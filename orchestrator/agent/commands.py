"""Remote commands on the node (EXEC): ``/bin/sh -c COMMAND`` in $HOME, stdin
/dev/null, a session of its own, stdout and stderr read through pipes the loop watches
(each capped, the rest read and dropped), its exit heard from its pidfd; past its
timeout, or when its connection ends, its whole process group is SIGKILLed.

``Commands`` is the agent's collaborator for them: it starts each EXEC as a task of its
own, answers it with EXEC_DONE, and kills every running one when the connection ends;
``run_exec`` is one EXEC."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
import traceback
from typing import TYPE_CHECKING, Any, Protocol

from . import protocol
from .errors import TIMEOUTS
from .errors import describe as _describe
from .protocol import EXEC_DONE

if TYPE_CHECKING:
    from .config import Log


class CommandsOwner(Protocol):
    """What the commands need of the agent that holds them."""

    log: Log

    def send(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...


class Commands:
    """The EXECs running on this connection, each a task of its own."""

    def __init__(self, agent: CommandsOwner) -> None:
        self.agent = agent
        self.execs: set[asyncio.Task[None]] = set()  # EXECs running (this connection)

    def start_exec(self, msg: dict[str, Any]) -> None:
        task = asyncio.ensure_future(self._exec(msg))
        self.execs.add(task)
        task.add_done_callback(self.execs.discard)

    async def _exec(self, msg: dict[str, Any]) -> None:
        ident = msg.get("id")
        shown = str(msg.get("command"))
        shown = shown if len(shown) <= 200 else shown[:200] + "..."
        try:
            result = await run_exec(msg)
        except Exception as exc:  # a bug: say so rather than leave the scheduler waiting
            self.agent.log(f"exec {ident!r}: internal error: {exc!r}: "
                           f"{' | '.join(traceback.format_exc().splitlines()[-4:])}")
            result = {"exit": None, "stdout": "", "stderr": "", "truncated": False, "seconds": 0.0,
                      "reason": f"internal error in the agent: {exc!r}"}
        outcome = result["reason"] or f"exit {result['exit']}"
        self.agent.log(f"exec {ident!r} `{shown}`: {outcome} after {result['seconds']:g} s")
        self.agent.send(protocol.control(EXEC_DONE, id=ident, **result))
        await self.agent.drain()

    async def kill_execs(self) -> None:
        """SIGKILL the process group of every running EXEC and reap it; nothing is sent."""
        running = list(self.execs)
        self.execs.clear()
        for task in running:
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)
            self.agent.log(f"killed {len(running)} running command(s)")


class _Capture:
    """One pipe read by the loop until EOF (or ``close``): at most ``cap`` bytes kept."""

    def __init__(self, fd: int, cap: int) -> None:
        self.fd, self.cap = fd, cap
        self.data = bytearray()
        self.dropped = 0
        self.loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = self.loop.create_future()
        os.set_blocking(fd, False)
        self.loop.add_reader(fd, self._readable)

    def _readable(self) -> None:
        try:
            chunk = os.read(self.fd, 65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self.close()
            return
        room = self.cap - len(self.data)
        if room > 0:
            self.data += chunk[:room]
        self.dropped += max(0, len(chunk) - max(room, 0))

    def close(self) -> None:
        if self.fd >= 0:
            self.loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1
        if not self.done.done():
            self.done.set_result(None)

    def text(self) -> str:
        return self.data.decode("utf-8", "replace")


def _killpg(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _exec_home() -> str:
    return os.environ.get("HOME") or os.path.expanduser("~")


def _exec_limits(msg: dict[str, Any]) -> tuple[str, float, int]:
    """(command, timeout, max_output) of an EXEC; raises ValueError."""
    command = msg.get("command")
    if not isinstance(command, str) or not command:
        raise ValueError("command must be a non-empty string")
    timeout = msg.get("timeout")
    timeout = protocol.EXEC_TIMEOUT if timeout is None else timeout
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < 1e9:
        raise ValueError(f"timeout {timeout!r} is not a positive number of seconds")
    cap = msg.get("max_output")
    cap = protocol.EXEC_MAX_OUTPUT if cap is None else cap
    if isinstance(cap, bool) or not isinstance(cap, int) or not 0 <= cap <= protocol.EXEC_OUTPUT_CAP:
        raise ValueError(f"max_output {cap!r} is not a byte count from 0 to {protocol.EXEC_OUTPUT_CAP}")
    return command, float(timeout), cap


class _Reaper:
    """A child's exit as a future: its ``returncode`` (negative for a signal) once reaped.

    The child's pidfd wakes the loop when it ends (no thread, no SIGCHLD handler); a
    kernel without pidfds (before 5.3) leaves a thread blocked in ``wait``."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.loop = asyncio.get_running_loop()
        self.done: asyncio.Future[int] = self.loop.create_future()
        self.fd = -1
        try:
            self.fd = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):
            waited = self.loop.run_in_executor(None, proc.wait)
            waited.add_done_callback(lambda f: self._settle(f.result()))
        else:
            self.loop.add_reader(self.fd, self._readable)

    def _readable(self) -> None:
        status = self.proc.poll()
        if status is not None:
            self.loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1
            self._settle(status)

    def _settle(self, status: int) -> None:
        if not self.done.done():
            self.done.set_result(status)


def _spawn_shell(command: str, home: str, stdout: int, stderr: int) -> subprocess.Popen[bytes]:
    """``/bin/sh -c command`` in ``home``, in a session (and process group) of its own,
    stdin /dev/null, signals as a login shell has them.  A plain Popen (vfork and exec)
    reaped by ``_Reaper`` costs the agent a fifth of an asyncio subprocess, whose
    transport, protocol and child-watcher thread make 32 execs CPU-bound on two cores.
    Raises OSError."""
    return subprocess.Popen(["/bin/sh", "-c", command], cwd=home, stdin=subprocess.DEVNULL, stdout=stdout,
                            stderr=stderr, start_new_session=True, close_fds=True)


async def run_exec(msg: dict[str, Any]) -> dict[str, Any]:
    """Run one EXEC; the EXEC_DONE fields but ``id``.  Cancelled, it SIGKILLs the
    command's process group (and reaps the shell) before it ends."""
    started = time.monotonic()

    def done(status: int | None, reason: str, out: _Capture | None = None,
             err: _Capture | None = None) -> dict[str, Any]:
        return {"exit": status, "stdout": out.text() if out else "", "stderr": err.text() if err else "",
                "truncated": bool((out and out.dropped) or (err and err.dropped)),
                "seconds": round(time.monotonic() - started, 3), "reason": reason}

    try:
        command, timeout, cap = _exec_limits(msg)
    except ValueError as exc:
        return done(None, f"bad EXEC: {exc}")
    home = _exec_home()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        proc = _spawn_shell(command, home, out_w, err_w)
    except OSError as exc:
        os.close(out_r)
        os.close(err_r)
        return done(None, f"cannot start /bin/sh in {home}: {_describe(exc)}")
    finally:
        os.close(out_w)
        os.close(err_w)
    shell = _Reaper(proc)
    pid = proc.pid
    out, err = _Capture(out_r, cap), _Capture(err_r, cap)
    everything = asyncio.gather(shell.done, out.done, err.done)
    try:
        try:
            await asyncio.wait_for(asyncio.shield(everything), timeout)
        except TIMEOUTS:
            _killpg(pid)
            await shell.done
            # the group is dead: what it wrote is still in the pipes, unless a process
            # that left the group holds them open
            with contextlib.suppress(*TIMEOUTS):
                await asyncio.wait_for(asyncio.shield(everything), 0.5)
            return done(None, f"timed out after {timeout:g} s", out, err)
    except BaseException:  # cancelled: the connection ended
        _killpg(pid)
        await asyncio.shield(shell.done)
        raise
    finally:
        out.close()
        err.close()
        everything.cancel()  # a no-op when finished; retrieves nothing
        with contextlib.suppress(BaseException):
            await everything
    rc = shell.done.result()
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = "?"
        return done(-1, f"killed by signal {-rc} ({name})", out, err)
    return done(rc, "", out, err)
