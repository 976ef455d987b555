"""``postgresql://...[?table=NAME]``: the database sink's tables in PostgreSQL, written with COPY.

psycopg is imported only when a PostgreSQL sink is used, not with this module.  The details
are in the package docstring (:mod:`orchestrator.scheduler.sinks`).
"""

from __future__ import annotations

import hashlib
from typing import Any

from orchestrator.scheduler.sinks.base import READ_PAGE, Row, SinkError, _squash, _TableSink


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
