"""Loading a work module by its ``--module`` name: the registry of names.

This module owns the built-in names (``BUILTIN_MODULES``: range, lines, chunks, from
``builtin_modules``), a release's own modules and the entry points
:func:`module_class`, :func:`load_work_module` and :func:`check_work_module`.

A release may ship its own module: ``release:PATH:CLASS`` names the class CLASS defined
in the Python file PATH of the release (``release:modules/split.py:SplitModule``).  The
file is read through ``release_source`` (the release archive), executed as a module of
its own, and CLASS must subclass :class:`~orchestrator.scheduler.workmodules.WorkModule`.
It may import the standard library and ``orchestrator``; it is the user's own code, run
with the orchestrator's rights, so it is loaded only from a release, never from a path
on the command line.
"""

from __future__ import annotations

import hashlib
import inspect
import re
import sys
import types
from collections.abc import Callable, Mapping
from pathlib import PurePosixPath
from typing import Any

from orchestrator.errors import InputError, StateError
from orchestrator.scheduler.builtin_modules import ChunksModule, LinesModule, RangeModule
from orchestrator.scheduler.workmodules import WorkModule, WorkModuleError

RELEASE_PREFIX = "release:"

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
