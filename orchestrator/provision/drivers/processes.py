"""The process table of sshd nodes: finding, starting, reaping and ending a node's processes.

Shared by the ``local`` and ``netns`` drivers, whose nodes are ``sshd`` processes of
this machine.  This module owns:

- ``SSHD`` and the command line a node's sshd runs (``sshd_argv``): sshd retitles
  itself ``sshd: /usr/sbin/sshd -D -e -f CONFIG ...``, so that title is how a node's
  sshd is recognised (``find_sshd``, ``sshd_alive``) without trusting a pid alone;
- ``ENV_MARKER``: the ``ORCH_NODE_ID=<id>`` every process of a node carries in its
  environment (sshd's ``SetEnv``), which finds the commands orphaned by ``nohup ... &``;
- reading ``/proc`` (``proc_table``, ``node_processes``), telling a live process from
  one whose pid was reused (``start_time``, ``survivors``, ``this_process``,
  ``process_alive``) and ending a node's processes (``end_processes``);
- spawning sshd with ``posix_spawn`` (``spawn``: not Popen, a node outlives the Popen),
  reaping it (``reap``), and waiting until it listens (``wait_for_sshd``).

Why the killing is done this way: sshd puts every connection and every command in a
session of its own, so killing sshd's process group misses them.  A node's processes are
its sshd (by config path in its title), every process carrying its env marker, and all
their descendants; each is remembered with its start time so that a reused pid is left
alone.

Nothing here raises a driver's error: a function that can fail says why (a message, or
the processes that survived), and the driver raises its own error class with it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SSHD = "/usr/sbin/sshd"
ENV_MARKER = "ORCH_NODE_ID"
POLL = 0.005  # seconds between readiness / exit checks
GRACE = 1.0  # seconds between SIGTERM and SIGKILL

_LOG_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND
# The sshd processes this process spawned, kept only to reap them (no zombies).  Not
# state: nodes are found on disk.  posix_spawn, not Popen: a node outlives the Popen.
_spawned: set[int] = set()
_spawned_lock = threading.Lock()


def sshd_argv(node_dir: Path) -> list[str]:
    """The command line of the node's sshd; its title (and so ``find_sshd``) shows it."""
    return [SSHD, "-D", "-e", "-r", "-f", str(node_dir / "sshd_config")]


# -- spawning and reaping ----------------------------------------------------------------


def spawn(argv: list[str], env: dict[str, str], log: Path) -> int:
    """Start ``argv`` (``argv[0]`` an absolute path) in a session and process group of its
    own, with ``env`` as its whole environment, stdin from /dev/null and stdout and
    stderr appended to ``log`` (made 0600); return its pid, which ``reap`` collects."""
    with _spawned_lock:
        pid = os.posix_spawn(
            argv[0],
            argv,
            env,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                (os.POSIX_SPAWN_OPEN, 1, str(log), _LOG_FLAGS, 0o600),
                (os.POSIX_SPAWN_DUP2, 1, 2),
            ],
            setsid=True,  # its own session and process group
        )
        _spawned.add(pid)
    return pid


def reap(pid: int) -> int | None:
    """Collect the exit of an sshd this process spawned: its exit code once it has ended,
    None while it runs or when it is not our child."""
    with _spawned_lock:
        if pid not in _spawned:
            return None
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # reaped elsewhere: ended, status unknown
            _spawned.discard(pid)
            return -1
        if done == 0:
            return None
        _spawned.discard(pid)
        return os.waitstatus_to_exitcode(status)


def wait_for_sshd(
    pid: int, node_id: str, address: str, port: int, log: Path, *, timeout: float, connect_timeout: float
) -> str | None:
    """Wait until the spawned sshd ``pid`` of node ``node_id`` accepts connections on
    ``address:port``: None once it does, else why not (it exited, or did not listen
    within ``timeout`` seconds), with the end of its ``log``, for the driver's error."""
    deadline = time.monotonic() + timeout
    while True:
        exited = reap(pid)
        if exited is not None:
            return f"sshd of node {node_id} exited with {exited}: {_tail(log)}"
        with contextlib.suppress(OSError), socket.create_connection((address, port), connect_timeout):
            return None
        if time.monotonic() > deadline:
            return f"sshd of node {node_id} did not listen on {address}:{port} within {timeout}s: {_tail(log)}"
        time.sleep(POLL)


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(empty log)"


# -- telling processes apart -------------------------------------------------------------


def start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot, from /proc/PID/stat), or None when
    it is gone or a zombie: with the pid, it names one process, never a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


