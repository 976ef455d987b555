"""The frames between the node agent and a port (``worker_native/build/orch-port``).

Standard library only: this module ships to nodes with the agent. The byte layout is
specified in ``worker_native/PROTOCOL.md`` (and at the top of ``worker_native/port.c``):
little-endian, a fixed 28-byte header, then the data.

    task   (agent -> port): magic "OTSK", seq u64, attempt u32, size f64, data_len u32, data
    result (port -> agent): magic "ORES", seq u64, status u32, elapsed_ns u64, payload_len u32, payload

A port answers every task with one result, in task order, and has written the result
of every earlier task before it calls the function for the next one: when a port dies,
the task in flight is the first one sent that has no result.
"""

from __future__ import annotations

import math
import signal
import struct
from dataclasses import dataclass

TASK_MAGIC = b"OTSK"
RESULT_MAGIC = b"ORES"
TASK_HEADER = struct.Struct("<4sQIdI")
RESULT_HEADER = struct.Struct("<4sQIQI")
HEADER_LEN = 28
assert TASK_HEADER.size == RESULT_HEADER.size == HEADER_LEN

MAX_DATA = 64 << 20
"""The largest task data a port accepts (a larger data_len is a malformed frame)."""
MAX_OUTPUT = 64 << 20
"""The largest output a task may write; past it the task fails with OUTPUT_OVER_CAP."""
MAX_SEQ = (1 << 64) - 1
MAX_ATTEMPT = (1 << 32) - 1

STATUS_OK = 0
STATUS_FAILED = 1

OUTPUT_OVER_CAP = "output over 64 MiB"
NO_MESSAGE = "failed without a message"

# The port runner's exit codes; a negative return code is the signal that killed it.  A
# work function may exit() with any of them too, so the agent never reads them alone:
# the runner says what it refused or why it ended on its status pipe (ports.py).
EXIT_OK = 0
"""Clean end of input at a frame boundary."""
EXIT_USAGE = 1
"""Bad command line, or an I/O or memory error of the port itself."""
EXIT_MALFORMED = 2
"""A malformed task frame; the results of the frames before it were written."""
EXIT_ABI_MISMATCH = 3
"""The library's orch_work_abi_version differs from the runner's."""
EXIT_NO_FUNCTION = 4
"""The function is not in the library."""
EXIT_NO_LIBRARY = 5
"""The library could not be loaded."""


class FrameError(ValueError):
    """Bytes that are not a valid frame, or values that do not fit in one."""


@dataclass(slots=True)
class PortResult:
    """One task's result: its output when ``ok``, else the failure message as ``payload``.

    Not frozen: a frozen dataclass triples the cost of decoding a result (~1.1 us vs
    ~0.35 us), and the agent decodes one per task."""

    seq: int
    ok: bool
    elapsed_ns: int
    payload: bytes

    @property
    def message(self) -> str:
        """The failure message ("" for a successful result)."""
        return "" if self.ok else self.payload.decode("utf-8", "replace")


def encode_task(seq: int, attempt: int, size: float, data: bytes) -> bytes:
    """One task frame. ``attempt`` is 1 on the first try; ``size`` is in (0, 1]."""
    if not 0 <= seq <= MAX_SEQ:
        raise FrameError(f"seq {seq} does not fit in 64 bits")
    if not 1 <= attempt <= MAX_ATTEMPT:
        raise FrameError(f"attempt {attempt} is not in [1, 2**32)")
    if not (0.0 < size <= 1.0) or math.isnan(size):
        raise FrameError(f"size {size} is not in (0, 1]")
    if len(data) > MAX_DATA:
        raise FrameError(f"task data of {len(data)} bytes is over the limit of {MAX_DATA}")
    return TASK_HEADER.pack(TASK_MAGIC, seq, attempt, size, len(data)) + data


def encode_result(seq: int, ok: bool, elapsed_ns: int, payload: bytes) -> bytes:
    """One result frame, as a port writes it (the scheduler stores results this way)."""
    return RESULT_HEADER.pack(RESULT_MAGIC, seq, STATUS_OK if ok else STATUS_FAILED, elapsed_ns, len(payload)) + payload


