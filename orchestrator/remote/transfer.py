"""Files and folders to and from many nodes at once over SFTP (``orch push``, ``orch pull``).

**push** copies LOCAL (a file, or a folder with everything in it) to REMOTE on every node,
placed as ``scp -r`` places it: into REMOTE when REMOTE is a folder (or ends with ``/``),
else as REMOTE itself; missing parent folders are made.  **pull** copies REMOTE of every
node to ``LOCAL_DIR/NODE/NAME``, NAME being REMOTE's last component (REMOTE ``/`` fills
``LOCAL_DIR/NODE`` itself).  Relative remote paths, and ``~/...``, start at the login
folder (where SFTP starts).  Mode bits (``st_mode & 0o7777``) of files and folders are
kept; symbolic links are followed (their targets are copied), as scp does.

Nothing is half-written where it can be avoided: a new file or folder is written under a
hidden name beside it (``.NAME.orch-XXXXXXXX``) and renamed into place once complete; a
file that replaces another is written the same way and renamed over it, so the old one
stays whole until then.  A failure removes what was written under hidden names.

Two phases, each over all nodes in parallel: a **check** (connect through the pool, open
an SFTP channel, stat REMOTE; a pull also lists what it will read) and the **copy**.  When
REMOTE cannot take LOCAL on some node (a file where a folder is needed, ...) the whole
command is an :class:`~orchestrator.errors.InputError` before anything is written
anywhere.  Other failures (an unreachable node, a missing REMOTE on a pull, a full disk)
are the node's own: its :class:`NodeTransfer` carries the error and the others go on.

Speed: every node has an SFTP channel of its own on its pooled connection; writes are
pipelined (paramiko's ``set_pipelined``: no wait for each write's answer), reads
prefetched, and each request carries 255 KiB (OpenSSH's largest read, its
``SFTP_MAX_READ_LENGTH``) rather than paramiko's 32 KiB; files are read and written
1 MiB at a time.  Progress goes through :class:`TransferEvents` callbacks (bytes per
node), never to a screen.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import secrets
import socket
import stat
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import paramiko

from orchestrator.errors import InputError, OrchError, RemoteError
from orchestrator.remote.fanout import ssh_target
from orchestrator.remote.pool import SSHPool
from orchestrator.remote.ssh import NodeUnreachable, SSHTarget, map_ssh_errors
from orchestrator.state import NodeRecord
from orchestrator.workspace import Workspace

REQUEST_SIZE = 255 * 1024
"""Bytes per SFTP read or write request (OpenSSH answers reads up to 255 KiB; a server
that answers less is still read whole: paramiko asks again for what is missing)."""
BUFFER_SIZE = 1 << 20
"""Bytes read from a file before they are written to the other side."""
STALL_TIMEOUT = 60.0
"""Seconds a node may leave a transfer without an answer before it counts as unreachable."""
PARALLEL = 16
"""Nodes served at once (each by a thread of the pool)."""

_CONNECTION = (ConnectionError, TimeoutError, EOFError, socket.gaierror, paramiko.SSHException)


class TransferError(RemoteError):
    """A node's transfer failed on a file or folder: which one, and why."""


class _Conflict(InputError):
    """REMOTE (or, on a pull, the local destination) cannot take what is copied there."""


@dataclass(frozen=True)
class Entry:
    """One file or folder of a tree: its posix path inside the tree (``""``: the top)."""

    rel: str
    is_dir: bool
    mode: int  # permission bits only: st_mode & 0o7777
    size: int = 0


@dataclass(frozen=True)
class TransferEvents:
    """Progress callbacks, called from the pool's threads; all optional."""

    total: Callable[[str, int], None] = lambda node, nbytes: None  # bytes the node will move, once checked
    advance: Callable[[str, int], None] = lambda node, nbytes: None  # bytes just moved


