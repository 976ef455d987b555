"""The supervisor and the commands around it: ``supervise``, ``status``, ``ensure``, ``stop``.

Standard library only, and light: no asyncio, no ssl (it starts in a few milliseconds
during bootstrap).  On a node::

    python3 -m orch_agent ensure --config ~/orch/agent/agent.json   # "running" or "started"
    python3 -m orch_agent status --config ~/orch/agent/agent.json   # exit 0 while supervised
    python3 -m orch_agent stop --config ~/orch/agent/agent.json

``supervise`` writes its pid to ``agent.pid`` beside agent.json (and the digest of the
agent code and config it runs to ``agent.code``), runs the agent (``run``) as a forked
child in a process group of its own, and starts it again 0.5 s after it dies (5 s while
it keeps dying within seconds of starting).  ``ensure`` becomes the supervisor by
forking too (its command line then says ``ensure``): one Python start-up per node.
When the child dies, whatever is left of its group (the ports of a SIGKILLed agent) is
killed, and so are the commands it was running (EXEC): the supervisor is a child
subreaper, so the agent's orphans become its children, and each orphaned ``/bin/sh -c``
session leader (an EXEC's shell) has its process group killed.  It reaps every child
it adopts.  SIGTERM ends the child, then the supervisor.  The child watches its parent, so
a SIGKILLed supervisor leaves no agent behind either.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time

from .config import PARENT_ENV, POKE, TYPE_CHECKING, Config, Log

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, NoReturn

PID_FILE = "agent.pid"
CODE_FILE = "agent.code"
LOCK_FILE = "agent.lock"  # held by the running supervisor: never two per node
ENSURE_LOCK = ".ensure.lock"  # held by ``ensure`` while it looks and starts
RESTART_DELAY = 0.5
CRASH_LOOP = (5, 10.0, 5.0)  # this many restarts within this many seconds: wait this long
STOP_GRACE = 5.0
PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


def package_dir() -> str:
    return os.path.dirname(os.path.realpath(__file__))


def code_digest(config_path: str) -> str:
    """sha256 over the agent's modules and its config: what a running supervisor runs."""
    import hashlib  # here: the OpenSSL load is not needed for status or stop

    digest = hashlib.sha256()
    folder = package_dir()
    for name in sorted(n for n in os.listdir(folder) if n.endswith(".py")):
        digest.update(name.encode() + b"\0" + _read(os.path.join(folder, name)) + b"\0")
    digest.update(_read(config_path))
    return digest.hexdigest()


def _read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def _text(path: str) -> str:
    with open(path) as fh:
        return fh.read()


def _write(path: str, text: str) -> None:
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as fh:
        if fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return False
    return True


def running_supervisor(folder: str) -> int | None:
    """The pid in ``agent.pid`` when it is a live supervisor (not a reused pid)."""
    try:
        pid = int(_text(os.path.join(folder, PID_FILE)).split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if not _alive(pid):
        return None
    args = _cmdline(pid).split(b"\0")
    if args != [b""] and b"supervise" not in args and b"ensure" not in args:  # a reused pid
        return None
    return pid


def _describe(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited {code}"


def supervise(config_path: str) -> int:
    """Run the agent as a child until SIGTERM; start it again when it dies."""
    config_path = os.path.realpath(config_path)
    cfg = Config.load(config_path)
    folder = os.path.dirname(config_path)
    log = Log(cfg.log)
    pid_file = os.path.join(folder, PID_FILE)
    state: dict[str, Any] = {"stop": False, "child": None}

    def on_signal(signum: int, frame: object) -> None:
        state["stop"] = True
        child = state["child"]
        if child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)

    def on_poke(signum: int, frame: object) -> None:
        child = state["child"]
        if child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    lock = _lock(os.path.join(folder, LOCK_FILE), wait=False)
    if lock is None:
        log(f"another supervisor holds {os.path.join(folder, LOCK_FILE)}; this one ({os.getpid()}) ends")
        return 1
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)
    signal.signal(getattr(signal, POKE), on_poke)
    _write(os.path.join(folder, CODE_FILE), code_digest(config_path) + "\n")
    _write(pid_file, f"{os.getpid()}\n")
    if not _become_subreaper():
        log("cannot become a child subreaper: a SIGKILLed agent's commands would outlive it")
    log(f"supervisor started (pid {os.getpid()})")
    starts: list[float] = []  # the latest few starts
    try:
        while not state["stop"]:
            pid = _fork_agent(config_path, lock)
            state["child"] = pid
            starts = [*starts[1 - CRASH_LOOP[0]:], time.monotonic()]
            if state["stop"]:  # SIGTERM came while we started it
                os.kill(pid, signal.SIGTERM)
            status = _wait_for(pid)
            state["child"] = None
            _kill_group(pid)
            _kill_orphaned_execs(log)
            if state["stop"]:
                break
            delay = RESTART_DELAY
            if len(starts) == CRASH_LOOP[0] and time.monotonic() - starts[0] < CRASH_LOOP[1]:
                delay = CRASH_LOOP[2]
            log(f"agent (pid {pid}) {_describe(status)}; starting it again in {delay:g} s")
            deadline = time.monotonic() + delay
            while not state["stop"] and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        child = state["child"]
        if child is not None:
            _end(child)
            _kill_group(child)
        _kill_orphaned_execs(log)
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(_text(pid_file).split()[0]) == os.getpid():
                os.unlink(pid_file)
        log(f"supervisor stopped (pid {os.getpid()})")
    return 0


