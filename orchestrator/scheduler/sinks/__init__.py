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

The package, by concept (import everything from here: the names below are re-exported)::

    base.py      the Sink interface, Record, SinkError, SinkFailed, redact_url, the base of
                 the database sinks and the URL parsing (check_sink_url)
    file.py      FileSink
    sqlite.py    SqliteSink
    postgres.py  PostgresSink (psycopg is imported only when a PostgreSQL sink is used)
    __init__.py  open_sink: the sink a URL names
"""

from __future__ import annotations

from pathlib import Path

from orchestrator.scheduler.sinks.base import (
    DEFAULT_TABLE,
    READ_PAGE,
    Record,
    Row,
    Sink,
    SinkError,
    SinkFailed,
    _parse,
    check_sink_url,
    redact_url,
)
from orchestrator.scheduler.sinks.file import MARKER_SUFFIX, READ_PIECE, FileSink
from orchestrator.scheduler.sinks.postgres import PostgresSink
from orchestrator.scheduler.sinks.sqlite import SqliteSink


def open_sink(url: str, *, root: Path) -> Sink:
    """The sink a URL names; relative paths are under ``root`` (the workspace).  Nothing is
    touched until ``open``/``read``/``delete``."""
    scheme, location, table = _parse(url)
    if scheme == "file":
        return FileSink(url, root / Path(location).expanduser())
    if scheme == "sqlite":
        return SqliteSink(url, root / Path(location).expanduser(), table)
    return PostgresSink(url, location, table)


__all__ = [
    "DEFAULT_TABLE",
    "MARKER_SUFFIX",
    "READ_PAGE",
    "READ_PIECE",
    "FileSink",
    "PostgresSink",
    "Record",
    "Row",
    "Sink",
    "SinkError",
    "SinkFailed",
    "SqliteSink",
    "check_sink_url",
    "open_sink",
    "redact_url",
]