@dataclass(frozen=True)
class NodeTransfer:
    """What one node's transfer did; ``error`` is None when it succeeded."""

    node: str
    source: str
    destination: str
    files: int = 0
    folders: int = 0
    bytes: int = 0
    seconds: float = 0.0
    error: OrchError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class TransferReport:
    """Node id -> its NodeTransfer, in the order the nodes were given."""

    nodes: dict[str, NodeTransfer]
    seconds: float

    @property
    def succeeded(self) -> dict[str, NodeTransfer]:
        return {k: v for k, v in self.nodes.items() if v.ok}

    @property
    def failed(self) -> dict[str, NodeTransfer]:
        return {k: v for k, v in self.nodes.items() if not v.ok}

    @property
    def bytes(self) -> int:
        return sum(t.bytes for t in self.nodes.values())


@dataclass
class _Job:
    """One node's side of a transfer, between the phases."""

    node: NodeRecord
    target: SSHTarget | None = None
    sftp: paramiko.SFTPClient | None = None
    error: OrchError | None = None
    conflict: _Conflict | None = None
    doing: str = "connecting"
    started: float = field(default_factory=time.monotonic)
    seconds: float = 0.0
    source: str = ""
    destination: str = ""  # where the copy ends up
    exists: bool = False  # the destination is there already: merged into / replaced
    parents: list[str] = field(default_factory=list)  # remote folders to make first (push)
    tree: list[Entry] = field(default_factory=list)
    moved: int = 0
    stop: threading.Event = field(default_factory=threading.Event)  # Ctrl-C: stop at the next MiB

    def check_stop(self) -> None:
        if self.stop.is_set():
            raise TransferError(f"node {self.node.id}: interrupted while {self.doing}")

    @property
    def ok(self) -> bool:
        return self.error is None and self.conflict is None

    def result(self) -> NodeTransfer:
        files = [e for e in self.tree if not e.is_dir]
        return NodeTransfer(self.node.id, self.source, self.destination, files=len(files) if self.ok else 0,
                            folders=len(self.tree) - len(files) if self.ok else 0, bytes=self.moved,
                            seconds=round(self.seconds, 3), error=self.error)


# -- paths and trees -------------------------------------------------------------------


def remote_path(text: str) -> tuple[str, bool]:
    """REMOTE as SFTP takes it (``~/x`` -> ``x``: relative paths start at the login
    folder), and whether it ends with ``/`` (then it must be a folder)."""
    if not text.strip():
        raise InputError("REMOTE is empty", hint="give a path on the nodes, e.g. data/ or /srv/app")
    into = text.endswith("/") and text.strip("/") != ""
    if text == "~" or text.startswith("~/"):
        text = "." + text[1:]
    elif text.startswith("~"):
        raise InputError(f"REMOTE {text!r}: ~user is not supported",
                         hint="use a path relative to the login folder, or an absolute one")
    return posixpath.normpath(text), into


def local_tree(path: Path) -> list[Entry]:
    """The files and folders under ``path`` (itself first, folders before what they hold),
    links followed; an InputError for what cannot be read or copied."""
    try:
        top = path.stat()
    except FileNotFoundError:
        raise InputError(f"LOCAL {path} does not exist", hint="give an existing file or folder") from None
    except OSError as exc:
        raise InputError(f"cannot read LOCAL {path}: {exc.strerror or exc}") from exc
    if stat.S_ISREG(top.st_mode):
        _check_readable(path)
        return [Entry("", False, stat.S_IMODE(top.st_mode), top.st_size)]
    if not stat.S_ISDIR(top.st_mode):
        raise InputError(f"LOCAL {path} is neither a file nor a folder", hint="push files and folders only")
    entries = [Entry("", True, stat.S_IMODE(top.st_mode))]

    def walk(folder: Path, rel: str, ancestors: frozenset[tuple[int, int]]) -> None:
        try:
            names = sorted(os.listdir(folder))
        except OSError as exc:
            raise InputError(f"cannot read the folder {folder}: {exc.strerror or exc}",
                             hint="every file and folder under LOCAL must be readable") from exc
        for name in names:
            full, sub = folder / name, f"{rel}/{name}" if rel else name
            try:
                st = full.stat()
            except OSError as exc:
                raise InputError(f"cannot read {full}: {exc.strerror or exc} (a broken link?)",
                                 hint="remove it or fix it; links are followed") from exc
            if stat.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key in ancestors:
                    raise InputError(f"{full} links back to a folder that holds it", hint="links are followed")
                entries.append(Entry(sub, True, stat.S_IMODE(st.st_mode)))
                walk(full, sub, ancestors | {key})
            elif stat.S_ISREG(st.st_mode):
                _check_readable(full)
                entries.append(Entry(sub, False, stat.S_IMODE(st.st_mode), st.st_size))
            else:
                raise InputError(f"{full} is neither a file nor a folder (a socket, a pipe, a device)",
                                 hint="push files and folders only")

    walk(path, "", frozenset({(top.st_dev, top.st_ino)}))
    return entries


