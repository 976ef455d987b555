"""The file and SQLite sinks (orchestrator/scheduler/sinks/), exactly: modes, messages,
offsets on resume, what a failed open leaves, reading and deleting.  Written to kill the
mutants that survived in docs/mutation.md (tests/unit/test_sinks.py holds the contract)."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import sqlite3
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.scheduler.sinks import Record, SinkError, SinkFailed, open_sink, redact_url
from orchestrator.scheduler.sinks.file import FileSink
from orchestrator.scheduler.sinks.sqlite import SqliteSink


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def records(start: int, stop: int) -> list[Record]:
    return [Record(seq, True, b"out %d\n" % seq) for seq in range(start, stop)]


# -- file ------------------------------------------------------------------------------------


def test_the_output_file_is_0644(tmp_path: Path, umask_022: None) -> None:
    with open_sink("file:out", root=tmp_path) as sink:
        sink.open("j1", None)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o644


def test_a_path_that_cannot_be_opened_is_named(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    with open_sink("file:out", root=tmp_path) as sink, pytest.raises(SinkError) as caught:
        sink.open("j1", None)
    assert caught.value.message == (f'--sink: cannot open "{tmp_path / "out"}": Is a directory; '
                                    "choose a path orch can write")


def test_a_file_another_sink_holds_is_refused(tmp_path: Path) -> None:
    with open_sink("file:out", root=tmp_path) as first, open_sink("file:out", root=tmp_path) as second:
        first.open("j1", None)
        with pytest.raises(SinkError) as caught:
            second.open("j2", None)
    assert caught.value.message == (f'--sink: "{tmp_path / "out"}" is being written by another running job; '
                                    "choose another path")


def test_a_failed_open_leaves_no_new_file(tmp_path: Path) -> None:
    with open_sink("file:out", root=tmp_path) as sink, pytest.raises(SinkFailed):
        sink.open("j1", {"next_seq": 0, "offset": 0})  # a resume into a file that never was
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_an_unreadable_job_marker_is_named(tmp_path: Path) -> None:
    (tmp_path / "out.orch-job").mkdir()
    with open_sink("file:out", root=tmp_path) as sink, pytest.raises(SinkError) as caught:
        sink.open("j1", None)
    assert caught.value.message == f"--sink: cannot read {tmp_path / 'out.orch-job'}: Is a directory"


def test_offsets_add_up_and_a_resume_at_exactly_the_committed_size_goes_on(tmp_path: Path) -> None:
    with open_sink("file:out", root=tmp_path) as sink:
        sink.open("j1", None)
        sink.write(records(0, 2))
        sink.write(records(2, 3))
        checkpoint = sink.commit()
    size = len(b"".join(r.payload for r in records(0, 3)))
    assert checkpoint == {"next_seq": 3, "offset": size} and (tmp_path / "out").stat().st_size == size
    with open_sink("file:out", root=tmp_path) as sink:
        assert sink.open("j1", checkpoint) == 3
        sink.write(records(3, 4))
        assert sink.commit() == {"next_seq": 4, "offset": size + len(b"out 3\n")}
    assert (tmp_path / "out").read_bytes() == b"".join(r.payload for r in records(0, 4))


@pytest.mark.parametrize("bad", ["offset", "next_seq"])
def test_a_bad_checkpoint_is_named_with_the_sink(tmp_path: Path, bad: str) -> None:
    with open_sink("file:out", root=tmp_path) as sink:
        sink.open("j1", None)
    checkpoint = {"next_seq": 0, "offset": 0, bad: "x"}
    with open_sink("file:out", root=tmp_path) as sink, pytest.raises(SinkFailed) as caught:
        sink.open("j1", checkpoint)
    assert caught.value.message == f"sink file:out: the stored checkpoint {checkpoint!r} has no valid {bad}"


def test_reading_gives_ok_pieces_and_refuses_another_jobs_file(tmp_path: Path) -> None:
    with open_sink("file:out", root=tmp_path) as sink:
        sink.open("j1", None)
        sink.write(records(0, 2))
        sink.commit()
        assert [(r.seq, r.ok) for r in sink.read("j1")] == [(0, True)]
        with pytest.raises(SinkFailed) as caught:
            list(sink.read("j2"))
    assert caught.value.message == (f'sink file:out: "{tmp_path / "out"}" does not hold job j2\'s output '
                                    "(it holds job j1's)")


def test_deleting_the_open_job_closes_the_sink(tmp_path: Path) -> None:
    with open_sink("file:out", root=tmp_path) as sink:
        sink.open("j1", None)
        sink.write(records(0, 1))
        sink.delete("j1")
        assert sink.job is None
        with pytest.raises(ValueError, match="commit\\(\\) before open\\(\\)"):
            sink.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_deleting_a_job_whose_output_file_is_already_gone(tmp_path: Path) -> None:
    with open_sink("file:out", root=tmp_path) as sink:
        sink.open("j1", None)
    (tmp_path / "out").unlink()
    with open_sink("file:out", root=tmp_path) as sink:
        sink.delete("j1")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_sink_shows_its_kind_and_url_without_the_password(tmp_path: Path) -> None:
    assert repr(open_sink("file:out", root=tmp_path)) == "FileSink('file:out')"
    assert repr(open_sink("postgresql://u:pw@db/x", root=tmp_path)) == "PostgresSink('postgresql://u:***@db/x')"


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://u:p@ss@host/db", "postgresql://u:***@host/db"),
    ("postgresql://u:pa:ss@host/db", "postgresql://u:***@host/db"),
    ("postgresql://host/db?password=secret&table=", "postgresql://host/db?password=***&table="),
    ("postgresql://host/db?table=t", "postgresql://host/db?table=t"),
])
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


# -- SQLite ------------------------------------------------------------------------------------


def test_tables_of_another_shape_fail_reading_and_deleting_by_name(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "out.db") as db:
        db.execute("CREATE TABLE orch_output (x)")
        db.execute("CREATE TABLE orch_output_progress (y)")
    db.close()
    with open_sink("sqlite:out.db", root=tmp_path) as sink:
        with pytest.raises(SinkFailed) as caught:
            list(sink.read("j1"))
        assert caught.value.message == "sink sqlite:out.db: reading failed: no such column: seq"
        with pytest.raises(SinkFailed) as caught:
            sink.delete("j1")
        assert caught.value.message == "sink sqlite:out.db: deleting failed: no such column: job"


def test_reading_a_database_without_the_tables_gives_nothing_and_creates_nothing(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "out.db") as db:
        db.execute("CREATE TABLE other (x)")
    db.close()
    with open_sink("sqlite:out.db", root=tmp_path) as sink:
        assert list(sink.read("j1")) == []
        sink.delete("j1")
    with sqlite3.connect(tmp_path / "out.db") as db:
        assert [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")] == ["other"]
    db.close()


def test_a_failed_record_without_a_message_reads_back_empty(tmp_path: Path) -> None:
    with open_sink("sqlite:out.db", root=tmp_path) as sink:
        sink.open("j1", None)
        sink.write([Record(0, False, b""), Record(1, True, b"x")])
        sink.commit()
        assert list(sink.read("j1")) == [Record(0, False, b""), Record(1, True, b"x")]


def test_deleting_the_open_job_forgets_it(tmp_path: Path) -> None:
    with open_sink("sqlite:out.db", root=tmp_path) as sink:
        sink.open("j1", None)
        sink.write(records(0, 2))
        sink.commit()
        sink.delete("j1")
        assert sink.job is None
        with pytest.raises(ValueError, match="write\\(\\) before open\\(\\)"):
            sink.write(records(2, 3))
        assert list(sink.read("j1")) == []


def test_a_sqlite_path_that_cannot_be_made_or_opened_is_named(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with open_sink("sqlite:file/out.db", root=tmp_path) as sink, pytest.raises(SinkError) as caught:
        sink.open("j1", None)
    assert caught.value.message == (f'--sink: cannot create the folder "{tmp_path / "file"}" of sqlite:file/out.db: '
                                    "File exists; choose a path orch can write")
    (tmp_path / "dir.db").mkdir()
    with open_sink("sqlite:dir.db", root=tmp_path) as sink, pytest.raises(SinkError) as caught:
        sink.open("j1", None)
    assert caught.value.message == (f'--sink: cannot open the SQLite database "{tmp_path / "dir.db"}": '
                                    "unable to open database file")


def test_a_sqlite_sink_may_be_used_from_another_thread(tmp_path: Path) -> None:
    """The engine opens a job's sink in its thread; the API reads results from its pool."""
    with open_sink("sqlite:out.db", root=tmp_path) as sink:
        sink.open("j1", None)
        sink.write(records(0, 2))
        errors: list[BaseException] = []

        def commit_and_read() -> None:
            try:
                sink.commit()
                assert [r.seq for r in sink.read("j1")] == [0, 1]
            except BaseException as exc:  # (reported by the test's thread)
                errors.append(exc)

        worker = threading.Thread(target=commit_and_read)
        worker.start()
        worker.join(30)
        assert errors == []


