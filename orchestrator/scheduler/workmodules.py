"""Work modules: cut a job's input into tasks (CloudI's *work module*).

The scheduler asks a module for the next task's data, giving the task's *size* in
(0, 1]: the share of the module's largest task (``max_span`` numbers, ``max_lines``
lines, ``max_bytes`` bytes) that the node's adaptive sizing chose.  A module only moves
forward; ``position()`` is a small JSON-able mapping from which a module built again
continues exactly where this one stopped, so a resumed job never cuts its input twice.

Built-in modules (``--module NAME``, options as ``--option KEY=VALUE``):

    range    input "START:END" (or "START END"): the half-open range [START, END) of
             unsigned 64-bit integers.  A task of size s covers max(1, round(s * max_span))
             numbers (never past END) and its data is ASCII "A B", the range [A, B),
             which is what ``releases/primes/primes.c`` parses.  max_span: 1_000_000.
    lines    input a file: a task of size s carries max(1, round(s * max_lines)) lines,
             each with its "\\n" as in the file (a last line without one stays without),
             and never more than the task frame's limit of bytes.  max_lines: 1000.
    chunks   input a file: a task carries max(1, round(s * max_bytes)) bytes.
             max_bytes: 1 MiB (at most the task frame's limit, 64 MiB).

A release may ship its own module: ``release:PATH:CLASS`` names the class CLASS defined
in the Python file PATH of the release (``release:modules/split.py:SplitModule``).  The
file is read through ``release_source`` (the release archive), executed as a module of
its own, and CLASS must subclass :class:`WorkModule`.  It may import the standard
library and ``orchestrator``; it is the user's own code, run with the orchestrator's
rights, so it is loaded only from a release, never from a path on the command line.

File modules hold their file open: call ``close()`` (or use the module as a context
manager) when a job stops early; a module closes its file itself once exhausted.

The built-in modules can also cut a task in pieces, for the engine's *isolation* of a
task that fails every attempt (``scheduler/isolation.py``): ``units(data)`` is how many
items (numbers, lines, bytes) a task holds, ``cut(data, low, high)`` the data of its
items [low, high) as a task of their own, and ``locate`` where those items are in the
job's input (numbers; lines counted from 1; byte offsets from 0), for which a file
module tells the item index its next task starts at (``origin()``).  A release's own
module does not split (``can_split`` False) unless it implements these too.
"""

from __future__ import annotations

import abc
import hashlib
import inspect
import io
import os
import re
import stat
import sys
import types
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, ClassVar

from orchestrator.agent.frames import MAX_DATA
from orchestrator.errors import InputError, StateError

UINT64_MAX = (1 << 64) - 1
RELEASE_PREFIX = "release:"


class WorkModuleError(InputError):
    """(scheduler) A work module, its input or its options cannot be used.

    >>> str(WorkModuleError("--input", 'range "5:2": START is after END'))
    '--input: range "5:2": START is after END'
    """

    def __init__(self, field: str, message: str, *, hint: str | None = None) -> None:
        self.field = field
        super().__init__(f"{field}: {_one_line(message)}", hint=hint)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _task_count(size: float, maximum: int) -> int:
    """How many units a task of ``size`` carries: max(1, round(size * maximum))."""
    if not 0.0 < size <= 1.0:  # also refuses NaN
        raise ValueError(f"task size must be in (0, 1], got {size!r}")
    count = round(size * maximum)
    return count if count >= 1 else 1


def _int_option(options: Mapping[str, Any], key: str, default: int, *, maximum: int) -> int:
    """A whole-number option in [1, maximum]; YAML-typed values (1000, 1000.0) are accepted."""
    value = options.get(key, default)
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    if number is None or not 1 <= number <= maximum:
        raise WorkModuleError(
            f"--option {key}", f"must be a whole number from 1 to {maximum}, got {value!r}; "
            f"write for example --option {key}={default}")
    return number


def _position_int(position: Mapping[str, Any], key: str, module: str, low: int, high: int) -> int:
    value = position.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise StateError(f"work module {module}: the stored position {dict(position)!r} does not fit its input "
                         f"({key} must be a whole number from {low} to {high}); the job cannot resume")
    return value