def _check_readable(path: Path) -> None:
    if not os.access(path, os.R_OK):
        raise InputError(f"cannot read {path}: permission denied", hint="every file under LOCAL must be readable")


def _remote_tree(sftp: paramiko.SFTPClient, path: str, top: paramiko.SFTPAttributes, job: _Job) -> list[Entry]:
    """What a pull of ``path`` reads on one node (links followed), like :func:`local_tree`."""
    mode = top.st_mode or 0
    if stat.S_ISREG(mode):
        return [Entry("", False, stat.S_IMODE(mode), top.st_size or 0)]
    if not stat.S_ISDIR(mode):
        raise TransferError(f"node {job.node.id}: REMOTE {path} is neither a file nor a folder")
    entries = [Entry("", True, stat.S_IMODE(mode))]

    def walk(folder: str, rel: str, real: str, ancestors: frozenset[str]) -> None:
        job.doing = f"listing {folder}"
        for attr in sorted(sftp.listdir_attr(folder), key=lambda a: a.filename):
            full, sub = posixpath.join(folder, attr.filename), f"{rel}/{attr.filename}" if rel else attr.filename
            sub_real = posixpath.join(real, attr.filename)
            if stat.S_ISLNK(attr.st_mode or 0):
                job.doing = f"following the link {full}"
                try:
                    attr = sftp.stat(full)
                except FileNotFoundError:
                    raise TransferError(f"node {job.node.id}: {full} is a broken link") from None
                sub_real = sftp.normalize(full)
            kind = attr.st_mode or 0
            if stat.S_ISDIR(kind):
                if sub_real in ancestors:
                    raise TransferError(f"node {job.node.id}: {full} links back to a folder that holds it")
                entries.append(Entry(sub, True, stat.S_IMODE(kind)))
                walk(full, sub, sub_real, ancestors | {sub_real})
            elif stat.S_ISREG(kind):
                entries.append(Entry(sub, False, stat.S_IMODE(kind), attr.st_size or 0))
            else:
                raise TransferError(f"node {job.node.id}: {full} is neither a file nor a folder")

    real = sftp.normalize(path)
    walk(path, "", real, frozenset({real}))
    return entries


def _hidden(path: str, token: str) -> str:
    """The hidden name beside ``path`` that its content is written under."""
    folder, name = posixpath.split(path)
    return posixpath.join(folder, f".{name}.orch-{token}")


def _stat(sftp: paramiko.SFTPClient, path: str) -> paramiko.SFTPAttributes | None:
    try:
        return sftp.stat(path)
    except FileNotFoundError:
        return None


def _kind(mode: int) -> str:
    return "folder" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "special file"


# -- running steps on every node -------------------------------------------------------