def test_a_repeat_and_a_gap_are_told_apart(tmp_path: Path) -> None:
    with open_sink("file:out", root=tmp_path) as sink:
        sink.open("j1", None)
        sink.write(records(0, 2))
        with pytest.raises(ValueError) as repeat:
            sink.write(records(1, 2))
        with pytest.raises(ValueError) as gap:
            sink.write(records(3, 4))
    assert str(repeat.value) == "sink file:out: record seq 1 where 2 was expected (a repeat)"
    assert str(gap.value) == "sink file:out: record seq 3 where 2 was expected (a gap)"


def test_a_query_without_a_password_is_shown_as_written() -> None:
    assert redact_url("postgresql://h/db?table=t&flag") == "postgresql://h/db?table=t&flag"


def test_a_sqlite_sink_reads_every_record_once(tmp_path: Path) -> None:
    with open_sink("sqlite:out.db", root=tmp_path) as sink:
        sink.open("j1", None)
        sink.write(records(0, 5))
        sink.commit()
        assert [r.seq for r in sink.read("j1")] == [0, 1, 2, 3, 4]


def test_a_sqlite_checkpoint_without_a_valid_seq_is_named(tmp_path: Path) -> None:
    with open_sink("sqlite:out.db", root=tmp_path) as sink, pytest.raises(SinkFailed) as caught:
        sink.open("j1", {"next_seq": "x"})
    assert caught.value.message == "sink sqlite:out.db: the stored checkpoint {'next_seq': 'x'} has no valid next_seq"


