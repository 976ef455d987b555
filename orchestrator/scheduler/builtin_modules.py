"""The built-in work modules (``--module NAME``, options as ``--option KEY=VALUE``).

This module owns ``range`` (:class:`RangeModule`, :func:`parse_range`) and the file
modules ``lines`` and ``chunks`` (:class:`LinesModule`, :class:`ChunksModule`, their
shared ``_FileModule`` and :func:`open_input_file`); the contract they implement is
``workmodules.WorkModule``.

    range    input "START:END" (or "START END"): the half-open range [START, END) of
             unsigned 64-bit integers.  A task of size s covers max(1, round(s * max_span))
             numbers (never past END) and its data is ASCII "A B", the range [A, B),
             which is what ``releases/primes/primes.c`` parses.  max_span: 1_000_000.
    lines    input a file: a task of size s carries max(1, round(s * max_lines)) lines,
             each with its "\\n" as in the file (a last line without one stays without),
             and never more than the task frame's limit of bytes.  max_lines: 1000.
    chunks   input a file: a task carries max(1, round(s * max_bytes)) bytes.
             max_bytes: 1 MiB (at most the task frame's limit, 64 MiB).

File modules hold their file open: call ``close()`` (or use the module as a context
manager) when a job stops early; a module closes its file itself once exhausted.  All
three cut a task in pieces (``can_split``) for the engine's isolation of failures.
"""

from __future__ import annotations

import io
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

from orchestrator.agent.frames import MAX_DATA
from orchestrator.errors import StateError
from orchestrator.scheduler.workmodules import (
    WorkModule,
    WorkModuleError,
    _int_option,
    _position_int,
    _task_count,
)

UINT64_MAX = (1 << 64) - 1


# -- range ---------------------------------------------------------------------------

_RANGE = re.compile(r"\s*([+-]?\d+)\s*(?::|\s)\s*([+-]?\d+)\s*", re.ASCII)


def parse_range(text: str) -> tuple[int, int]:
    """``"START:END"`` or ``"START END"`` -> (START, END), checked; WorkModuleError naming --input."""
    match = _RANGE.fullmatch(text)
    if not match:
        raise WorkModuleError("--input", f'range "{text}" is not START:END; write two whole numbers such as 0:1000000')
    start, end = int(match[1]), int(match[2])
    if start < 0 or end < 0:
        raise WorkModuleError("--input", f'range "{text}": a bound is negative; '
                              f"ranges are of unsigned 64-bit integers, 0 to {UINT64_MAX}")
    if end > UINT64_MAX:
        raise WorkModuleError("--input", f'range "{text}": END does not fit in 64 bits; '
                              f"the largest END is {UINT64_MAX}")
    if start > end:
        raise WorkModuleError("--input", f'range "{text}": START is after END; write START:END with START <= END')
    return start, end


