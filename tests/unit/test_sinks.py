"""orchestrator.scheduler.sinks: one contract for the file, SQLite and PostgreSQL sinks, then each one's own.

The contract tests run against all three sinks; the PostgreSQL case needs the machine's
cluster (``tests/helpers/postgres.py``, the fixtures in tests/conftest.py) and skips, saying why, without it.
"""

from __future__ import annotations

import os
import re
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from orchestrator.errors import InputError, StateError
from orchestrator.scheduler.sinks import (
    FileSink,
    Record,
    Sink,
    SinkError,
    SinkFailed,
    check_sink_url,
    open_sink,
    redact_url,
)


def records(start: int, stop: int, *, fail_every: int = 7) -> list[Record]:
    """Records start..stop-1; every ``fail_every``-th one a failure with its message."""
    out = []
    for seq in range(start, stop):
        if fail_every and seq % fail_every == fail_every - 1:
            out.append(Record(seq, False, b"task %d: killed by SIGSEGV" % seq))
        else:
            out.append(Record(seq, True, b"output %d\n" % seq))
    return out


@dataclass
class Target:
    """One kind of sink under test, and how to look at what it holds."""

    kind: str
    url: str
    root: Path

    def new(self, url: str | None = None) -> Sink:
        return open_sink(url or self.url, root=self.root)

    def url_for_another_job(self) -> str:
        """File sinks hold one job per file; database sinks share their table."""
        return "file:other.out" if self.kind == "file" else self.url

    def expect(self, written: Sequence[Record]) -> bytes | list[Record]:
        if self.kind == "file":
            return b"".join(r.payload for r in written if r.ok)
        return list(written)

    def stored(self, job: str, url: str | None = None) -> bytes | list[Record]:
        with self.new(url) as sink:
            found = list(sink.read(job))
        if self.kind == "file":
            return b"".join(r.payload for r in found)
        return found