def this_process() -> dict[str, int]:
    """This process, as a pid and its start time (so that a reused pid is told apart)."""
    return {"pid": os.getpid(), "start": start_time(os.getpid()) or 0}


def process_alive(identity: dict[str, Any]) -> bool:
    """Whether the process ``this_process()`` returned (read back from a record) still runs."""
    pid, start = identity.get("pid"), identity.get("start")
    return isinstance(pid, int) and pid > 0 and start_time(pid) == start


def find_sshd(node_dir: Path) -> int | None:
    """The pid of the node's sshd, found by its command line (sshd retitles itself
    "sshd: /usr/sbin/sshd -D -e -f CONFIG ..."), or None."""
    argv = " ".join(sshd_argv(node_dir)).encode()
    with os.scandir("/proc") as entries:  # closed when we return from inside the loop
        for entry in entries:
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    cmdline = Path(f"/proc/{entry.name}/cmdline").read_bytes().replace(b"\0", b" ")
                    if argv in cmdline and start_time(int(entry.name)) is not None:
                        return int(entry.name)
    return None


def sshd_alive(node_dir: Path, pid: int | None) -> bool:
    """Whether ``pid``, the node's recorded sshd, is still its sshd (a reused pid has
    another cmdline).

    Without a recorded pid (the creating process was killed right after it spawned
    sshd), the pid file sshd writes once it listens is asked.
    """
    pid = pid or _read_pid(node_dir / "sshd.pid")
    if not pid:
        return False
    reap(pid)
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    # sshd retitles itself "sshd: /usr/sbin/sshd -D -e -f CONFIG [listener] ..."
    return " ".join(sshd_argv(node_dir)).encode() in cmdline.replace(b"\0", b" ")


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


# -- finding and ending a node's processes -----------------------------------------------


def proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, start time) of every process; zombies count as gone."""
    table: dict[int, tuple[int, int]] = {}
    with os.scandir("/proc") as entries:
        for entry in entries:
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    stat = Path(f"/proc/{entry.name}/stat").read_text()
                    fields = stat[stat.rfind(")") + 2 :].split()
                    if fields[0] not in ("Z", "X"):
                        table[int(entry.name)] = (int(fields[1]), int(fields[19]))
    return table


def survivors(known: dict[int, int]) -> dict[int, int]:
    """The processes of ``known`` (pid -> start time) still alive; reaps our own."""
    for pid in known:
        reap(pid)
    table = proc_table()
    return {pid: start for pid, start in known.items() if table.get(pid, (0, -1))[1] == start}


def node_processes(node_id: str, node_dir: Path) -> dict[int, int]:
    """pid -> start time of a node's processes: its sshd (by the config path under
    ``node_dir`` in its title), those whose environment has the node's marker, and all
    their descendants.  Never this process."""
    marker = f"{ENV_MARKER}={node_id}".encode()
    config = str(node_dir / "sshd_config").encode()
    table = proc_table()
    found: set[int] = set()
    for pid in table:
        if pid == os.getpid():
            continue
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()  # sshd retitles itself "sshd: ..."
            if cmdline.startswith((SSHD.encode(), b"sshd: ")) and config in cmdline:
                found.add(pid)
                continue
        with contextlib.suppress(OSError):
            if marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found.add(pid)
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    todo = list(found)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return {pid: table[pid][1] for pid in found}


def end_processes(find: Callable[[], dict[int, int]], *, graceful: bool, stop_first: bool) -> dict[int, int]:
    """End every process ``find()`` names (pid -> start time), asking again each round
    so that what they start meanwhile goes too: SIGTERM first when ``graceful``, then
    SIGKILL up to five times.

    With ``stop_first``, every process is SIGSTOPped before any is signalled: a machine
    dies at once, so none of its processes may see another die first (an sshd would
    report its shell's death).  Returns {} once all are gone, else the last processes
    signalled (some survive SIGKILL), for the driver's error.
    """
    known: dict[int, int] = {}  # pid -> start time, so that a reused pid is left alone
    for signum in ([signal.SIGTERM] if graceful else []) + [signal.SIGKILL] * 5:
        known = survivors(known) | find()
        if not known:
            return {}
        if stop_first:
            for pid in known:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGSTOP)
        for pid in known:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)
        deadline = time.monotonic() + (GRACE if signum == signal.SIGTERM else 2.0)
        while survivors(known) and time.monotonic() < deadline:
            time.sleep(POLL)
    return known if survivors(known) else {}