class RangeModule(WorkModule):
    """[START, END) in tasks of up to ``max_span`` numbers; data ``b"A B"``."""

    name = "range"
    unit = "numbers"
    option_names = frozenset({"max_span"})

    def __init__(self, input: str, options: Mapping[str, Any], position: Mapping[str, Any] | None = None) -> None:
        super().__init__(input, options, position)
        self.start, self.end = parse_range(input)
        self.max_span = _int_option(self.options, "max_span", 1_000_000, maximum=UINT64_MAX)
        self.min_size = 1.0 / self.max_span
        self._next = self.start if position is None else _position_int(position, "next", self.name,
                                                                        self.start, self.end)

    def next(self, size: float) -> bytes | None:
        low = self._next
        if low >= self.end:
            return None
        high = low + _task_count(size, self.max_span)
        if high > self.end:
            high = self.end
        self._next = high
        return b"%d %d" % (low, high)

    def next_many(self, size: float, count: int) -> list[bytes]:
        low = self._next
        if low >= self.end or count <= 0:
            return []
        span = _task_count(size, self.max_span)
        count = min(count, -(-(self.end - low) // span))
        high = min(low + count * span, self.end)
        self._next = high
        cuts = range(low, high, span)
        out = [b"%d %d" % (a, a + span) for a in cuts]
        out[-1] = b"%d %d" % (cuts[-1], high)
        return out

    def position(self) -> dict[str, Any]:
        return {"next": self._next}

    def progress(self) -> tuple[float, float | None]:
        return float(self._next - self.start), float(self.end - self.start)

    can_split = True

    @staticmethod
    def _bounds(data: bytes) -> tuple[int, int]:
        low, high = data.split()
        return int(low), int(high)

    def units(self, data: bytes) -> int:
        low, high = self._bounds(data)
        return high - low

    def cut(self, data: bytes, low: int, high: int) -> bytes:
        first, _ = self._bounds(data)
        return b"%d %d" % (first + low, first + high)

    def locate(self, data: bytes, origin: int | None, low: int, high: int) -> dict[str, Any]:
        first, _ = self._bounds(data)
        return {"unit": "numbers", "first": first + low, "last": first + high - 1}


# -- files -----------------------------------------------------------------------------


def open_input_file(path: str) -> tuple[BinaryIO, int]:
    """Open a work module's input file for reading: (file, size); WorkModuleError naming --input."""
    if not path:
        raise WorkModuleError("--input", "no file given; give the path of the input file")
    shown = f'"{path}"'
    try:  # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below
        fd = os.open(Path(path).expanduser(), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise WorkModuleError("--input", f"no file {shown}; give the path of an existing file") from None
    except IsADirectoryError:
        raise WorkModuleError("--input", f"{shown} is a folder; give the path of a file") from None
    except PermissionError:
        raise WorkModuleError("--input", f"cannot read {shown}: permission denied; "
                              "make it readable for the orch user") from None
    except OSError as exc:
        raise WorkModuleError("--input", f"cannot read {shown}: {exc.strerror or exc}") from None
    info = os.fstat(fd)
    if stat.S_ISDIR(info.st_mode):
        os.close(fd)
        raise WorkModuleError("--input", f"{shown} is a folder; give the path of a file")
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise WorkModuleError("--input", f"{shown} is not a regular file; a job's input must be a file it can "
                              "seek in (to resume), not a pipe or device")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb"), info.st_size


class _FileModule(WorkModule):
    """Shared by ``lines`` and ``chunks``: the file, its size, the byte offset reached."""

    unit = "bytes"
    max_task_bytes: ClassVar[int] = MAX_DATA
    """The most bytes one task carries: the task frame's limit."""

    def __init__(self, input: str, options: Mapping[str, Any], position: Mapping[str, Any] | None = None) -> None:
        super().__init__(input, options, position)
        self._file: BinaryIO | None = None
        self._offset = 0

    def _open(self, position: Mapping[str, Any] | None) -> None:
        """Open the input; on resume check it is the same size and seek to the stored offset."""
        handle, self.size = open_input_file(self.input)
        try:
            if position is not None:
                size = position.get("size")
                if size != self.size:
                    raise StateError(f'work module {self.name}: input "{self.input}" changed since the job started '
                                     f"(it was {size} bytes, it is {self.size}); the job cannot resume")
                self._offset = _position_int(position, "offset", self.name, 0, self.size)
                handle.seek(self._offset)
        except BaseException:
            handle.close()
            raise
        self._file = handle

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def progress(self) -> tuple[float, float | None]:
        return float(self._offset), float(self.size)


class LinesModule(_FileModule):
    """Up to ``max_lines`` lines per task, each as in the file; position = byte offset + line count."""

    name = "lines"
    option_names = frozenset({"max_lines"})

    def __init__(self, input: str, options: Mapping[str, Any], position: Mapping[str, Any] | None = None) -> None:
        super().__init__(input, options, position)
        self.max_lines = _int_option(self.options, "max_lines", 1000, maximum=1 << 40)
        self.min_size = 1.0 / self.max_lines
        self._lines = 0
        self._open(position)
        if position is not None:
            try:
                self._check_resume(position)
            except BaseException:
                self.close()
                raise

    def _check_resume(self, position: Mapping[str, Any]) -> None:
        self._lines = _position_int(position, "lines", self.name, 0, self._offset)
        if 0 < self._offset < self.size and self._byte_before_offset() != b"\n":
            raise StateError(f'work module lines: the stored offset {self._offset} of "{self.input}" is not at '
                                 "the start of a line: the file changed since the job started; the job cannot resume")

    def _byte_before_offset(self) -> bytes:
        assert self._file is not None
        self._file.seek(self._offset - 1)
        return self._file.read(1)

    def next(self, size: float) -> bytes | None:
        count = _task_count(size, self.max_lines)
        handle = self._file
        if handle is None:
            return None
        readline = handle.readline
        budget = self.max_task_bytes
        lines: list[bytes] = []
        for _ in range(count):
            line = readline(budget + 1)
            if not line:
                break
            if len(line) > budget:  # does not fit in this task
                if not lines:
                    handle.seek(self._offset)
                    raise WorkModuleError(
                        "--input", f'line {self._lines + 1} of "{self.input}" is longer than {self.max_task_bytes} '
                        "bytes, the most one task can carry; use the chunks module for this file")
                handle.seek(-len(line), io.SEEK_CUR)
                break
            lines.append(line)
            budget -= len(line)
        if not lines:
            self.close()
            return None
        data = b"".join(lines)
        self._offset += len(data)
        self._lines += len(lines)
        return data

    def position(self) -> dict[str, Any]:
        return {"offset": self._offset, "lines": self._lines, "size": self.size}

    @property
    def lines_done(self) -> int:
        return self._lines

    can_split = True

    def origin(self) -> int | None:
        return self._lines

    def units(self, data: bytes) -> int:
        return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)

    def cut(self, data: bytes, low: int, high: int) -> bytes:
        return data[_line_start(data, low):_line_start(data, high)]

    def locate(self, data: bytes, origin: int | None, low: int, high: int) -> dict[str, Any]:
        if origin is None:
            return {"unit": "lines of the task", "first": low + 1, "last": high}
        return {"unit": "lines", "first": origin + low + 1, "last": origin + high}


def _line_start(data: bytes, index: int) -> int:
    """The offset in ``data`` where its line ``index`` (from 0) starts; len(data) past the last."""
    pos = 0
    for _ in range(index):
        found = data.find(b"\n", pos)
        if found < 0:
            return len(data)
        pos = found + 1
    return pos


class ChunksModule(_FileModule):
    """Up to ``max_bytes`` bytes per task; position = byte offset."""

    name = "chunks"
    option_names = frozenset({"max_bytes"})

    def __init__(self, input: str, options: Mapping[str, Any], position: Mapping[str, Any] | None = None) -> None:
        super().__init__(input, options, position)
        self.max_bytes = _int_option(self.options, "max_bytes", 1 << 20, maximum=self.max_task_bytes)
        self.min_size = 1.0 / self.max_bytes
        self._open(position)

    def next(self, size: float) -> bytes | None:
        count = _task_count(size, self.max_bytes)
        if self._file is None:
            return None
        data = self._file.read(count)
        if not data:
            self.close()
            return None
        self._offset += len(data)
        return data

    def position(self) -> dict[str, Any]:
        return {"offset": self._offset, "size": self.size}

    can_split = True

    def origin(self) -> int | None:
        return self._offset

    def units(self, data: bytes) -> int:
        return len(data)

    def cut(self, data: bytes, low: int, high: int) -> bytes:
        return data[low:high]

    def locate(self, data: bytes, origin: int | None, low: int, high: int) -> dict[str, Any]:
        if origin is None:
            return {"unit": "bytes of the task", "first": low, "last": high - 1}
        return {"unit": "bytes", "first": origin + low, "last": origin + high - 1}
