"""``file:PATH``: the ok payloads concatenated in seq order, with a sidecar naming the job.

The details are in the package docstring (:mod:`orchestrator.scheduler.sinks`).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from orchestrator.scheduler.sinks.base import Record, Sink, SinkError, SinkFailed, _make_folder

READ_PIECE = 1 << 20
"""The largest Record a file sink's ``read`` yields."""
MARKER_SUFFIX = ".orch-job"


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
