"""Sinks: where a job's ordered output goes, committed in sequence order, resumable.

The scheduler hands a sink :class:`Record`\\ s in strictly consecutive ``seq`` order
(``write``) and, now and then, makes them durable (``commit``), which returns a small
*checkpoint* the store keeps with the job.  After a crash, ``open(job, checkpoint)``
puts the sink back to exactly its last commit and returns the next ``seq`` it expects;
the scheduler resends from there.  Recording is first-completion-wins upstream, so a
sink never sees a seq twice: a gap or a repeat is a bug of the caller (``ValueError``).

    file:PATH                 the ok payloads concatenated in seq order (failed tasks
                              write nothing).  PATH is relative to the workspace root or
                              absolute; a missing folder is created (and left on delete).
                              A sidecar ``PATH.orch-job`` names the job that
                              owns the file; a new job refuses a non-empty file of
                              another job (or of no job).  commit = flush + fdatasync;
                              checkpoint ``{"next_seq", "offset"}``, and ``open`` with it
                              truncates the file to ``offset`` (bytes past it were
                              written, never committed).  The file is locked (flock)
                              while a sink has it open.  ``read`` gives the file's bytes
                              as Records of up to 1 MiB: their ``seq`` is the piece's
                              index, not a task's (the file does not keep task bounds).
    sqlite:PATH[?table=NAME]  table NAME (default ``orch_output``): job TEXT, seq INTEGER,
                              ok INTEGER, output BLOB (ok rows), error TEXT (failed rows),
                              PRIMARY KEY (job, seq); and ``NAME_progress`` (job PRIMARY
                              KEY, next_seq), updated in the transaction that inserts the
                              rows (multi-row INSERTs of 100).  WAL, synchronous=FULL: a
                              commit is durable.
    postgresql://...[?table=NAME]
                              the same tables in PostgreSQL (output BYTEA, ok BOOLEAN,
                              seq BIGINT), written with COPY, one transaction per commit.
                              Keep passwords out of the URL: libpq reads PGPASSWORD and
                              ~/.pgpass.  Messages never show a password.

Database sinks keep their own progress (the progress row, committed with the rows), so
they are the authority on resume: ``open`` returns the row's next_seq, and refuses a
checkpoint that claims more than the database holds.  ``write`` only buffers rows in
memory (the scheduler bounds unflushed output); ``commit`` sends them in one
transaction (rolled back whole on error), and ``read`` pages through rows by seq, so no
transaction stays open between calls.  Reading or deleting a job the sink never saw
gives nothing and creates nothing.

After :class:`SinkFailed` from ``write`` or ``commit`` (disk full, connection lost),
close the sink and open it again from the last checkpoint; a database commit refused
for its data (a constraint) leaves the rows pending and may simply be retried.
"""

from __future__ import annotations

import abc
import contextlib
import fcntl
import hashlib
import os
import re
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, NamedTuple
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from orchestrator.errors import InputError, StateError

DEFAULT_TABLE = "orch_output"
READ_PIECE = 1 << 20
"""The largest Record a file sink's ``read`` yields."""
READ_PAGE = 256
"""Rows a database sink's ``read`` fetches at a time (by seq: no transaction stays open)."""
MARKER_SUFFIX = ".orch-job"
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


# -- file -------------------------------------------------------------------------------