def _each(jobs: Sequence[_Job], step: Callable[[_Job], None], max_parallel: int) -> None:
    """``step`` on every job still going, in parallel; its failure is the job's."""
    going = [j for j in jobs if j.ok]
    if not going:
        return

    def guarded(job: _Job) -> None:
        assert job.target is not None
        try:
            with map_ssh_errors(job.target):
                try:
                    job.check_stop()
                    step(job)
                except _CONNECTION:
                    raise
                except (OSError, paramiko.SFTPError) as exc:  # an SFTP status or a local file: not the link
                    reason = getattr(exc, "strerror", None) or exc
                    raise TransferError(f"node {job.node.id}: {job.doing}: {reason}") from exc
        except _Conflict as exc:
            job.conflict = exc
        except OrchError as exc:
            job.error = exc
        finally:
            job.seconds = time.monotonic() - job.started

    with ThreadPoolExecutor(max_workers=max(1, min(max_parallel, len(going)))) as pool:
        futures = []
        try:
            futures += [pool.submit(guarded, j) for j in going]
            pending = set(futures)
            while pending:  # a wait without a timeout would not see Ctrl-C that another thread took
                _, pending = wait(pending, timeout=0.2)
            for future in futures:
                future.result()  # a bug (not an OrchError) surfaces here
        except BaseException:  # Ctrl-C, or a bug: every node stops soon, removing its hidden names
            for job in going:
                job.stop.set()
            raise


def _start(ws: Workspace, nodes: Sequence[NodeRecord], pool: SSHPool, max_parallel: int) -> list[_Job]:
    """A job per node, each connected (through the pool) with an SFTP channel of its own."""
    ids = [n.id for n in nodes]
    if len(set(ids)) != len(ids):
        raise ValueError(f"nodes given twice: {sorted(i for i in set(ids) if ids.count(i) > 1)}")
    jobs = []
    for node in nodes:
        job = _Job(node)
        try:
            job.target = ssh_target(ws, node)
        except RemoteError as exc:
            job.error = exc
        jobs.append(job)

    def connect(job: _Job) -> None:
        assert job.target is not None
        try:
            job.sftp = pool.session(job.target).open_sftp()
        except NodeUnreachable:
            pool.discard(job.target)
            raise
        channel = job.sftp.get_channel()
        if channel is not None:
            channel.settimeout(STALL_TIMEOUT)

    _each(jobs, connect, max_parallel)
    return jobs


def _finish(jobs: Sequence[_Job], started: float) -> TransferReport:
    conflicts = [j for j in jobs if j.conflict is not None]
    if conflicts:
        first = conflicts[0].conflict
        assert first is not None
        others = f" (and on {len(conflicts) - 1} other node(s))" if len(conflicts) > 1 else ""
        raise InputError(f"{first.message}{others}; nothing was copied", hint=first.hint)
    return TransferReport({j.node.id: j.result() for j in jobs}, round(time.monotonic() - started, 3))


def _close(jobs: Sequence[_Job]) -> None:
    for job in jobs:
        if job.sftp is not None:
            with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
                job.sftp.close()
            job.sftp = None


def _transfer(ws: Workspace, nodes: Sequence[NodeRecord], pool: SSHPool | None, max_parallel: int, source: str,
              check: Callable[[_Job], None], copy: Callable[[_Job], None]) -> TransferReport:
    """Connect to every node (through ``pool``, or one of its own), ``check`` each, and
    only when no node has a conflict ``copy`` to or from each; the report (``source`` in
    every node's line, reached or not), with every SFTP channel (and an own pool) closed
    whatever happens."""
    started = time.monotonic()
    own = pool is None
    pool = pool or SSHPool()
    jobs: list[_Job] = []
    try:
        jobs = _start(ws, nodes, pool, max_parallel)
        for job in jobs:
            job.source = source
        _each(jobs, check, max_parallel)
        if not any(j.conflict for j in jobs):
            _each(jobs, copy, max_parallel)
        return _finish(jobs, started)
    finally:
        _close(jobs)
        if own:
            pool.close_all()