@pytest.fixture(params=["file", "sqlite", "postgresql"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    kind = request.param
    if kind == "file":
        return Target(kind, "file:job.out", tmp_path)
    if kind == "sqlite":
        return Target(kind, "sqlite:out.db", tmp_path)
    return Target(kind, request.getfixturevalue("postgres_url"), tmp_path)


@pytest.fixture
def sink(target: Target) -> Iterator[Sink]:
    opened = target.new()
    try:
        yield opened
    finally:
        opened.close()


def crash(sink: Sink) -> None:
    """The process dies: what the file sink wrote reaches the file (unsynced), database
    sinks lose their uncommitted rows."""
    if isinstance(sink, FileSink) and sink._file is not None:
        sink._file.flush()
    sink.close()


# -- the contract ---------------------------------------------------------------------------


def test_a_new_job_starts_at_zero(sink: Sink, target: Target) -> None:
    assert sink.open("job-a", None) == 0
    assert sink.commit()["next_seq"] == 0
    assert target.stored("job-a") == target.expect([])


def test_records_come_back_in_order(sink: Sink, target: Target) -> None:
    sink.open("job-a", None)
    written: list[Record] = []
    for start, stop in [(0, 1), (1, 40), (40, 41), (41, 100)]:
        batch = records(start, stop)
        sink.write(batch)
        written += batch
        if stop in (41, 100):
            checkpoint = sink.commit()
            assert checkpoint["next_seq"] == stop
    sink.write([])  # nothing: fine
    assert sink.commit()["next_seq"] == 100
    assert target.stored("job-a") == target.expect(written)


def test_payloads_of_any_bytes(sink: Sink, target: Target) -> None:
    sink.open("job-a", None)
    odd = [Record(0, True, b""), Record(1, True, bytes(range(256))), Record(2, False, "échec \x00 ✗".encode()),
           Record(3, True, b"\x00" * 10), Record(4, True, os.urandom(300_000))]
    sink.write(odd)
    sink.commit()
    stored = target.stored("job-a")
    if target.kind == "file":
        assert stored == target.expect(odd)
    else:
        assert isinstance(stored, list)
        assert [r for r in stored if r.ok] == [r for r in odd if r.ok]
        failed = [r for r in stored if not r.ok]
        assert [r.seq for r in failed] == [2]
        assert failed[0].payload.decode().startswith("échec ") and "✗" in failed[0].payload.decode()


BAD_BATCHES: dict[str, list[int]] = {
    "gap at the start": [3],
    "repeat of the last": [1],
    "repeat of the first": [0],
    "gap inside": [2, 4],
    "out of order": [3, 2],
    "twice inside": [2, 2],
}


@pytest.mark.parametrize("name", list(BAD_BATCHES))
def test_gaps_and_repeats_are_refused(name: str, sink: Sink, target: Target) -> None:
    sink.open("job-a", None)
    sink.write(records(0, 2))
    with pytest.raises(ValueError, match=r"record seq \d+ where [23] was expected \((a gap|a repeat)\)"):
        sink.write([Record(seq, True, b"x") for seq in BAD_BATCHES[name]])
    sink.write(records(2, 4))  # a refused batch changed nothing
    sink.commit()
    assert target.stored("job-a") == target.expect(records(0, 4))


def test_write_and_commit_before_open_are_bugs(sink: Sink) -> None:
    with pytest.raises(ValueError, match=r"write\(\) before open\(\)"):
        sink.write(records(0, 1))
    with pytest.raises(ValueError, match=r"commit\(\) before open\(\)"):
        sink.commit()


def test_resume_after_a_crash_keeps_exactly_what_was_committed(sink: Sink, target: Target) -> None:
    sink.open("job-a", None)
    sink.write(records(0, 10))
    checkpoint = sink.commit()
    assert checkpoint["next_seq"] == 10
    sink.write(records(10, 15))  # never committed
    crash(sink)

    again = target.new()
    try:
        assert again.open("job-a", checkpoint) == 10
        assert target.stored("job-a") == target.expect(records(0, 10))
        again.write(records(10, 13))
        assert again.commit()["next_seq"] == 13
    finally:
        again.close()
    assert target.stored("job-a") == target.expect(records(0, 13))


def test_a_commit_the_store_never_kept(sink: Sink, target: Target) -> None:
    """Crash between the sink's commit and the store keeping its checkpoint: a database sink
    knows its own progress (it wins); the file sink goes back to the checkpoint it is given."""
    sink.open("job-a", None)
    sink.write(records(0, 10))
    kept = sink.commit()
    sink.write(records(10, 15))
    sink.commit()  # durable in the sink, lost by the store
    crash(sink)
    again = target.new()
    try:
        expected_next = 10 if target.kind == "file" else 15
        assert again.open("job-a", kept) == expected_next
        assert target.stored("job-a") == target.expect(records(0, expected_next))
        again.write(records(expected_next, 20))
        again.commit()
    finally:
        again.close()
    assert target.stored("job-a") == target.expect(records(0, 20))


def test_a_checkpoint_beyond_the_sink_is_refused(sink: Sink, target: Target) -> None:
    sink.open("job-a", None)
    sink.write(records(0, 10))
    checkpoint = sink.commit()
    sink.close()
    claimed = dict(checkpoint, next_seq=checkpoint["next_seq"] + 5)
    if "offset" in claimed:
        claimed["offset"] += 100
    again = target.new()
    with pytest.raises(SinkFailed, match=r"cannot resume") as caught:
        again.open("job-a", claimed)
    again.close()
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("checkpoint", [{"next_seq": -1, "offset": 0}, {"offset": 0}, {"next_seq": "3", "offset": 0},
                                        {"next_seq": 0}])
def test_a_malformed_checkpoint_is_refused(checkpoint: dict[str, Any], sink: Sink, target: Target) -> None:
    sink.open("job-a", None)
    sink.commit()
    sink.close()
    with target.new() as again:
        if target.kind != "file" and checkpoint.get("next_seq") == 0:
            assert again.open("job-a", checkpoint) == 0  # database sinks need only next_seq
            return
        with pytest.raises(SinkFailed, match=r"checkpoint"):
            again.open("job-a", checkpoint)


def test_commit_twice_and_close_twice(sink: Sink) -> None:
    sink.open("job-a", None)
    sink.write(records(0, 3))
    assert sink.commit() == sink.commit()
    sink.close()
    sink.close()


def test_delete_removes_every_trace_of_the_job(sink: Sink, target: Target) -> None:
    other_url = target.url_for_another_job()
    with target.new(other_url) as other:
        other.open("job-b", None)
        other.write(records(0, 5))
        other.commit()
    sink.open("job-a", None)
    sink.write(records(0, 10))
    sink.commit()
    sink.delete("job-a")
    assert target.stored("job-a") == target.expect([])
    assert target.stored("job-b", other_url) == target.expect(records(0, 5)), "another job's output stays"
    if target.kind == "file":
        assert sorted(p.name for p in target.root.iterdir()) == ["other.out", "other.out.orch-job"]
    if target.kind == "sqlite":
        with sqlite3.connect(target.root / "out.db") as db:
            assert db.execute("SELECT count(*) FROM orch_output WHERE job = 'job-a'").fetchone() == (0,)
            assert db.execute("SELECT count(*) FROM orch_output_progress WHERE job = 'job-a'").fetchone() == (0,)
        db.close()
    with target.new() as fresh:
        assert fresh.open("job-a", None) == 0, "a deleted job starts again from nothing"
        fresh.delete("job-a")
        fresh.delete("job-a")  # twice, or a job never seen: nothing to do
        fresh.delete("never-was")


def test_reading_a_job_the_sink_never_saw(target: Target) -> None:
    assert target.stored("nobody") == target.expect([])
    with target.new() as sink:
        sink.delete("nobody")
    assert list(target.root.iterdir()) == [], "reading and deleting create nothing"


def test_thousands_of_records_over_many_commits(sink: Sink, target: Target) -> None:
    sink.open("job-a", None)
    for start in range(0, 20_000, 1000):
        sink.write(records(start, start + 1000))
        assert sink.commit()["next_seq"] == start + 1000
    assert target.stored("job-a") == target.expect(records(0, 20_000))


# -- the file sink ----------------------------------------------------------------------------


@pytest.fixture
def file_sink(tmp_path: Path) -> Iterator[Sink]:
    opened = open_sink("file:job.out", root=tmp_path)
    try:
        yield opened
    finally:
        opened.close()


def test_file_holds_only_ok_payloads_and_a_job_marker(file_sink: Sink, tmp_path: Path) -> None:
    file_sink.open("job-a", None)
    file_sink.write([Record(0, True, b"a"), Record(1, False, b"boom"), Record(2, True, b"c")])
    assert file_sink.commit() == {"next_seq": 3, "offset": 2}
    assert (tmp_path / "job.out").read_bytes() == b"ac"
    assert (tmp_path / "job.out.orch-job").read_text() == "job-a\n"


@pytest.mark.parametrize(("owner", "content", "expect"), [
    (None, b"precious", r'^--sink: ".*job\.out" is not empty; choose another path, or delete that job or the file'),
    ("job-b", b"b's output", r"^--sink: \".*job\.out\" is job job-b's output; choose another path"),
])
def test_file_sink_refuses_a_file_of_another(owner: str | None, content: bytes, expect: str, tmp_path: Path) -> None:
    (tmp_path / "job.out").write_bytes(content)
    if owner:
        (tmp_path / "job.out.orch-job").write_text(owner + "\n")
    sink = open_sink("file:job.out", root=tmp_path)
    with pytest.raises(SinkError, match=expect) as caught:
        sink.open("job-a", None)
    assert isinstance(caught.value, InputError) and caught.value.exit_code == 2
    assert (tmp_path / "job.out").read_bytes() == content, "the file is untouched"
    assert (tmp_path / "job.out.orch-job").exists() == bool(owner)


def test_file_sink_takes_an_empty_file_and_restarts_its_own_job(tmp_path: Path) -> None:
    (tmp_path / "job.out").write_bytes(b"")
    with open_sink("file:job.out", root=tmp_path) as sink:
        assert sink.open("job-a", None) == 0
        sink.write(records(0, 4))
        sink.commit()
    with open_sink("file:job.out", root=tmp_path) as sink:  # same job, no checkpoint kept: from the start
        assert sink.open("job-a", None) == 0
        sink.write(records(0, 2))
        sink.commit()
    assert (tmp_path / "job.out").read_bytes() == b"output 0\noutput 1\n"


def test_file_sink_resume_into_a_file_taken_over(tmp_path: Path) -> None:
    with open_sink("file:job.out", root=tmp_path) as sink:
        sink.open("job-a", None)
        sink.write(records(0, 3))
        checkpoint = sink.commit()
    (tmp_path / "job.out.orch-job").write_text("job-z\n")
    with pytest.raises(SinkFailed, match=r"now belongs to job job-z; job job-a cannot resume"):
        open_sink("file:job.out", root=tmp_path).open("job-a", checkpoint)
    (tmp_path / "job.out.orch-job").unlink()
    with pytest.raises(SinkFailed, match=r"has lost its job marker"):
        open_sink("file:job.out", root=tmp_path).open("job-a", checkpoint)
    with pytest.raises(SinkFailed, match=r"does not hold job job-a's output \(it has no job marker"):
        list(open_sink("file:job.out", root=tmp_path).read("job-a"))


def test_file_sink_is_locked_while_open(file_sink: Sink, tmp_path: Path) -> None:
    file_sink.open("job-a", None)
    with pytest.raises(SinkError, match=r"being written by another running job"):
        open_sink(f"file:{tmp_path}/job.out", root=Path("/nonexistent")).open("job-a", None)
    file_sink.close()
    with open_sink("file:job.out", root=tmp_path) as again:
        assert again.open("job-a", None) == 0


def test_file_sink_reads_in_pieces(file_sink: Sink) -> None:
    file_sink.open("job-a", None)
    big = os.urandom((5 << 20) // 2)
    file_sink.write([Record(0, True, big)])
    file_sink.commit()
    pieces = list(file_sink.read("job-a"))
    assert [len(p.payload) for p in pieces] == [1 << 20, 1 << 20, len(big) - (2 << 20)]
    assert [p.seq for p in pieces] == [0, 1, 2]
    assert b"".join(p.payload for p in pieces) == big


@pytest.mark.parametrize("url", ["file:new/folder/job.out", "sqlite:new/folder/out.db"])
def test_a_missing_folder_is_made(url: str, tmp_path: Path) -> None:
    with open_sink(url, root=tmp_path) as sink:
        sink.open("job-a", None)
        sink.write(records(0, 2))
        sink.commit()
    assert (tmp_path / "new" / "folder").is_dir()


def test_a_folder_that_cannot_be_made(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("a file, not a folder")
    with pytest.raises(SinkError, match=r'^--sink: cannot create the folder ".*plain/sub" of file:plain/sub/x\.out: '):
        open_sink("file:plain/sub/x.out", root=tmp_path).open("job-a", None)


# -- the SQLite sink ------------------------------------------------------------------------------


def test_sqlite_schema_wal_and_progress_row(tmp_path: Path) -> None:
    with open_sink("sqlite:out.db?table=primes", root=tmp_path) as sink:
        sink.open("job-a", None)
        sink.write(records(0, 7))
        sink.commit()
        db = sqlite3.connect(tmp_path / "out.db")
        try:
            assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
            columns = [(row[1], row[2], row[5]) for row in db.execute("PRAGMA table_info(primes)")]
            assert columns == [("job", "TEXT", 1), ("seq", "INTEGER", 2), ("ok", "INTEGER", 0),
                               ("output", "BLOB", 0), ("error", "TEXT", 0)]
            assert db.execute("SELECT job, next_seq FROM primes_progress").fetchall() == [("job-a", 7)]
            assert db.execute("SELECT seq, ok, output, error FROM primes WHERE seq >= 5 ORDER BY seq").fetchall() == \
                [(5, 1, b"output 5\n", None), (6, 0, None, "task 6: killed by SIGSEGV")]
        finally:
            db.close()


def test_sqlite_failed_commit_changes_nothing_and_can_be_retried(tmp_path: Path) -> None:
    with open_sink("sqlite:out.db", root=tmp_path) as sink:
        sink.open("job-a", None)
        sink.write(records(0, 5))
        sink.commit()
        sink.write(records(5, 10))
        db = sqlite3.connect(tmp_path / "out.db", isolation_level=None)
        try:
            db.execute("INSERT INTO orch_output VALUES ('job-a', 8, 1, x'00', NULL)")  # someone else's row
            with pytest.raises(SinkFailed, match=r"committing failed: UNIQUE constraint failed"):
                sink.commit()
            assert db.execute("SELECT next_seq FROM orch_output_progress").fetchone() == (5,)
            assert db.execute("SELECT count(*) FROM orch_output").fetchone() == (6,)
            db.execute("DELETE FROM orch_output WHERE seq = 8")
        finally:
            db.close()
        assert sink.commit() == {"next_seq": 10}
    assert [r.seq for r in open_sink("sqlite:out.db", root=tmp_path).read("job-a")] == list(range(10))


@pytest.mark.parametrize(("prepare", "url", "expect"), [
    (lambda tmp: (tmp / "junk.db").write_bytes(b"not a database, not at all" * 100), "sqlite:junk.db",
     r'^--sink: ".*junk\.db" is not a usable SQLite database: file is not a database'),
    (lambda tmp: (tmp / "plain").write_text("x"), "sqlite:plain/out.db", r"^--sink: cannot create the folder"),
])
def test_sqlite_sink_refuses(prepare: Any, url: str, expect: str, tmp_path: Path) -> None:
    if prepare:
        prepare(tmp_path)
    sink = open_sink(url, root=tmp_path)
    with pytest.raises(SinkError, match=expect):
        sink.open("job-a", None)
    sink.close()


# -- URLs ---------------------------------------------------------------------------------------------

GOOD_URLS = ["file:out.txt", "file:/tmp/x/out.txt", "file:~/out.txt", "sqlite:out.db", "sqlite:/var/lib/o.db",
             "sqlite:out.db?table=primes", "postgresql://orch@localhost/orch", "postgres://u:pw@db:5433/x",
             "postgresql://orch@localhost/orch?table=t1&sslmode=disable", "postgresql:///orch"]

BAD_URLS = {
    "out.txt": r'^--sink: "out\.txt" has no scheme; use file:PATH, sqlite:PATH\[\?table=NAME\] or postgresql://',
    "s3://bucket/x": r'^--sink: unknown sink "s3://bucket/x"; use file:PATH',
    "file:": r'^--sink: "file:" names no file; write file:PATH$',
    "file:///abs/out": r"without //",
    "sqlite:": r"names no file; write sqlite:PATH",
    "sqlite::memory:": r"in-memory SQLite database keeps nothing",
    "sqlite:o.db?tabel=x": r'unknown parameter "tabel"; the only one is \?table=NAME',
    "sqlite:o.db?table=Out": r'table "Out" is not a plain name; use lower-case letters',
    "sqlite:o.db?table=1x": r"is not a plain name",
    "sqlite:o.db?table=x;drop": r"is not a plain name",
    "sqlite:o.db?table": r"the part after \? is not NAME=VALUE|not a plain name",
    "postgresql://u@h/db?table=a-b": r'table "a-b" is not a plain name',
    "postgresql://u:hunter2@h/db?bogus=1": r"is not a PostgreSQL URL libpq accepts: .*bogus",
}


@pytest.mark.parametrize("url", GOOD_URLS)
def test_good_sink_urls(url: str) -> None:
    check_sink_url(url)


@pytest.mark.parametrize("url", list(BAD_URLS))
def test_bad_sink_urls_are_one_line_naming_sink(url: str) -> None:
    with pytest.raises(SinkError) as caught:
        check_sink_url(url)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("--sink: ")
    assert re.search(BAD_URLS[url], message), f"{message!r} does not match {BAD_URLS[url]!r}"
    assert "hunter2" not in message
    assert caught.value.exit_code == 2


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://orch:hunter2@db/x?table=t", "postgresql://orch:***@db/x?table=t"),
    ("postgresql://orch@db/x", "postgresql://orch@db/x"),
    ("postgresql://db/x?user=o&password=hunter2", "postgresql://db/x?user=o&password=***"),
    ("file:out.txt", "file:out.txt"),
])
def test_passwords_are_never_shown(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    if url.startswith("postgresql"):
        assert "hunter2" not in repr(open_sink(url, root=Path("/")))


def test_sink_errors_sit_in_the_tree() -> None:
    assert issubclass(SinkError, InputError) and SinkError.exit_code == 2
    assert issubclass(SinkFailed, StateError) and SinkFailed.exit_code == 4
