"""The parts every sink shares: the :class:`Sink` interface, :class:`Record`, the errors,
:func:`redact_url`, the base of the database sinks (:class:`_TableSink`) and the ``--sink``
URL parsing (:func:`check_sink_url`).

The contract all sinks keep is in the package docstring (:mod:`orchestrator.scheduler.sinks`);
the sinks themselves are in ``file.py``, ``sqlite.py`` and ``postgres.py``.
"""

from __future__ import annotations

import abc
import contextlib
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, NamedTuple
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from orchestrator.errors import InputError, StateError

DEFAULT_TABLE = "orch_output"
READ_PAGE = 256
"""Rows a database sink's ``read`` fetches at a time (by seq: no transaction stays open)."""
_TABLE = re.compile(r"[a-z_][a-z0-9_]{0,49}", re.ASCII)
_USAGE = "use file:PATH, sqlite:PATH[?table=NAME] or postgresql://USER@HOST/DB[?table=NAME]"


class SinkError(InputError):
    """(scheduler) A ``--sink`` URL cannot be used: malformed, unreachable, or taken by another job."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(f"--sink: {' '.join(message.split())}", hint=hint)


class SinkFailed(StateError):
    """(scheduler) A sink failed while writing or committing, or no longer matches its checkpoint."""


class Record(NamedTuple):
    """One task's outcome: ``ok`` -> ``payload`` is its output; not ok -> the failure message (UTF-8).

    A named tuple, not a dataclass: the scheduler makes one per task, and a frozen
    dataclass costs ~1.4 us to create against ~0.3 us."""

    seq: int
    ok: bool
    payload: bytes


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``: what messages and logs show."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    netloc, query = parts.netloc, parts.query
    if "@" in netloc:
        user, _, host = netloc.rpartition("@")
        if ":" in user:
            netloc = f"{user.split(':', 1)[0]}:***@{host}"
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k == "password" for k, _ in pairs):
            query = urlencode([(k, "***" if k == "password" else v) for k, v in pairs], safe="*")
    if (netloc, query) == (parts.netloc, parts.query):
        return url  # nothing to hide: as written
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _text(payload: bytes) -> str:
    """A failure message as storable text (no NUL: PostgreSQL TEXT refuses it)."""
    return payload.decode("utf-8", "replace").replace("\x00", "\\0")


class Sink(abc.ABC):
    """Ordered, committed, resumable output of jobs; see the module docstring."""

    scheme: ClassVar[str]

    def __init__(self, url: str) -> None:
        self.url = url
        self.job: str | None = None
        self.next_seq = 0
        """The seq the next ``write`` must start with."""

    @property
    def shown(self) -> str:
        """The URL as messages show it (no password)."""
        return redact_url(self.url)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.shown!r})"

    def _follow(self, records: Sequence[Record]) -> int:
        """Check ``records`` continue from ``next_seq`` one by one; the seq after them."""
        if self.job is None:
            raise ValueError(f"sink {self.shown}: write() before open()")
        expected = self.next_seq
        for record in records:
            if record.seq != expected:
                what = "a repeat" if record.seq < expected else "a gap"
                raise ValueError(f"sink {self.shown}: record seq {record.seq} where {expected} was expected ({what})")
            expected += 1
        return expected

    @staticmethod
    def _checkpoint_int(checkpoint: Mapping[str, Any], key: str, where: str) -> int:
        value = checkpoint.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise SinkFailed(f"sink {where}: the stored checkpoint {dict(checkpoint)!r} has no valid {key}")
        return value

    @abc.abstractmethod
    def open(self, job: str, checkpoint: Mapping[str, Any] | None) -> int:
        """Prepare for ``job``; back to ``checkpoint`` (an earlier ``commit()``) when resuming.

        Returns the next seq the sink expects: 0 for a new job."""

    @abc.abstractmethod
    def write(self, records: Sequence[Record]) -> None:
        """Append ``records``: strictly consecutive seqs from ``next_seq`` (else ValueError)."""

    @abc.abstractmethod
    def commit(self) -> dict[str, Any]:
        """Make everything written durable; the checkpoint ``{"next_seq": n, ...}`` to keep."""

    @abc.abstractmethod
    def read(self, job: str) -> Iterator[Record]:
        """The job's committed output, in order (``orch job result``)."""

    @abc.abstractmethod
    def delete(self, job: str) -> None:
        """Remove every trace of ``job`` from the sink (``orch job delete``)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Let go of files and connections, without committing; closing twice is fine."""

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _make_folder(folder: Path, shown: str) -> None:
    """Create a sink file's folder when missing (``file:.orch/jobs/ID.out`` on a first job)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SinkError(f'cannot create the folder "{folder}" of {shown}: {exc.strerror or exc}; '
                        "choose a path orch can write") from None


# -- databases ----------------------------------------------------------------------------


Row = tuple[str, int, Any, bytes | None, str | None]
"""(job, seq, ok, output, error): one record as a database row."""


def _squash(exc: BaseException) -> str:
    return " ".join(str(exc).split())


class _TableSink(Sink):
    """Rows (job, seq, ok, output, error) and a progress row per job, in one transaction per commit.

    Subclasses provide the database's primitives; every database error that escapes them
    becomes a one-line SinkFailed naming the sink (SinkError while connecting or creating)."""

    _TRUE: ClassVar[Any] = 1
    _FALSE: ClassVar[Any] = 0

    def __init__(self, url: str, table: str) -> None:
        super().__init__(url)
        self.table = table
        self.progress_table = f"{table}_progress"
        self._pending: list[Row] = []
        self._committed = 0

    # -- the primitives ----------------------------------------------------------------

    @abc.abstractmethod
    def _errors(self) -> tuple[type[Exception], ...]:
        """The database driver's error classes."""

    @abc.abstractmethod
    def _prepare(self) -> None:
        """Connect if needed and create the tables when missing (SinkError when that fails)."""

    @abc.abstractmethod
    def _has_tables(self) -> bool:
        """Connect if there is anything to connect to; whether both tables exist.  Never creates."""

    @abc.abstractmethod
    def _stored_next(self, job: str) -> int:
        """The job's committed next_seq from the progress table (0 when none)."""

    @abc.abstractmethod
    def _flush(self, rows: list[Row], job: str, next_seq: int) -> None:
        """Insert ``rows`` and set the job's progress, in one transaction (rolled back on error)."""

    @abc.abstractmethod
    def _page(self, job: str, after: int) -> list[tuple[Any, ...]]:
        """Up to READ_PAGE rows (seq, ok, output, error) of ``job`` from seq ``after`` on, in order."""

    @abc.abstractmethod
    def _delete_rows(self, job: str) -> None:
        """Delete the job's rows and progress row, in one transaction."""

    @abc.abstractmethod
    def _disconnect(self) -> None:
        """Close the connection, if any."""

    # -- the contract --------------------------------------------------------------------

    @contextlib.contextmanager
    def _guard(self, action: str) -> Iterator[None]:
        try:
            yield
        except self._errors() as exc:
            raise SinkFailed(f"sink {self.shown}: {action} failed: {_squash(exc)}") from exc

    def open(self, job: str, checkpoint: Mapping[str, Any] | None) -> int:
        self.close()
        try:
            self._prepare()
            with self._guard("reading the progress"):
                stored = self._stored_next(job)
            if checkpoint is not None:
                claimed = self._checkpoint_int(checkpoint, "next_seq", self.shown)
                if claimed > stored:
                    raise SinkFailed(f"sink {self.shown}: job {job} committed up to seq {claimed}, the database holds "
                                     f"only up to {stored}: the table {self.table} lost rows; the job cannot resume")
        except BaseException:
            self.close()  # a sink that failed to open holds no connection
            raise
        self.job, self.next_seq, self._committed = job, stored, stored
        return stored

    def write(self, records: Sequence[Record]) -> None:
        after = self._follow(records)
        job, true, false = self.job, self._TRUE, self._FALSE
        assert job is not None  # _follow refuses a write before open
        self._pending.extend([(job, r.seq, true, r.payload, None) if r.ok else
                              (job, r.seq, false, None, _text(r.payload)) for r in records])
        self.next_seq = after

    def commit(self) -> dict[str, Any]:
        if self.job is None:
            raise ValueError(f"sink {self.shown}: commit() before open()")
        if self._pending:
            with self._guard("committing"):
                self._flush(self._pending, self.job, self.next_seq)
            self._pending.clear()
            self._committed = self.next_seq
        return {"next_seq": self._committed}

    def read(self, job: str) -> Iterator[Record]:
        with self._guard("reading"):
            if not self._has_tables():
                return
        after = 0
        while True:  # a page at a time, by seq: no transaction or cursor stays open between pages
            with self._guard("reading"):
                page = self._page(job, after)
            if not page:
                return
            for seq, ok, output, error in page:
                yield Record(int(seq), bool(ok), bytes(output) if ok else (error or "").encode())
            after = int(page[-1][0]) + 1

    def delete(self, job: str) -> None:
        with self._guard("deleting"):
            if not self._has_tables():
                return
            self._delete_rows(job)
        if self.job == job:
            self.job, self.next_seq, self._committed = None, 0, 0
            self._pending.clear()

    def close(self) -> None:
        self._disconnect()
        self.job = None
        self._pending.clear()