def _rmtree(sftp: paramiko.SFTPClient, path: str) -> None:
    """Remove ``path`` (a file or a folder and all in it) on the node, as far as it goes."""
    try:
        attr = sftp.lstat(path)
    except OSError:
        return
    try:
        if stat.S_ISDIR(attr.st_mode or 0):
            sftp.chmod(path, 0o700)
            for name in sftp.listdir(path):
                _rmtree(sftp, posixpath.join(path, name))
            sftp.rmdir(path)
        else:
            sftp.remove(path)
    except OSError:
        pass


def _local_rmtree(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o700)
            for child in path.iterdir():
                _local_rmtree(child)
            path.rmdir()
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


# -- push ------------------------------------------------------------------------------


def push(ws: Workspace, nodes: Sequence[NodeRecord], local: Path, remote: str, *, pool: SSHPool | None = None,
         events: TransferEvents | None = None, max_parallel: int = PARALLEL) -> TransferReport:
    """Copy ``local`` (a file or a folder) to ``remote`` on every node, in parallel.

    Raises InputError, before anything is written anywhere, for a LOCAL that cannot be read
    or a REMOTE that cannot take it on some node; every other failure is its node's, in the
    report."""
    events = events or TransferEvents()
    tree = local_tree(local)
    path, into = remote_path(remote)
    name = local.resolve().name
    total = sum(e.size for e in tree)

    def check(job: _Job) -> None:
        assert job.sftp is not None
        job.tree = tree
        job.doing = f"checking {path}"
        _plan_push(job, job.sftp, path, into, name, tree[0].is_dir)
        events.total(job.node.id, total)

    return _transfer(ws, nodes, pool, max_parallel, str(local), check, lambda job: _push_node(job, local, events))


def _plan_push(job: _Job, sftp: paramiko.SFTPClient, path: str, into: bool, name: str, is_dir: bool) -> None:
    """Where the copy goes on this node, or a _Conflict."""
    where, what = f"node {job.node.id}", "a folder" if is_dir else "a file"
    found = _stat(sftp, path)
    if found is None:  # made, with the folders it needs
        job.destination = posixpath.join(path, name) if into else path
        folder = posixpath.dirname(job.destination)
        while folder not in ("", ".", "/"):
            up = _stat(sftp, folder)
            if up is not None:
                if not stat.S_ISDIR(up.st_mode or 0):
                    raise _Conflict(f"{where}: {folder} is a {_kind(up.st_mode or 0)}; a folder is needed there",
                                    hint="give another REMOTE")
                break
            job.parents.insert(0, folder)
            folder = posixpath.dirname(folder)
        return
    mode = found.st_mode or 0
    if stat.S_ISDIR(mode):
        job.destination = posixpath.normpath(posixpath.join(path, name))
        there = _stat(sftp, job.destination)
        if there is not None:
            kind = there.st_mode or 0
            if stat.S_ISDIR(kind) != is_dir or not (stat.S_ISDIR(kind) or stat.S_ISREG(kind)):
                raise _Conflict(f"{where}: {job.destination} is a {_kind(kind)}; LOCAL is {what}",
                                hint="give another REMOTE, or remove it first")
            job.exists = True
        return
    if into or is_dir:
        raise _Conflict(f"{where}: REMOTE {path} is a {_kind(mode)}; a folder is needed",
                        hint="give a folder, or a path that does not exist yet")
    if not stat.S_ISREG(mode):
        raise _Conflict(f"{where}: REMOTE {path} is a {_kind(mode)}", hint="give a file or folder path")
    job.destination, job.exists = path, True