class WorkModule(abc.ABC):
    """Cuts one job's input into tasks, forward only.

    Subclasses set ``name`` (and ``unit``, what ``progress()`` counts), call
    ``super().__init__`` and set ``min_size``, the smallest size that still makes a
    different task (``1 / max_span`` for ``range``): the sizing never goes below it.
    ``option_names`` lists the options a module takes; others are refused by name
    (``None``: the module checks its options itself).
    """

    name: ClassVar[str]
    unit: ClassVar[str] = "units"
    option_names: ClassVar[frozenset[str] | None] = None
    min_size: float = 1.0
    can_split: ClassVar[bool] = False
    """Whether ``units``, ``cut`` and ``locate`` work: a failing task can be isolated."""

    def __init__(self, input: str, options: Mapping[str, Any], position: Mapping[str, Any] | None = None) -> None:
        self.input = input
        self.options = dict(options)
        if self.option_names is not None:
            unknown = sorted(set(self.options) - self.option_names)
            if unknown:
                known = ", ".join(sorted(self.option_names)) or "none"
                raise WorkModuleError(f"--option {unknown[0]}",
                                      f"the {self.name} work module has no such option; its options: {known}")

    @abc.abstractmethod
    def next(self, size: float) -> bytes | None:
        """The next task's data for a task of ``size`` in (0, 1]; None once the input is exhausted."""

    def next_many(self, size: float, count: int) -> list[bytes]:
        """Up to ``count`` tasks of ``size``, as ``next`` would give them one by one;
        fewer only once the input is exhausted."""
        out: list[bytes] = []
        for _ in range(count):
            data = self.next(size)
            if data is None:
                break
            out.append(data)
        return out

    @abc.abstractmethod
    def position(self) -> dict[str, Any]:
        """JSON-able; a module of the same input and options built with it continues exactly here."""

    @abc.abstractmethod
    def progress(self) -> tuple[float, float | None]:
        """(units done, total units or None when unknown), in ``unit``s."""

    def close(self) -> None:  # noqa: B027 - most modules hold nothing
        """Release what the module holds (an open file); ``next`` returns None afterwards."""

    # -- pieces of a task (for isolating failures; see can_split) ------------------------------

    def origin(self) -> int | None:
        """The index of the item the next task starts at, when a task's data does not say
        where it is in the input (the file modules); None otherwise."""
        return None

    def units(self, data: bytes) -> int:
        """How many items a task of this module holds."""
        raise NotImplementedError(f"the {self.name} work module does not cut tasks in pieces")

    def cut(self, data: bytes, low: int, high: int) -> bytes:
        """The data of items [low, high) of a task's ``data``: a task of their own."""
        raise NotImplementedError(f"the {self.name} work module does not cut tasks in pieces")

    def locate(self, data: bytes, origin: int | None, low: int, high: int) -> dict[str, Any]:
        """Where items [low, high) of a task (that starts at item ``origin``) are in the
        job's input: ``{"unit": "numbers" | "lines" | "bytes", "first": F, "last": L}``,
        both ends included (lines count from 1, byte offsets from 0)."""
        raise NotImplementedError(f"the {self.name} work module does not cut tasks in pieces")

    def __enter__(self) -> WorkModule:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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


BUILTIN_MODULES: dict[str, type[WorkModule]] = {m.name: m for m in (RangeModule, LinesModule, ChunksModule)}


# -- a release's own modules ------------------------------------------------------------

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)
_loaded: dict[str, types.ModuleType] = {}


def _usage() -> str:
    builtins = ", ".join(BUILTIN_MODULES)
    return f"use {builtins} or {RELEASE_PREFIX}PATH.py:CLASS (a class in a Python file of the release)"