def decode_tasks(buffer: bytes) -> list[tuple[int, int, float, bytes]]:
    """Every task frame in ``buffer`` as (seq, attempt, size, data); raises FrameError
    on anything else (the scheduler reads back the batches of tasks it stored)."""
    tasks = []
    pos, end = 0, len(buffer)
    unpack = TASK_HEADER.unpack_from
    while pos < end:
        if end - pos < HEADER_LEN:
            raise FrameError(f"a partial task header at offset {pos}")
        magic, seq, attempt, size, data_len = unpack(buffer, pos)
        if magic != TASK_MAGIC or pos + HEADER_LEN + data_len > end:
            raise FrameError(f"a bad task frame at offset {pos}")
        tasks.append((seq, attempt, size, buffer[pos + HEADER_LEN : pos + HEADER_LEN + data_len]))
        pos += HEADER_LEN + data_len
    return tasks


def decode_results(buffer: bytes | bytearray | memoryview) -> tuple[list[PortResult], bytes]:
    """The complete result frames at the start of ``buffer``, and the bytes after them
    (a partial frame, to be completed by the next read). Raises FrameError on bytes
    that cannot start a result frame."""
    results: list[PortResult] = []
    append, unpack, make = results.append, RESULT_HEADER.unpack_from, PortResult
    pos, end_of_buffer = 0, len(buffer)
    if not isinstance(buffer, bytes):
        buffer = bytes(buffer)
    while end_of_buffer - pos >= HEADER_LEN:
        magic, seq, status, elapsed_ns, payload_len = unpack(buffer, pos)
        if magic != RESULT_MAGIC:
            raise FrameError(f"bad result magic {bytes(magic)!r} at offset {pos} (want {RESULT_MAGIC!r})")
        if status > STATUS_FAILED:
            raise FrameError(f"bad result status {status} for seq {seq}")
        if payload_len > MAX_OUTPUT:
            raise FrameError(f"result payload of {payload_len} bytes for seq {seq} is over the limit")
        end = pos + HEADER_LEN + payload_len
        if end > end_of_buffer:
            break
        append(make(seq, status == STATUS_OK, elapsed_ns, buffer[pos + HEADER_LEN : end]))
        pos = end
    return results, buffer[pos:]


def decode_result_tuples(buffer: bytes | bytearray | memoryview) -> list[tuple[int, bool, int, bytes]]:
    """Every result frame in ``buffer`` as (seq, ok, elapsed_ns, payload): the scheduler's
    hot path (no object per result).  Raises FrameError on a bad or partial frame."""
    results: list[tuple[int, bool, int, bytes]] = []
    append, unpack = results.append, RESULT_HEADER.unpack_from
    if not isinstance(buffer, bytes):
        buffer = bytes(buffer)
    pos, end_of_buffer = 0, len(buffer)
    while pos < end_of_buffer:
        if end_of_buffer - pos < HEADER_LEN:
            raise FrameError(f"a partial result header at offset {pos}")
        magic, seq, status, elapsed_ns, payload_len = unpack(buffer, pos)
        if magic != RESULT_MAGIC:
            raise FrameError(f"bad result magic {bytes(magic)!r} at offset {pos} (want {RESULT_MAGIC!r})")
        if status > STATUS_FAILED:
            raise FrameError(f"bad result status {status} for seq {seq}")
        end = pos + HEADER_LEN + payload_len
        if payload_len > MAX_OUTPUT or end > end_of_buffer:
            raise FrameError(f"a partial or oversized result payload for seq {seq} ({payload_len} bytes)")
        append((seq, status == STATUS_OK, elapsed_ns, buffer[pos + HEADER_LEN : end]))
        pos = end
    return results


def describe_exit(returncode: int) -> str:
    """How a process ended, from its return code (negative: the signal that killed it),
    and no more: an exit status does not say who chose it (the runner or the work)."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exit status {returncode}"
