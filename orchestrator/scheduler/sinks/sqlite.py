"""``sqlite:PATH[?table=NAME]``: the database sink's tables in a SQLite file (WAL, synchronous=FULL).

The details are in the package docstring (:mod:`orchestrator.scheduler.sinks`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from orchestrator.scheduler.sinks.base import READ_PAGE, Row, SinkError, _make_folder, _TableSink


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