def test_a_progress_table_of_another_shape_fails_opening_by_name(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "out.db") as db:
        db.execute("CREATE TABLE orch_output_progress (job TEXT)")
    db.close()
    with open_sink("sqlite:out.db", root=tmp_path) as sink, pytest.raises(SinkFailed) as caught:
        sink.open("j1", None)
    assert caught.value.message == "sink sqlite:out.db: reading the progress failed: no such column: next_seq"


# -- failures of the disk, and what the sinks hold on to ----------------------------------------


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Within: this process cannot grow a file past ``limit`` bytes (RLIMIT_FSIZE, with
    SIGXFSZ ignored), so such a write fails with EFBIG, as on a full disk."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    before = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, before)


def test_a_write_the_disk_refuses_is_one_line_naming_the_sink(tmp_path: Path) -> None:
    """A write larger than the file's buffer goes to the disk at once; its failure is a
    SinkFailed naming the sink and the error (not the errno's repr), and nothing counts as written."""
    with open_sink("file:out", root=tmp_path) as sink:
        sink.open("j1", None)
        with file_size_limit(1000), pytest.raises(SinkFailed) as caught:
            sink.write([Record(0, True, b"x" * (2 << 20))])
        assert caught.value.message == "sink file:out: writing failed: File too large"
        assert isinstance(sink, FileSink) and (sink.offset, sink.next_seq) == (0, 0)


def test_a_commit_the_disk_refuses_is_one_line_naming_the_sink(tmp_path: Path) -> None:
    """A small write waits in the buffer; the commit's flush is where the disk refuses it."""
    with open_sink("file:out", root=tmp_path) as sink:
        sink.open("j1", None)
        sink.write(records(0, 3))
        with file_size_limit(4), pytest.raises(SinkFailed) as caught:
            sink.commit()
        assert caught.value.message == "sink file:out: committing failed: File too large"


def test_a_resume_makes_its_truncation_durable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A resume cuts what was written after the checkpoint away, and fsyncs the file at
    that size before anything is written after it (else a crash could bring the cut
    output back, behind the resumed output)."""
    with open_sink("file:out", root=tmp_path) as sink:
        sink.open("j1", None)
        sink.write(records(0, 3))
        checkpoint = sink.commit()
        sink.write(records(3, 5))  # never committed: the scheduler crashed here
    path = tmp_path / "out"
    assert path.stat().st_size > checkpoint["offset"]
    synced: list[tuple[int, int]] = []  # (inode, size) of every file fsynced
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        status = os.fstat(fd)
        synced.append((status.st_ino, status.st_size))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with open_sink("file:out", root=tmp_path) as sink:
        assert sink.open("j1", checkpoint) == 3
        assert (path.stat().st_ino, checkpoint["offset"]) in synced, synced
    assert path.stat().st_size == checkpoint["offset"]


def test_a_sqlite_sink_waits_30_s_for_a_database_another_writer_holds(tmp_path: Path) -> None:
    with open_sink("sqlite:out.db", root=tmp_path) as sink:
        sink.open("j1", None)
        assert isinstance(sink, SqliteSink)
        assert sink._connect().execute("PRAGMA busy_timeout").fetchone() == (30000,)


def test_a_sqlite_sink_keeps_one_connection_until_it_is_closed(tmp_path: Path) -> None:
    with open_sink("sqlite:out.db", root=tmp_path) as sink:
        sink.open("j1", None)
        assert isinstance(sink, SqliteSink)
        db = sink._connect()
        sink.write(records(0, 2))
        sink.commit()
        assert sink._connect() is db and sink._db is db
    assert sink._db is None


def test_tables_that_cannot_be_created_are_named(tmp_path: Path) -> None:
    """An index that has the output table's name: CREATE TABLE IF NOT EXISTS still fails."""
    with sqlite3.connect(tmp_path / "out.db") as db:
        db.execute("CREATE TABLE other (x)")
        db.execute("CREATE INDEX orch_output ON other (x)")
    db.close()
    with open_sink("sqlite:out.db", root=tmp_path) as sink, pytest.raises(SinkError) as caught:
        sink.open("j1", None)
    assert caught.value.message == ("--sink: cannot create the tables of sqlite:out.db: "
                                    "there is already an index named orch_output")