def _push_node(job: _Job, local: Path, events: TransferEvents) -> None:
    sftp, token = job.sftp, secrets.token_hex(4)
    assert sftp is not None
    for folder in job.parents:
        job.doing = f"making the folder {folder}"
        sftp.mkdir(folder)
    top = job.tree[0]
    if not top.is_dir:  # one file: always under a hidden name, then renamed into place
        _put_file(job, sftp, local, job.destination, top, token, events)
        return
    base = job.destination if job.exists else _hidden(job.destination, token)
    try:
        if not job.exists:
            job.doing = f"making the folder {base}"
            sftp.mkdir(base, 0o700)
        for entry in job.tree[1:]:
            target = posixpath.join(base, entry.rel)
            if entry.is_dir:
                job.doing = f"making the folder {target}"
                _remote_folder(sftp, target, merge=job.exists)
            elif job.exists:
                _put_file(job, sftp, local / entry.rel, target, entry, token, events)
            else:
                _write_remote(job, sftp, local / entry.rel, target, entry, events)
        for entry in [e for e in reversed(job.tree) if e.is_dir]:  # deepest first: each is filled already
            target = posixpath.join(base, entry.rel) if entry.rel else base
            job.doing = f"setting the mode of {target}"
            sftp.chmod(target, entry.mode)
        if not job.exists:
            job.doing = f"renaming {base} to {job.destination}"
            sftp.posix_rename(base, job.destination)
    except BaseException:
        if not job.exists:
            _rmtree(sftp, base)
        raise


def _remote_folder(sftp: paramiko.SFTPClient, path: str, *, merge: bool) -> None:
    """Make the folder ``path`` (one of ours, 0700 until its mode is set); when merging,
    one that is there already is fine, anything else in its place is not."""
    try:
        sftp.mkdir(path, 0o700)
    except OSError:
        found = _stat(sftp, path) if merge else None
        if found is None or not stat.S_ISDIR(found.st_mode or 0):
            raise


def _put_file(job: _Job, sftp: paramiko.SFTPClient, source: Path, path: str, entry: Entry, token: str,
              events: TransferEvents) -> None:
    """Write ``path`` under its hidden name and rename it over whatever is there."""
    hidden = _hidden(path, token)
    try:
        _write_remote(job, sftp, source, hidden, entry, events)
        job.doing = f"renaming {hidden} to {path}"
        sftp.posix_rename(hidden, path)
    except BaseException:
        _rmtree(sftp, hidden)
        raise


def _write_remote(job: _Job, sftp: paramiko.SFTPClient, source: Path, path: str, entry: Entry,
                  events: TransferEvents) -> None:
    buffer = bytearray(BUFFER_SIZE)
    view = memoryview(buffer)
    job.doing = f"writing {path}"
    with open(source, "rb") as f, sftp.open(path, "wb") as out:
        out.set_pipelined(True)
        out.MAX_REQUEST_SIZE = REQUEST_SIZE
        while count := f.readinto(buffer):
            job.check_stop()
            out.write(view[:count])
            job.moved += count
            events.advance(job.node.id, count)
        out.chmod(entry.mode)
    # closing waits for the answers to every pipelined write and raises on the first error


# -- pull ------------------------------------------------------------------------------


def pull(ws: Workspace, nodes: Sequence[NodeRecord], remote: str, local_dir: Path, *, pool: SSHPool | None = None,
         events: TransferEvents | None = None, max_parallel: int = PARALLEL) -> TransferReport:
    """Copy ``remote`` of every node to ``local_dir/NODE/NAME``, in parallel.

    Raises InputError, before anything is written, for a ``local_dir`` that is not a folder
    or a local destination that cannot take what a node has; a node whose REMOTE is
    missing (or that fails otherwise) fails alone, in the report."""
    events = events or TransferEvents()
    path, _ = remote_path(remote)
    if local_dir.exists() and not local_dir.is_dir():
        raise InputError(f"LOCAL_DIR {local_dir} is a file; a folder is needed",
                         hint="give a folder (it is made if missing)")

    def check(job: _Job) -> None:
        assert job.sftp is not None
        job.doing = f"reading {path}"
        found = _stat(job.sftp, path)
        if found is None:
            raise TransferError(f"node {job.node.id}: REMOTE {path} does not exist",
                                hint=f"see `orch exec {job.node.id} -- ls -la`")
        job.tree = _remote_tree(job.sftp, path, found, job)
        name = posixpath.basename(path)
        if name in ("", ".", ".."):  # the login folder, or above it: named as it really is
            name = posixpath.basename(job.sftp.normalize(path))
        folder = local_dir / job.node.id
        destination = folder / name if name else folder
        job.destination = str(destination)
        _plan_pull(job, folder, destination)
        events.total(job.node.id, sum(e.size for e in job.tree))

    return _transfer(ws, nodes, pool, max_parallel, path, check,
                     lambda job: _pull_node(job, path, Path(job.destination), events))