# -- URLs -----------------------------------------------------------------------------------


def _table_of(params: list[tuple[str, str]], url: str) -> str:
    table = DEFAULT_TABLE
    for key, value in params:
        if key != "table":
            raise SinkError(f'"{redact_url(url)}" has an unknown parameter "{key}"; the only one is ?table=NAME')
        table = value
    if not _TABLE.fullmatch(table):
        raise SinkError(f'table "{table}" is not a plain name; use lower-case letters, digits and _ '
                        "(at most 50), not starting with a digit")
    return table


def _local_path(rest: str, url: str) -> str:
    if not rest:
        raise SinkError(f'"{url}" names no file; write {url.split(":", 1)[0]}:PATH')
    if rest.startswith("//"):
        raise SinkError(f'"{url}": write {url.split(":", 1)[0]}:PATH (relative to the workspace) or '
                        f"{url.split(':', 1)[0]}:/ABSOLUTE/PATH, without //")
    return rest


def _parse(url: str) -> tuple[str, str, str]:
    """(scheme, location, table): the file path, or for PostgreSQL the URL without ``table``."""
    scheme, sep, rest = url.partition(":")
    if not sep:
        raise SinkError(f'"{url}" has no scheme; {_USAGE}')
    if scheme == "file":
        return "file", _local_path(rest, url), ""
    if scheme == "sqlite":
        path, _, query = rest.partition("?")
        path = _local_path(path, url)
        if path == ":memory:":
            raise SinkError("an in-memory SQLite database keeps nothing; give a file: sqlite:PATH")
        try:
            params = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
        except ValueError:
            raise SinkError(f'"{url}": the part after ? is not NAME=VALUE; write ?table=NAME') from None
        return "sqlite", path, _table_of(params, url)
    if scheme in ("postgresql", "postgres"):
        from psycopg import ProgrammingError
        from psycopg.conninfo import conninfo_to_dict

        parts = urlsplit(url)
        params = parse_qsl(parts.query, keep_blank_values=True)
        table = _table_of([(k, v) for k, v in params if k == "table"], url)
        others = urlencode([(k, v) for k, v in params if k != "table"])
        conninfo = url.partition("?")[0] + (f"?{others}" if others else "")
        try:
            conninfo_to_dict(conninfo)
        except ProgrammingError as exc:
            raise SinkError(f'"{redact_url(url)}" is not a PostgreSQL URL libpq accepts: {exc}; '
                            "write postgresql://USER@HOST[:PORT]/DB[?table=NAME]") from None
        return "postgresql", conninfo, table
    raise SinkError(f'unknown sink "{redact_url(url)}"; {_USAGE}')


def check_sink_url(url: str) -> None:
    """Validate a ``--sink`` URL without touching anything; SinkError says what to write."""
    _parse(url)
