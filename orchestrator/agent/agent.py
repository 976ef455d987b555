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
  sha256 is LOAD_FAILED ``missing``; a port that exits at once (it could not load the
  library or find the function) is LOAD_FAILED with the port's own reason.
- RELEASE installs a release: checked against its sha256, unpacked safely into
  ``releases/NAME``, built, then marked with ``.orch-sha256``.
- TASKS are written to the port's stdin unchanged; only the 28-byte headers are read,
  to remember which seqs the port owes.  The port's stdout is read in large chunks and
  every complete result frame available is relayed in one RESULTS message.
- When a port dies, every result it wrote is relayed first, then PORT_DIED names the
  first seq sent without a result, then the port is started again: PORT_READY.  A port
  that ends because it cannot load its library (exit 3, 4 or 5) is not restarted.
- A task that runs past the work's ``task_timeout`` (counted from when it was sent or,
  if later, from the previous result) gets its port SIGKILLed.
- EXEC runs a shell command at once (a task of its own, beside everything else) in a
  session of its own, reading its stdout and stderr through pipes the loop watches
  (capped, the rest dropped); past its timeout, or when the connection ends, its whole
  process group is SIGKILLed.  EXEC_DONE answers it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import io
import os
import random
import re
import shutil
import signal
import ssl
import stat
import subprocess
import tarfile
import time
import traceback
from pathlib import Path
from typing import Any

from . import frames, protocol
from .config import PARENT_ENV, POKE, Config, ConfigError, Log
from .frames import HEADER_LEN, RESULT_HEADER, RESULT_MAGIC, TASK_HEADER, TASK_MAGIC
from .launch import build_port
from .protocol import (
    ERROR,
    EXEC,
    EXEC_DONE,
    HEARTBEAT,
    HELLO,
    KIND_NAMES,
    LOAD,
    LOAD_FAILED,
    LOADED,
    PORT_DIED,
    PORT_READY,
    PROTOCOL_VERSION,
    RELEASE,
    RESULTS,
    SCHEDULER_NAME,
    TASKS,
    UNLOAD,
    WELCOME,
    ProtocolError,
)

SHA_FILE = ".orch-sha256"
READ_CHUNK = 1 << 20
LOST_AFTER = 3  # heartbeat intervals of silence
LOAD_GRACE = 0.5  # longest wait for a new port to show it loaded its library
QUICK_DEATH = 1.0  # a port that dies this soon after starting, with no task, is restarted
RESTART_CAP = 5.0  # ... after 0.1 s, doubling up to this
CONNECT_TIMEOUT = 10.0
BUILD_TIMEOUT = 900.0
LOAD_EXITS = (frames.EXIT_ABI_MISMATCH, frames.EXIT_NO_FUNCTION, frames.EXIT_NO_LIBRARY)
STDERR_LINES_PER_WINDOW = 20  # per port, logged per 10 s; the rest is counted
_RELEASE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
TIMEOUTS = (asyncio.TimeoutError, TimeoutError)  # one class from Python 3.11, two before


class SessionEnded(Exception):
    """The connection with the scheduler is over (the message says why)."""


# -- releases -----------------------------------------------------------------------------


def installed_releases(folder: Path) -> list[dict[str, str]]:
    """The release folders with a finished build: [{release, sha256}]."""
    found = []
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return []
    for entry in entries:
        try:
            sha = (entry / SHA_FILE).read_text().strip()
        except OSError:
            continue
        if _SHA256.match(sha):
            found.append({"release": entry.name, "sha256": sha})
    return found


def release_folder(releases: Path, name: Any) -> Path:
    if not isinstance(name, str) or not _RELEASE_NAME.match(name) or name.endswith(".new"):
        raise ValueError(f"{name!r} is not a release folder name")
    return releases / name


def is_installed(folder: Path, sha256: str) -> bool:
    try:
        return (folder / SHA_FILE).read_text().strip() == sha256
    except OSError:
        return False


def unpack_release(tarball: bytes | memoryview, sha256: str, dest: Path) -> None:
    """Check ``tarball`` against ``sha256`` and unpack it into ``dest`` (replacing it),
    stripping the top folder as ``tar --strip-components=1`` does.  Refuses members
    that are absolute, climb out with ``..``, link out of ``dest``, or are devices."""
    data = bytes(tarball)
    found = hashlib.sha256(data).hexdigest()
    if found != sha256:
        raise ValueError(f"tarball sha256 is {found}, not {sha256}")
    staging = dest.with_name(dest.name + ".new")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            members = [m for m in (_stripped(m) for m in tar.getmembers()) if m is not None]
            root = os.path.realpath(staging)
            for member in members:
                _check_member(member, root)
                if hasattr(tarfile, "data_filter"):
                    tar.extract(member, staging, filter="data")
                else:  # Python < 3.11.4: the checks above are the filter
                    tar.extract(member, staging, set_attrs=not member.issym())
                    _check_landed(staging / member.name, root)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _stripped(member: tarfile.TarInfo) -> tarfile.TarInfo | None:
    parts = [p for p in member.name.split("/") if p not in ("", ".")]
    if member.name.startswith("/"):
        raise ValueError(f"absolute path in the tarball: {member.name!r}")
    if len(parts) <= 1:
        return None  # the top folder itself
    member.name = "/".join(parts[1:])
    if member.islnk():
        link = [p for p in member.linkname.split("/") if p not in ("", ".")]
        if member.linkname.startswith("/") or len(link) <= 1:
            raise ValueError(f"hard link {member.name!r} points outside the release")
        member.linkname = "/".join(link[1:])
    return member


