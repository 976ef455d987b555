"""The PostgreSQL sink against the machine's real cluster: schema, transactions, concurrency,
connection failures (never showing the password), big payloads.  The contract it shares with
the other sinks is in tests/unit/test_sinks.py."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest

from orchestrator.scheduler.sinks import Record, SinkError, SinkFailed, open_sink
from tests.helpers.postgres import PostgresServer


def rows(url: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url.partition("?")[0]) as db:
        return db.execute(query, params).fetchall()  # type: ignore[arg-type]


def test_schema_and_progress_row(postgres_url: str) -> None:
    with open_sink(f"{postgres_url}?table=primes", root=Path("/")) as sink:
        assert sink.open("job-a", None) == 0
        sink.write([Record(0, True, b"\x00\x01"), Record(1, False, b"boom \x00 here")])
        assert sink.commit() == {"next_seq": 2}
    columns = rows(postgres_url, "SELECT column_name, data_type, is_nullable FROM information_schema.columns "
                                 "WHERE table_name = 'primes' ORDER BY ordinal_position")
    assert columns == [("job", "text", "NO"), ("seq", "bigint", "NO"), ("ok", "boolean", "NO"),
                       ("output", "bytea", "YES"), ("error", "text", "YES")]
    key = rows(postgres_url, "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
                             "AND a.attnum = ANY(i.indkey) WHERE i.indrelid = 'primes'::regclass AND i.indisprimary")
    assert sorted(k for (k,) in key) == ["job", "seq"]
    assert rows(postgres_url, "SELECT seq, ok, output, error FROM primes ORDER BY seq") == [
        (0, True, b"\x00\x01", None), (1, False, None, "boom \\0 here")]
    assert rows(postgres_url, "SELECT job, next_seq FROM primes_progress") == [("job-a", 2)]


def test_a_failed_commit_leaves_rows_and_progress_as_they_were(postgres_url: str) -> None:
    with open_sink(postgres_url, root=Path("/")) as sink:
        sink.open("job-a", None)
        sink.write([Record(i, True, b"%d" % i) for i in range(5)])
        sink.commit()
        sink.write([Record(i, True, b"%d" % i) for i in range(5, 10)])
        with psycopg.connect(postgres_url, autocommit=True) as other:
            other.execute("INSERT INTO orch_output VALUES ('job-a', 7, true, 'x', NULL)")
            with pytest.raises(SinkFailed, match=r"committing failed: .*duplicate key") as caught:
                sink.commit()
            assert "\n" not in str(caught.value)
            assert other.execute("SELECT next_seq FROM orch_output_progress").fetchall() == [(5,)]
            assert other.execute("SELECT count(*) FROM orch_output").fetchall() == [(6,)]
            other.execute("DELETE FROM orch_output WHERE seq = 7")
        assert sink.commit() == {"next_seq": 10}, "the same rows commit once the conflict is gone"
        assert [r.payload for r in sink.read("job-a")] == [b"%d" % i for i in range(10)]


def test_first_opens_of_a_new_table_at_once(postgres_url: str) -> None:
    """CREATE TABLE IF NOT EXISTS races in PostgreSQL; the sink serialises creators."""
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def run(job: str) -> None:
        try:
            with open_sink(f"{postgres_url}?table=raced", root=Path("/")) as sink:
                start.wait()
                sink.open(job, None)
                sink.write([Record(0, True, job.encode())])
                sink.commit()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(f"job-{i}",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert rows(postgres_url, "SELECT count(*) FROM raced") == [(6,)]


def test_jobs_interleaved_in_one_table(postgres_url: str) -> None:
    with open_sink(postgres_url, root=Path("/")) as a, open_sink(postgres_url, root=Path("/")) as b:
        a.open("job-a", None)
        b.open("job-b", None)
        for start in range(0, 600, 100):
            a.write([Record(i, True, b"a%d" % i) for i in range(start, start + 100)])
            b.write([Record(i, i % 3 != 0, b"b%d" % i) for i in range(start, start + 100)])
            b.commit()
            a.commit()
        a.delete("job-a")
        assert list(a.read("job-a")) == []
        got = list(b.read("job-b"))
    assert [r.seq for r in got] == list(range(600)), "read pages through every row in order"
    assert got[3] == Record(3, False, b"b3") and got[4] == Record(4, True, b"b4")


def test_big_payloads(postgres_url: str) -> None:
    big = os.urandom(16 << 20)
    with open_sink(postgres_url, root=Path("/")) as sink:
        sink.open("job-a", None)
        sink.write([Record(0, True, big), Record(1, True, b"")])
        sink.commit()
        assert [r.payload for r in sink.read("job-a")] == [big, b""]


def test_a_wrong_password_is_refused_without_showing_it(postgres_url: str) -> None:
    parts = urlsplit(postgres_url)
    wrong = postgres_url.replace(f":{parts.password}@", ":hunter2-wrong@")
    sink = open_sink(wrong, root=Path("/"))
    with pytest.raises(SinkError, match=r"^--sink: cannot connect to postgresql://\w+:\*\*\*@127\.0\.0\.1:\d+/\w+: "
                                        r".*password authentication failed.*; check the URL") as caught:
        sink.open("job-a", None)
    assert "hunter2" not in str(caught.value) and "\n" not in str(caught.value)
    assert caught.value.exit_code == 2
    sink.close()


def test_nothing_listening(postgres_url: str) -> None:
    sink = open_sink("postgresql://nobody@127.0.0.1:1/none", root=Path("/"))
    with pytest.raises(SinkError, match=r"^--sink: cannot connect to postgresql://nobody@127\.0\.0\.1:1/none: "
                                        r".*refused"):
        sink.open("job-a", None)


def test_the_password_may_come_from_pgpassword(postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    parts = urlsplit(postgres_url)
    assert parts.password
    monkeypatch.setenv("PGPASSWORD", parts.password)
    without = postgres_url.replace(f":{parts.password}@", "@")
    with open_sink(without, root=Path("/")) as sink:
        assert sink.open("job-a", None) == 0


def test_the_fixture_cleans_up(postgres_server: PostgresServer) -> None:
    """What the fixtures make is theirs to drop: no database of theirs outlives its test."""
    left = postgres_server.psql("SELECT datname FROM pg_database JOIN pg_roles ON datdba = pg_roles.oid "
                                f"WHERE rolname = '{postgres_server.role}'")
    assert left.split() == [], "a throwaway database of an earlier test was left behind"