def release_module_class(name: str, release_source: Callable[[str], bytes] | None) -> type[WorkModule]:
    """The class ``release:PATH:CLASS`` names, loaded from the release through ``release_source``."""
    path, _, class_name = name[len(RELEASE_PREFIX):].rpartition(":")
    pure = PurePosixPath(path)
    if not path or pure.is_absolute() or ".." in pure.parts or pure.suffix != ".py" or \
            not _IDENTIFIER.fullmatch(class_name):
        raise WorkModuleError("--module", f'"{name}" is not {RELEASE_PREFIX}PATH.py:CLASS; '
                              "PATH is a relative path inside the release, CLASS a Python class name")
    if release_source is None:
        raise WorkModuleError("--module", f'"{name}" is a release\'s work module, but no release is at hand to '
                              "load it from; run it as part of a job of that release")
    try:
        source = release_source(path)
    except InputError:
        raise
    except (KeyError, FileNotFoundError, LookupError):
        raise WorkModuleError("--module", f'the release has no file "{path}"; '
                              "add it to the release or fix the path") from None
    except OSError as exc:
        raise WorkModuleError("--module", f'cannot read "{path}" from the release: {exc}') from None
    key = hashlib.sha256(path.encode() + b"\0" + source).hexdigest()[:24]
    module = _loaded.get(key)
    if module is None:
        module = _exec_release_file(path, source, f"_orch_release_module_{key}")
        _loaded[key] = module
    cls = getattr(module, class_name, None)
    if cls is None:
        raise WorkModuleError("--module", f'"{path}" of the release defines no "{class_name}"; '
                              "fix the class name after the last ':'")
    if not (inspect.isclass(cls) and issubclass(cls, WorkModule)):
        raise WorkModuleError("--module", f'"{class_name}" in "{path}" is not a subclass of '
                              "orchestrator.scheduler.workmodules.WorkModule; derive it from WorkModule")
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(getattr(cls, "__abstractmethods__", ())))
        raise WorkModuleError("--module", f'"{class_name}" in "{path}" does not implement {missing}; '
                              "a work module needs next, position and progress")
    return cls


def _exec_release_file(path: str, source: bytes, module_name: str) -> types.ModuleType:
    if b"\0" in source:
        raise WorkModuleError("--module", f'"{path}" of the release is not Python source: it holds NUL bytes')
    try:
        code = compile(source, f"release:{path}", "exec", dont_inherit=True)
    except SyntaxError as exc:
        raise WorkModuleError("--module", f'"{path}" of the release, line {exc.lineno}: {exc.msg}; '
                              "fix the syntax error") from None
    module = types.ModuleType(module_name)
    module.__file__ = f"release:{path}"
    sys.modules[module_name] = module  # dataclasses and typing look classes' modules up there
    try:
        exec(code, module.__dict__)
    except Exception as exc:
        del sys.modules[module_name]
        raise WorkModuleError("--module", f'importing "{path}" of the release failed: '
                              f"{type(exc).__name__}: {exc}") from exc
    return module


# -- entry points -------------------------------------------------------------------------


def module_class(name: str, *, release_source: Callable[[str], bytes] | None = None) -> type[WorkModule]:
    """The class a ``--module`` name stands for."""
    if name.startswith(RELEASE_PREFIX):
        return release_module_class(name, release_source)
    cls = BUILTIN_MODULES.get(name)
    if cls is None:
        raise WorkModuleError("--module", f'unknown work module "{name}"; {_usage()}')
    return cls


def load_work_module(name: str, input: str, options: Mapping[str, Any], position: Mapping[str, Any] | None = None,
                     *, release_source: Callable[[str], bytes] | None = None) -> WorkModule:
    """A ready work module: at the start of ``input``, or at ``position`` (a stored ``position()``)."""
    cls = module_class(name, release_source=release_source)
    if cls in BUILTIN_MODULES.values():
        return cls(input, options, position)
    try:  # the release's own code: its errors become one line naming --module
        module = cls(input, options, position)
    except (InputError, StateError):
        raise
    except Exception as exc:
        raise WorkModuleError("--module", f"{cls.__name__}({input!r}) failed: {type(exc).__name__}: {exc}") from exc
    size = getattr(module, "min_size", None)
    if not isinstance(size, float | int) or isinstance(size, bool) or not 0 < size <= 1:
        module.close()
        raise WorkModuleError("--module", f"{cls.__name__}.min_size is {size!r}; it must be in (0, 1]")
    return module


def check_work_module(name: str, input: str, options: Mapping[str, Any],
                      *, release_source: Callable[[str], bytes] | None = None) -> None:
    """Check a module, its input and options up front; WorkModuleError names the bad field."""
    load_work_module(name, input, options, release_source=release_source).close()