def _plan_pull(job: _Job, folder: Path, destination: Path) -> None:
    """Whether the node's copy goes into place new or into what is there, or a _Conflict."""
    is_dir = job.tree[0].is_dir
    if folder != destination and folder.exists() and not folder.is_dir():
        raise _Conflict(f"{folder} is a file; a folder is needed there", hint="give another LOCAL_DIR")
    if destination.exists():
        if destination.is_dir() != is_dir:
            what = "a folder" if is_dir else "a file"
            raise _Conflict(f"{destination} is a {'folder' if destination.is_dir() else 'file'}; node "
                            f"{job.node.id}'s {job.source} is {what}", hint="give another LOCAL_DIR, or remove it")
        job.exists = True


def _pull_node(job: _Job, path: str, destination: Path, events: TransferEvents) -> None:
    sftp, token = job.sftp, secrets.token_hex(4)
    assert sftp is not None
    job.doing = f"making the folder {destination.parent}"
    destination.parent.mkdir(parents=True, exist_ok=True)
    top = job.tree[0]
    if not top.is_dir:
        _get_file(job, sftp, path, destination, top, token, events)
        return
    base = destination if job.exists else destination.with_name(f".{destination.name}.orch-{token}")
    try:
        if not job.exists:
            job.doing = f"making the folder {base}"
            base.mkdir(0o700)
        for entry in job.tree[1:]:
            source, target = posixpath.join(path, entry.rel), base / entry.rel
            if entry.is_dir:
                job.doing = f"making the folder {target}"
                try:
                    target.mkdir(0o700)
                except FileExistsError:
                    if not (job.exists and target.is_dir()):
                        raise
            elif job.exists:
                _get_file(job, sftp, source, target, entry, token, events)
            else:
                _read_remote(job, sftp, source, target, entry, events)
        for entry in [e for e in reversed(job.tree) if e.is_dir]:
            target = base / entry.rel if entry.rel else base
            job.doing = f"setting the mode of {target}"
            target.chmod(entry.mode)
        if not job.exists:
            job.doing = f"renaming {base} to {destination}"
            base.rename(destination)
    except BaseException:
        if not job.exists:
            _local_rmtree(base)
        raise


def _get_file(job: _Job, sftp: paramiko.SFTPClient, source: str, path: Path, entry: Entry, token: str,
              events: TransferEvents) -> None:
    hidden = path.with_name(f".{path.name}.orch-{token}")
    try:
        _read_remote(job, sftp, source, hidden, entry, events)
        job.doing = f"renaming {hidden} to {path}"
        os.replace(hidden, path)
    except BaseException:
        hidden.unlink(missing_ok=True)
        raise


def _read_remote(job: _Job, sftp: paramiko.SFTPClient, source: str, path: Path, entry: Entry,
                 events: TransferEvents) -> None:
    job.doing = f"copying {source} to {path}"
    with sftp.open(source, "rb") as f:
        f.MAX_REQUEST_SIZE = REQUEST_SIZE
        if entry.size > REQUEST_SIZE:
            f.prefetch(entry.size)
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
            while data := f.read(BUFFER_SIZE):
                job.check_stop()
                out.write(data)
                job.moved += len(data)
                events.advance(job.node.id, len(data))
            os.fchmod(out.fileno(), entry.mode)