def _make_folder(folder: Path, shown: str) -> None:
    """Create a sink file's folder when missing (``file:.orch/jobs/ID.out`` on a first job)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SinkError(f'cannot create the folder "{folder}" of {shown}: {exc.strerror or exc}; '
                        "choose a path orch can write") from None


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileSink(Sink):
    """``file:PATH``: the ok payloads, concatenated in seq order."""

    scheme = "file"

    def __init__(self, url: str, path: Path) -> None:
        super().__init__(url)
        self.path = path
        self.marker = path.with_name(path.name + MARKER_SUFFIX)
        self.offset = 0
        self._file: Any = None  # BufferedRandom while open

    def _owner(self) -> str | None:
        try:
            return self.marker.read_text().strip() or None
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SinkError(f"cannot read {self.marker}: {exc.strerror}") from None

    def _claim(self, job: str) -> None:
        """Write the sidecar naming ``job``, atomically and durably."""
        temp = self.marker.with_name(f".{self.marker.name}.{os.getpid()}")
        with open(temp, "w") as out:
            out.write(job + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, self.marker)
        _fsync_dir(self.path.parent)

    def open(self, job: str, checkpoint: Mapping[str, Any] | None) -> int:
        self.close()
        _make_folder(self.path.parent, self.shown)
        existed = self.path.exists()
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise SinkError(f'cannot open "{self.path}": {exc.strerror}; choose a path orch can write') from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise SinkError(f'"{self.path}" is being written by another running job; '
                                "choose another path") from None
            offset, next_seq = self._settle(fd, job, checkpoint)
            os.ftruncate(fd, offset)
            if checkpoint is not None:
                os.fsync(fd)
            handle = os.fdopen(fd, "r+b", buffering=1 << 20)
        except BaseException:
            os.close(fd)
            if not existed and not self.marker.exists():
                self.path.unlink(missing_ok=True)
            raise
        handle.seek(offset)
        self._file, self.job, self.offset, self.next_seq = handle, job, offset, next_seq
        return next_seq

    def _settle(self, fd: int, job: str, checkpoint: Mapping[str, Any] | None) -> tuple[int, int]:
        """(offset, next_seq) to continue from, after checking the file may be used for ``job``."""
        size = os.fstat(fd).st_size
        owner = self._owner()
        if checkpoint is None:
            if size and owner != job:
                whose = f"job {owner}'s output" if owner else "not empty"
                raise SinkError(f'"{self.path}" is {whose}; choose another path, or delete that job or the file')
            if owner != job:
                self._claim(job)
            return 0, 0
        if owner != job:
            whose = f"now belongs to job {owner}" if owner else f"has lost its job marker {self.marker.name}"
            raise SinkFailed(f'sink {self.shown}: "{self.path}" {whose}; job {job} cannot resume into it')
        offset = self._checkpoint_int(checkpoint, "offset", self.shown)
        next_seq = self._checkpoint_int(checkpoint, "next_seq", self.shown)
        if size < offset:
            raise SinkFailed(f'sink {self.shown}: "{self.path}" has {size} bytes, fewer than the {offset} committed: '
                             f"it was changed outside orch; job {job} cannot resume into it")
        return offset, next_seq

    def write(self, records: Sequence[Record]) -> None:
        after = self._follow(records)
        data = b"".join([r.payload for r in records if r.ok])
        try:
            self._file.write(data)
        except OSError as exc:
            raise SinkFailed(f"sink {self.shown}: writing failed: {exc.strerror or exc}") from exc
        self.offset += len(data)
        self.next_seq = after

    def commit(self) -> dict[str, Any]:
        if self._file is None:
            raise ValueError(f"sink {self.shown}: commit() before open()")
        try:
            self._file.flush()
            os.fdatasync(self._file.fileno())
        except OSError as exc:
            raise SinkFailed(f"sink {self.shown}: committing failed: {exc.strerror or exc}") from exc
        return {"next_seq": self.next_seq, "offset": self.offset}

    def read(self, job: str) -> Iterator[Record]:
        owner = self._owner()
        if owner is None and not self.path.exists():
            return  # deleted, or never written: nothing, as a database sink answers
        if owner != job:
            now = f"it holds job {owner}'s" if owner else f"it has no job marker {self.marker.name}"
            raise SinkFailed(f'sink {self.shown}: "{self.path}" does not hold job {job}\'s output ({now})')
        with open(self.path, "rb") as source:
            piece = 0
            while chunk := source.read(READ_PIECE):
                yield Record(piece, True, chunk)
                piece += 1

    def delete(self, job: str) -> None:
        if self._owner() != job:
            return  # not (or no longer) this job's file: leave it
        if self.job == job:
            self.close()
        self.path.unlink(missing_ok=True)
        self.marker.unlink(missing_ok=True)
        _fsync_dir(self.path.parent)

    def close(self) -> None:
        if self._file is not None:
            handle, self._file = self._file, None
            handle.close()
        self.job = None


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


class SqliteSink(_TableSink):
    """``sqlite:PATH[?table=NAME]``."""

    scheme = "sqlite"
    ROWS_PER_INSERT: ClassVar[int] = 100
    """Rows per multi-row INSERT: a third faster than executemany's one row per step."""

    def __init__(self, url: str, path: Path, table: str) -> None:
        super().__init__(url, table)
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._inserts: dict[int, str] = {}

    def _errors(self) -> tuple[type[Exception], ...]:
        return (sqlite3.Error,)

    def _connect(self) -> sqlite3.Connection:
        if self._db is not None:
            return self._db
        _make_folder(self.path.parent, self.shown)
        try:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise SinkError(f'cannot open the SQLite database "{self.path}": {exc}') from None
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error as exc:
            db.close()
            raise SinkError(f'"{self.path}" is not a usable SQLite database: {exc}; choose another path') from None
        self._db = db
        return db

    def _prepare(self) -> None:
        db = self._connect()
        try:
            db.executescript(f"""
                CREATE TABLE IF NOT EXISTS "{self.table}" (
                    job TEXT NOT NULL, seq INTEGER NOT NULL, ok INTEGER NOT NULL,
                    output BLOB, error TEXT, PRIMARY KEY (job, seq));
                CREATE TABLE IF NOT EXISTS "{self.progress_table}" (
                    job TEXT PRIMARY KEY, next_seq INTEGER NOT NULL);
            """)
        except sqlite3.Error as exc:
            raise SinkError(f"cannot create the tables of {self.shown}: {exc}") from None

    def _has_tables(self) -> bool:
        if self._db is None and not self.path.is_file():
            return False  # reading or deleting never creates a database
        row = self._connect().execute("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN (?, ?)",
                                      (self.table, self.progress_table)).fetchone()
        return bool(row and row[0] == 2)

    def _stored_next(self, job: str) -> int:
        row = self._connect().execute(f'SELECT next_seq FROM "{self.progress_table}" WHERE job = ?', (job,)).fetchone()
        return int(row[0]) if row else 0

    def _insert(self, rows: int) -> str:
        statement = self._inserts.get(rows)
        if statement is None:
            values = ", ".join(["(?,?,?,?,?)"] * rows)
            statement = f'INSERT INTO "{self.table}" (job, seq, ok, output, error) VALUES {values}'
            self._inserts[rows] = statement
        return statement

    def _transaction(self, *steps: tuple[str, Sequence[Any]]) -> None:
        db = self._connect()
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement, params in steps:
                db.execute(statement, params)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _flush(self, rows: list[Row], job: str, next_seq: int) -> None:
        step = self.ROWS_PER_INSERT
        inserts = [(self._insert(len(part)), [value for row in part for value in row])
                   for part in (rows[i:i + step] for i in range(0, len(rows), step))]
        self._transaction(*inserts, (f'INSERT INTO "{self.progress_table}" (job, next_seq) VALUES (?, ?) '
                                     "ON CONFLICT (job) DO UPDATE SET next_seq = excluded.next_seq", (job, next_seq)))

    def _page(self, job: str, after: int) -> list[tuple[Any, ...]]:
        return self._connect().execute(
            f'SELECT seq, ok, output, error FROM "{self.table}" WHERE job = ? AND seq >= ? ORDER BY seq LIMIT ?',
            (job, after, READ_PAGE)).fetchall()

    def _delete_rows(self, job: str) -> None:
        self._transaction((f'DELETE FROM "{self.table}" WHERE job = ?', (job,)),
                          (f'DELETE FROM "{self.progress_table}" WHERE job = ?', (job,)))

    def _disconnect(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            db.close()


class PostgresSink(_TableSink):
    """``postgresql://...[?table=NAME]`` with psycopg 3 (imported on first use)."""

    scheme = "postgresql"
    _TRUE = True
    _FALSE = False

    def __init__(self, url: str, conninfo: str, table: str) -> None:
        super().__init__(url, table)
        self.conninfo = conninfo
        self._db: Any = None  # psycopg.Connection, autocommit: transactions are explicit
        self._lock_key = int.from_bytes(hashlib.sha256(f"orch-sink:{table}".encode()).digest()[:8], "big",
                                        signed=True)

    def _errors(self) -> tuple[type[Exception], ...]:
        import psycopg

        return (psycopg.Error,)

    def _connect(self) -> Any:
        if self._db is None:
            import psycopg
            from psycopg.conninfo import conninfo_to_dict

            try:
                self._db = psycopg.connect(self.conninfo, autocommit=True, connect_timeout=10)
            except psycopg.Error as exc:
                reason = _squash(exc)
                password = str(conninfo_to_dict(self.conninfo).get("password") or "")
                if password:
                    reason = reason.replace(password, "***")
                raise SinkError(f"cannot connect to {self.shown}: {reason}; check the URL and that the "
                                "server runs and lets this user in") from None
        return self._db

    def _sql(self, template: str) -> Any:
        """``template`` with {table} and {progress} filled in as quoted identifiers."""
        from psycopg import sql

        return sql.SQL(template).format(table=sql.Identifier(self.table),
                                        progress=sql.Identifier(self.progress_table))

    def _prepare(self) -> None:
        import psycopg

        db = self._connect()
        try:
            with db.transaction():  # one creator at a time: CREATE TABLE IF NOT EXISTS races otherwise
                db.execute("SELECT pg_advisory_xact_lock(%s)", (self._lock_key,))
                db.execute(self._sql("CREATE TABLE IF NOT EXISTS {table} (job TEXT NOT NULL, seq BIGINT NOT NULL, "
                                     "ok BOOLEAN NOT NULL, output BYTEA, error TEXT, PRIMARY KEY (job, seq))"))
                db.execute(self._sql("CREATE TABLE IF NOT EXISTS {progress} "
                                     "(job TEXT PRIMARY KEY, next_seq BIGINT NOT NULL)"))
        except psycopg.Error as exc:
            raise SinkError(f"cannot create the tables of {self.shown}: {_squash(exc)}") from None

    def _has_tables(self) -> bool:
        row = self._connect().execute("SELECT to_regclass(%s) IS NOT NULL AND to_regclass(%s) IS NOT NULL",
                                      (f'"{self.table}"', f'"{self.progress_table}"')).fetchone()
        return bool(row and row[0])

    def _stored_next(self, job: str) -> int:
        row = self._connect().execute(self._sql("SELECT next_seq FROM {progress} WHERE job = %s"), (job,)).fetchone()
        return int(row[0]) if row else 0

    def _flush(self, rows: list[Row], job: str, next_seq: int) -> None:
        db = self._connect()
        with db.transaction(), db.cursor() as cur:
            with cur.copy(self._sql("COPY {table} (job, seq, ok, output, error) FROM STDIN")) as copy:
                write_row = copy.write_row
                for row in rows:
                    write_row(row)
            cur.execute(self._sql("INSERT INTO {progress} (job, next_seq) VALUES (%s, %s) "
                                  "ON CONFLICT (job) DO UPDATE SET next_seq = excluded.next_seq"), (job, next_seq))

    def _page(self, job: str, after: int) -> list[tuple[Any, ...]]:
        query = self._sql("SELECT seq, ok, output, error FROM {table} WHERE job = %s AND seq >= %s "
                          "ORDER BY seq LIMIT %s")
        rows: list[tuple[Any, ...]] = self._connect().execute(query, (job, after, READ_PAGE)).fetchall()
        return rows

    def _delete_rows(self, job: str) -> None:
        db = self._connect()
        with db.transaction():
            db.execute(self._sql("DELETE FROM {table} WHERE job = %s"), (job,))
            db.execute(self._sql("DELETE FROM {progress} WHERE job = %s"), (job,))

    def _disconnect(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            db.close()


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


def open_sink(url: str, *, root: Path) -> Sink:
    """The sink a URL names; relative paths are under ``root`` (the workspace).  Nothing is
    touched until ``open``/``read``/``delete``."""
    scheme, location, table = _parse(url)
    if scheme == "file":
        return FileSink(url, root / Path(location).expanduser())
    if scheme == "sqlite":
        return SqliteSink(url, root / Path(location).expanduser(), table)
    return PostgresSink(url, location, table)