def _lock(path: str, *, wait: bool) -> int | None:
    """An exclusive flock on ``path`` (a descriptor to keep open), or None when another
    process holds it and ``wait`` is false."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError:
        os.close(fd)
        return None
    return fd


def _fork_agent(config_path: str, lock: int) -> int:
    """The agent as a forked child in a session (and process group) of its own: no new
    interpreter to start, so a node's supervisor and agent cost one Python start-up."""
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return pid

    def agent() -> int:
        os.close(lock)  # the lock is the supervisor's alone
        os.setsid()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(getattr(signal, POKE), signal.SIG_IGN)  # until the agent listens for it
        os.environ[PARENT_ENV] = str(parent)
        from .launch import run

        return run(config_path)

    _child(agent)


def _child(body: Callable[[], int]) -> NoReturn:
    """A forked child's whole life: it must never return into its parent's code."""
    code = 70
    try:
        code = body()
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _become_subreaper() -> bool:
    """Orphans of our descendants become our children (not init's)."""
    try:
        import ctypes  # here: only the supervisor pays for it

        return int(ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _wait_for(pid: int) -> int:
    """Wait until child ``pid`` ends (its wait status), reaping the orphans we adopted
    (a detached command's processes, once they end) on the way."""
    while True:
        reaped, status = os.waitpid(-1, 0)
        if reaped == pid:
            return status


def _kill_orphaned_execs(log: Log) -> None:
    """SIGKILL the process group of each EXEC shell the agent left running (our adopted
    children that lead a session as ``/bin/sh -c``), and reap what ends at once.  What
    an earlier command left running on purpose (``nohup daemon &``, whose shell has
    ended) leads no session and stays, as it would after SSH."""
    me, killed = os.getpid(), set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        pid, ppid, session = int(name), int(fields[1]), int(fields[3])
        if ppid == me and session == pid and _cmdline(pid).startswith(b"/bin/sh\0-c\0"):
            _kill_group(pid)
            killed.add(pid)
    if killed:
        log(f"killed {len(killed)} command(s) the agent left running")
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:  # the killed shells (their members: the next _wait_for)
        try:
            reaped, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        killed.discard(reaped)
        if not killed:
            return
        if not reaped:
            time.sleep(0.02)


def _end(pid: int) -> None:
    """SIGTERM our child, SIGKILL it after STOP_GRACE, reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def status(config_path: str, *, current: bool = False) -> int:
    """0 when a supervisor runs (and, with ``current``, runs this code and config)."""
    folder = os.path.dirname(os.path.realpath(config_path))
    pid = running_supervisor(folder)
    if pid is None:
        print("not running")
        return 1
    if current and not _runs_current(config_path):
        print(f"running (pid {pid}) an older agent or config")
        return 3
    print(f"running (pid {pid})")
    return 0


def _runs_current(config_path: str) -> bool:
    try:
        recorded = _text(os.path.join(os.path.dirname(os.path.realpath(config_path)), CODE_FILE))
        return recorded.strip() == code_digest(config_path)
    except OSError:
        return False


def stop(config_path: str) -> int:
    """End the supervisor (and with it the agent and its ports)."""
    pid = running_supervisor(os.path.dirname(os.path.realpath(config_path)))
    if pid is None:
        print("not running")
        return 0
    _stop_pid(pid)
    print(f"stopped (pid {pid})")
    return 0


def _stop_pid(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 2 * STOP_GRACE
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def ensure(config_path: str, *, wait: float = 10.0) -> int:
    """Make sure a supervisor runs this agent code and config: prints ``running`` when
    one already does, else (after stopping an outdated one) starts one detached and
    prints ``started`` once it has written its pid."""
    config_path = os.path.realpath(config_path)
    cfg = Config.load(config_path)
    folder = os.path.dirname(config_path)
    lock = _lock(os.path.join(folder, ENSURE_LOCK), wait=True)  # two at once (bootstrap, a job) start one
    try:
        return _ensure(config_path, cfg, folder, wait)
    finally:
        if lock is not None:
            os.close(lock)


def _ensure(config_path: str, cfg: Config, folder: str, wait: float) -> int:
    pid = running_supervisor(folder)
    if pid is not None and _runs_current(config_path):
        with contextlib.suppress(OSError):
            os.kill(pid, getattr(signal, POKE))  # a scheduler may have just started: dial it now
        print("running")
        return 0
    if pid is not None:
        _stop_pid(pid)
    os.makedirs(os.path.dirname(cfg.log), exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child == 0:  # the supervisor: detached, in a session of its own, stdio to the log

        def detached() -> int:
            os.setsid()
            null = os.open(os.devnull, os.O_RDONLY)
            out = os.open(cfg.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            os.dup2(null, 0)
            os.dup2(out, 1)
            os.dup2(out, 2)
            os.closerange(3, 256)  # nothing of the SSH session stays open
            return supervise(config_path)

        _child(detached)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        done, status_ = os.waitpid(child, os.WNOHANG)
        if done:
            print(f"the supervisor {_describe(status_)} at once; see {cfg.log}")
            return 1
        if running_supervisor(folder) == child:
            print("started")
            return 0
        time.sleep(0.005)
    print(f"the supervisor (pid {child}) did not start within {wait:g} s; see {cfg.log}")
    return 1