def _check_member(member: tarfile.TarInfo, root: str) -> None:
    name = member.name
    if ".." in name.split("/"):
        raise ValueError(f"path climbs out of the release: {name!r}")
    if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
        raise ValueError(f"{name!r} is not a file, folder or link")
    target = os.path.realpath(os.path.join(root, name))
    if target != root and not target.startswith(root + os.sep):
        raise ValueError(f"{name!r} lands outside the release")
    if member.issym():
        if os.path.isabs(member.linkname):
            raise ValueError(f"symlink {name!r} -> {member.linkname!r} is absolute")
        resolved = os.path.realpath(os.path.join(root, os.path.dirname(name), member.linkname))
        if resolved != root and not resolved.startswith(root + os.sep):
            raise ValueError(f"symlink {name!r} -> {member.linkname!r} points outside the release")
    if member.islnk() and ".." in member.linkname.split("/"):
        raise ValueError(f"hard link {name!r} -> {member.linkname!r} climbs out of the release")
    member.mode = (member.mode & 0o755) | (0o700 if member.isdir() else 0o600)
    member.uid = member.gid = 0
    member.uname = member.gname = ""


def _check_landed(path: Path, root: str) -> None:
    parent = os.path.realpath(path.parent)
    if parent != root and not parent.startswith(root + os.sep):
        raise ValueError(f"{path.name!r} was written outside the release")
    with_mode = path.lstat()
    if stat.S_ISREG(with_mode.st_mode) and with_mode.st_mode & 0o6000:
        os.chmod(path, with_mode.st_mode & 0o755)


# -- ports ---------------------------------------------------------------------------------


