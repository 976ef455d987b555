"""Work modules' contract: cut a job's input into tasks (CloudI's *work module*).

This module owns the abstract base :class:`WorkModule`, :class:`WorkModuleError` and the
small option and position helpers the modules share; the built-in modules are in
``builtin_modules``, the loading of a module by name (built-in or a release's own) in
``module_loader``.

The scheduler asks a module for the next task's data, giving the task's *size* in
(0, 1]: the share of the module's largest task (``max_span`` numbers, ``max_lines``
lines, ``max_bytes`` bytes) that the node's adaptive sizing chose.  A module only moves
forward; ``position()`` is a small JSON-able mapping from which a module built again
continues exactly where this one stopped, so a resumed job never cuts its input twice.

A module that holds a file open is closed with ``close()`` (or used as a context
manager) when a job stops early; a module closes its file itself once exhausted.

A module can also cut a task in pieces, for the engine's *isolation* of a task that
fails every attempt (``scheduler/isolation.py``): ``units(data)`` is how many items
(numbers, lines, bytes) a task holds, ``cut(data, low, high)`` the data of its items
[low, high) as a task of their own, and ``locate`` where those items are in the job's
input (numbers; lines counted from 1; byte offsets from 0), for which a file module
tells the item index its next task starts at (``origin()``).  A release's own module
does not split (``can_split`` False) unless it implements these too.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any, ClassVar

from orchestrator.errors import InputError, StateError


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
