"""The orch_work.h ABI through ctypes: a work function called directly from Python.

The benchmarks' baseline: the same C function orch runs in its ports, called in-process
(one call per task), in worker processes of multiprocessing, dask or Ray.  Importable by
those workers (bench/ is put on their PYTHONPATH), so pickling refers to it by name.
"""

from __future__ import annotations

import ctypes
from typing import Any


class OrchTask(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.POINTER(ctypes.c_ubyte)),
        ("data_len", ctypes.c_size_t),
        ("size", ctypes.c_double),
        ("seq", ctypes.c_uint64),
        ("attempt", ctypes.c_uint32),
        ("node_name", ctypes.c_char_p),
    ]


class OrchOutput(ctypes.Structure):
    pass


WRITE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(OrchOutput), ctypes.c_void_p, ctypes.c_size_t)
FAIL = ctypes.CFUNCTYPE(None, ctypes.POINTER(OrchOutput), ctypes.c_char_p)
OrchOutput._fields_ = [("ctx", ctypes.c_void_p), ("write", WRITE), ("fail", FAIL)]

_loaded: dict[str, Any] = {}
_output = bytearray()


def _write(_out: Any, data: int, length: int) -> int:
    _output.extend(ctypes.string_at(data, length))
    return 0


def load(library: str, function: str) -> None:
    """Load ``function`` of ``library`` in this process (once)."""
    fn = getattr(ctypes.CDLL(library), function)
    fn.argtypes = [ctypes.POINTER(OrchTask), ctypes.POINTER(OrchOutput)]
    fn.restype = ctypes.c_int
    write, fail = WRITE(_write), FAIL(lambda _o, _m: None)
    _loaded.update(fn=fn, out=OrchOutput(None, write, fail), keep=(write, fail))


def call(data: bytes) -> bytes:
    """Run one task through the loaded function; its output."""
    buffer = (ctypes.c_ubyte * max(1, len(data))).from_buffer_copy(data.ljust(1, b"\0"))
    task = OrchTask(buffer, len(data), 1.0, 0, 1, b"direct")
    _output.clear()
    if _loaded["fn"](ctypes.byref(task), ctypes.byref(_loaded["out"])) != 0:
        raise RuntimeError(f"the work function failed on {data!r}")
    return bytes(_output)


def call_batch(library: str, function: str, batch: list[bytes]) -> list[bytes]:
    """For workers that cannot run an initializer: load on first use, then call."""
    if not _loaded:
        load(library, function)
    return [call(data) for data in batch]