def _wchan(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/wchan") as fh:
            return fh.read()
    except OSError:
        return ""


def _maps_hold(pid: int, library: str) -> bool:
    try:
        with open(f"/proc/{pid}/maps") as fh:
            return library in fh.read()
    except OSError:
        return False


class Port:
    """One port process and what it owes: the seqs sent to it without a result yet."""

    def __init__(self, agent: Agent, index: int, work: str, library: Path, function: str,
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

    # -- life ---------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.agent.cfg
        self.pending.clear()
        self.timed_out, self.corrupt, self.last_stderr = None, "", ""
        proc = await asyncio.create_subprocess_exec(
            str(cfg.port_binary), str(self.library), self.function, cfg.name,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            limit=READ_CHUNK, close_fds=True,
        )
        self.proc = proc
        self.started_at = time.monotonic()
        if self.stopping:  # stop() came while the process started: stop() waits for it
            proc.kill()
        self.stderr_task = asyncio.ensure_future(self._drain_stderr(proc))
        self.watcher = asyncio.ensure_future(self._watch(proc))

    async def loaded(self) -> str | None:
        """None once the port is past loading its library (blocked reading its first
        task), else why it ended.  Waits at most LOAD_GRACE; a port still busy then is
        taken as loaded (a late failure becomes a PORT_DIED)."""
        proc = self.proc
        assert proc is not None
        library = os.path.realpath(self.library)
        deadline = time.monotonic() + LOAD_GRACE
        mapped_at: float | None = None
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                break
            if "pipe" in _wchan(proc.pid):
                return None
            if mapped_at is None and _maps_hold(proc.pid, library):
                mapped_at = time.monotonic()
            elif mapped_at is not None and time.monotonic() - mapped_at > 0.05:
                return None
            await asyncio.sleep(0.002)
        if proc.returncode is None:
            return None
        await proc.wait()
        await self._stderr_done()
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
            stderr = self.stderr_task
            if stderr is not None and not stderr.done():  # ends with the process; unless a
                await asyncio.wait([stderr], timeout=2.0)  # grandchild holds the pipe
                stderr.cancel()
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
        if seqs and not self.pending:
            self.head_since = asyncio.get_running_loop().time()
        self.pending.extend(seqs)
        proc = self.proc
        if proc is not None and proc.returncode is None and proc.stdin is not None and not proc.stdin.is_closing():
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
        if rc in LOAD_EXITS:
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
        reason = frames.describe_exit(rc)
        if rc > 0 and self.last_stderr:
            reason += f": {self.last_stderr}"
        return reason

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


# -- remote commands (EXEC) -----------------------------------------------------------------


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


# -- the agent ---------------------------------------------------------------------------


class Agent:
    """The agent's state across connections: config, log, the ports of this session."""

    def __init__(self, cfg: Config, log: Log) -> None:
        self.cfg = cfg
        self.log = log
        self.releases = Path(cfg.releases)
        self.ports: dict[int, Port] = {}
        self.writer: asyncio.StreamWriter | None = None
        self.heartbeat = cfg.heartbeat
        self.retimed = asyncio.Event()  # set when the scheduler changes the heartbeat
        self.last_heard = 0.0
        self.stop_event = asyncio.Event()
        self.poked = asyncio.Event()  # POKE: a scheduler has just started; dial now
        self.wanting: dict[str, str] = {}  # release sha256 -> the work that asked for it
        self.install_failed: dict[str, str] = {}  # release sha256 -> why (this connection)
        self._port_build: asyncio.Future[str | None] | None = None
        self.execs: set[asyncio.Task[None]] = set()  # EXECs running (this connection)

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
            self.wanting.clear()
            self.install_failed.clear()  # a new connection may send the release again
            self.last_heard = asyncio.get_running_loop().time()
            self.send(protocol.control(
                HELLO, node=self.cfg.node, name=self.cfg.name, slots=self.cfg.slots,
                releases=installed_releases(self.releases), version=PROTOCOL_VERSION, pid=os.getpid(),
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
            await self.kill_execs()
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
                if port is None:
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
                self.start_exec(protocol.parse_control(kind, body))
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
                await self.load(protocol.parse_control(kind, body))
            elif kind == UNLOAD:
                await self.unload(protocol.parse_control(kind, body))
            else:
                header, tarball = protocol.parse_release(body)
                await self.install(header, tarball)
            await self.drain()

    # -- work ------------------------------------------------------------------------------

    async def load(self, msg: dict[str, Any]) -> None:
        work = str(msg.get("work", ""))
        sha = str(msg.get("sha256", ""))
        try:
            folder = release_folder(self.releases, msg.get("release"))
            indexes = [int(i) for i in msg.get("ports") or []]
            if any(i < 0 or i >= 1 << 16 for i in indexes) or len(set(indexes)) != len(indexes):
                raise ValueError(f"bad port indexes {indexes}")
            library = _inside(folder, str(msg.get("library", "")))
            function = str(msg.get("function", ""))
            if not function:
                raise ValueError("no function named")
            timeout = float(msg["task_timeout"]) if msg.get("task_timeout") else None
        except (TypeError, ValueError) as exc:
            self.send(protocol.control(LOAD_FAILED, work=work, missing=False, reason=f"bad LOAD: {exc}"))
            return
        not_built = await asyncio.shield(self.build_port_binary())
        if not_built:
            self.send(protocol.control(LOAD_FAILED, work=work, missing=False, reason=not_built))
            return
        if not is_installed(folder, sha) and sha in self.install_failed:  # the reason, not "missing"
            self.send(protocol.control(LOAD_FAILED, work=work, missing=False, reason=self.install_failed[sha]))
            return
        if not is_installed(folder, sha):
            self.wanting[sha] = work
            self.log(f"load {work}: release {folder.name} ({sha[:12]}) is not installed")
            self.send(protocol.control(LOAD_FAILED, work=work, missing=True,
                                       reason=f"release {folder.name} with sha256 {sha} is not installed"))
            return
        await asyncio.gather(*(self.ports[i].stop() for i in indexes if i in self.ports))
        ports = [Port(self, i, work, library, function, timeout) for i in indexes]
        for port in ports:
            self.ports[port.index] = port
            port.loading = True
        failure = ""
        try:
            await asyncio.gather(*(p.start() for p in ports))
            reasons = await asyncio.gather(*(p.loaded() for p in ports))
            failure = next((r for r in reasons if r), "")
        except OSError as exc:
            failure = f"cannot start {self.cfg.port_binary}: {exc}"
        if failure:
            await asyncio.gather(*(p.stop() for p in ports))
            for port in ports:
                self.forget_port(port)
            self.log(f"load {work} failed: {failure}")
            self.send(protocol.control(LOAD_FAILED, work=work, missing=False, reason=failure))
            return
        for port in ports:
            port.loading = False
            if port.proc is not None and port.proc.returncode is not None and port.watcher is not None \
                    and port.watcher.done():  # died between the check and now: report it like any death
                port.watcher = asyncio.ensure_future(port._watch(port.proc))
        self.log(f"loaded {work}: {folder.name} {function} on ports {indexes}")
        self.send(protocol.control(LOADED, work=work, ports=indexes))

    async def unload(self, msg: dict[str, Any]) -> None:
        work = str(msg.get("work", ""))
        ports = [p for p in self.ports.values() if p.work == work]
        await asyncio.gather(*(p.stop() for p in ports))
        for port in ports:
            self.forget_port(port)
        self.log(f"unloaded {work}: ports {sorted(p.index for p in ports)} stopped")

    async def install(self, header: dict[str, Any], tarball: memoryview) -> None:
        sha = str(header.get("sha256", ""))
        work = self.wanting.pop(sha, "")
        try:
            folder = release_folder(self.releases, header.get("release"))
            if not _SHA256.match(sha):
                raise ValueError(f"{sha!r} is not a sha256")
            build = header.get("build") or []
            if not isinstance(build, list) or not all(isinstance(c, str) for c in build):
                raise ValueError("build must be a list of shell commands")
        except ValueError as exc:
            self.send(protocol.control(LOAD_FAILED, work=work, missing=False, reason=f"bad RELEASE: {exc}"))
            return
        self.install_failed.pop(sha, None)
        self.log(f"installing {folder.name} ({sha[:12]}, {len(tarball)} bytes)")
        try:
            self.releases.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(unpack_release, tarball, sha, folder)
            for command in build:
                await self._build(folder, command)
            (folder / SHA_FILE).write_text(sha + "\n")
        except (OSError, ValueError, tarfile.TarError, EOFError, RuntimeError) as exc:
            reason = f"installing {folder.name} failed: {exc}"
            self.install_failed[sha] = reason
            self.log(reason)
            self.send(protocol.control(LOAD_FAILED, work=work, missing=False, reason=reason))
            return
        self.log(f"installed {folder.name} ({sha[:12]})")

    async def _build(self, folder: Path, command: str) -> None:
        env = dict(os.environ, ORCH_INCLUDE=str(self.cfg.include))
        proc = await asyncio.create_subprocess_shell(
            command, cwd=str(folder), env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        try:
            output, _ = await asyncio.wait_for(proc.communicate(), BUILD_TIMEOUT)
        except BaseException:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            raise
        text = output.decode("utf-8", "replace").strip()
        for line in text.splitlines()[-20:]:
            self.log(f"build {folder.name}: {line}")
        if proc.returncode != 0:
            tail = text.splitlines()[-1] if text else "no output"
            raise RuntimeError(f"`{command}` exited {proc.returncode}: {tail}")

    # -- the port runner ----------------------------------------------------------------------

    def build_port_binary(self) -> asyncio.Future[str | None]:
        """The port runner built from ``port_source`` unless it is current (``launch``
        built it before the agent dialed; a build that failed is tried again at each
        LOAD).  Resolves to None when ready, else why not."""
        if self._port_build is None or (self._port_build.done() and self._port_build.result() is not None):
            self._port_build = asyncio.ensure_future(self._build_port())
        return self._port_build

    async def _build_port(self) -> str | None:
        return await asyncio.to_thread(build_port, self.cfg, self.log)

    # -- remote commands -----------------------------------------------------------------------

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
            self.log(f"exec {ident!r}: internal error: {exc!r}: {' | '.join(traceback.format_exc().splitlines()[-4:])}")
            result = {"exit": None, "stdout": "", "stderr": "", "truncated": False, "seconds": 0.0,
                      "reason": f"internal error in the agent: {exc!r}"}
        outcome = result["reason"] or f"exit {result['exit']}"
        self.log(f"exec {ident!r} `{shown}`: {outcome} after {result['seconds']:g} s")
        self.send(protocol.control(EXEC_DONE, id=ident, **result))
        await self.drain()

    async def kill_execs(self) -> None:
        """SIGKILL the process group of every running EXEC and reap it; nothing is sent."""
        running = list(self.execs)
        self.execs.clear()
        for task in running:
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)
            self.log(f"killed {len(running)} running command(s)")

    async def kill_ports(self) -> None:
        ports = list(self.ports.values())
        self.ports.clear()
        if ports:
            await asyncio.gather(*(p.stop() for p in ports))
            self.log(f"killed ports {sorted(p.index for p in ports)}")


def _inside(folder: Path, relative: str) -> Path:
    if not relative or relative.startswith("/") or ".." in relative.split("/"):
        raise ValueError(f"library {relative!r} must be a path inside the release")
    return folder / relative


def _common_name(cert: Any) -> str:
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return ""


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "closed"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "the scheduler closed the connection"
    if isinstance(exc, TIMEOUTS):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if isinstance(exc, OSError) and not isinstance(exc, ssl.SSLError) else text


# -- entry point -----------------------------------------------------------------------------


async def _main(cfg: Config, log: Log) -> None:
    agent = Agent(cfg, log)
    agent.build_port_binary()
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
        await agent.kill_execs()
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
