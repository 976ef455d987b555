"""Side by side: what one task costs through the port runner, and through ctypes in Python.

    .venv/bin/python bench/port.py [--tasks 200000] [--repeat 3] [--quick]

Builds worker_native (``make -s -C worker_native``) and runs the ``noop`` and ``echo``
functions of the test library ``build/libfaults.so``:

- ``orch-port``: all tasks encoded up front and piped into one port in one go; the
  time runs from the spawn to the exit, with Python reading the results from the pipe
  (decoding is timed on its own row). The port's CPU time (user + sys) per task is the
  runner's overhead: its own reads, writes and bookkeeping, one writev() per result.
- ``ctypes``: the same C function called in a Python loop through the orch_work.h ABI,
  with the task and output structures built once, and with a task built per call.
- the frame codec (orchestrator.agent.frames): encode one task, decode one result.

Best of ``--repeat`` runs; µs/task = wall seconds / tasks x 1e6.  ``--quick`` (what CI
runs, tests/integration/test_benches.py): every row on a few thousand tasks, once.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ctypes_work import FAIL, WRITE, OrchOutput, OrchTask  # bench/ is on sys.path when run as a script
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.helpers: the tests' build of worker_native, shared

from orchestrator.agent.frames import RESULT_HEADER, RESULT_MAGIC, decode_results, encode_task  # noqa: E402
from tests.helpers.native import FAULTS, PORT, build_native  # noqa: E402

QUICK = {"tasks": 20_000, "repeat": 1}
"""``--quick``: every row, as small as it goes."""

console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)  # whole rows in a log


@dataclass
class Row:
    path: str
    seconds: float
    tasks: int
    note: str

    @property
    def us_per_task(self) -> float:
        return self.seconds / self.tasks * 1e6


def best_of(repeat: int, run: Callable[[], float]) -> float:
    return min(run() for _ in range(repeat))


def through_port(function: str, frames: bytes, n: int, repeat: int) -> tuple[float, float]:
    """(best wall seconds, best port CPU seconds) for one port running every frame."""
    walls, cpus = [], []
    for _ in range(repeat):
        before = os.times()
        start = time.perf_counter()
        done = subprocess.run([str(PORT), str(FAULTS), function, "bench"], input=frames, capture_output=True)
        walls.append(time.perf_counter() - start)
        after = os.times()
        cpus.append((after.children_user - before.children_user) + (after.children_system - before.children_system))
        if done.returncode != 0:
            raise SystemExit(f"orch-port failed ({done.returncode}): {done.stderr.decode()}")
        if len(done.stdout) < n * RESULT_HEADER.size:
            raise SystemExit("orch-port returned fewer results than tasks")
    return min(walls), min(cpus)


def through_ctypes(n: int, repeat: int, *, per_call: bool) -> float:
    lib = ctypes.CDLL(str(FAULTS))
    fn = lib.noop
    fn.argtypes = [ctypes.POINTER(OrchTask), ctypes.POINTER(OrchOutput)]
    fn.restype = ctypes.c_int
    write_cb = WRITE(lambda _o, _b, _n: 0)
    fail_cb = FAIL(lambda _o, _m: None)
    out = OrchOutput(None, write_cb, fail_cb)
    buffer = (ctypes.c_ubyte * 1)()
    task = OrchTask(buffer, 0, 1.0, 0, 1, b"bench")
    task_ref, out_ref = ctypes.byref(task), ctypes.byref(out)

    def reused() -> float:
        start = time.perf_counter()
        for _ in range(n):
            fn(task_ref, out_ref)
        return time.perf_counter() - start

    def built() -> float:
        start = time.perf_counter()
        for seq in range(n):
            fn(ctypes.byref(OrchTask(buffer, 0, 1.0, seq, 1, b"bench")), out_ref)
        return time.perf_counter() - start

    return best_of(repeat, built if per_call else reused)


def codec(n: int, repeat: int) -> tuple[float, float]:
    def encode() -> float:
        start = time.perf_counter()
        for seq in range(n):
            encode_task(seq, 1, 1.0, b"")
        return time.perf_counter() - start

    results = b"".join(RESULT_HEADER.pack(RESULT_MAGIC, seq, 0, 40, 0) for seq in range(n))

    def decode() -> float:
        start = time.perf_counter()
        decode_results(results)
        return time.perf_counter() - start

    return best_of(repeat, encode), best_of(repeat, decode)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="every row, as small as it goes (CI): "
                        + ", ".join(f"{k} {v}" for k, v in QUICK.items()))
    if "--quick" in (sys.argv[1:] if argv is None else argv):
        parser.set_defaults(**QUICK)  # flags given explicitly still win
    args = parser.parse_args(argv)
    n, repeat = args.tasks, args.repeat

    build_native()
    noop_frames = b"".join(encode_task(seq, 1, 1.0, b"") for seq in range(n))
    echo_frames = b"".join(encode_task(seq, 1, 1.0, bytes(64)) for seq in range(n))

    rows: list[Row] = []
    wall, cpu = through_port("noop", noop_frames, n, repeat)
    rows.append(Row("orch-port, noop, piped in one go", wall, n, "spawn to exit, Python reading the pipe"))
    rows.append(Row("  of which the port's own CPU", cpu, n, "user + sys of the port process"))
    wall, cpu = through_port("echo", echo_frames, n, repeat)
    rows.append(Row("orch-port, echo 64 B, piped in one go", wall, n, "spawn to exit, Python reading the pipe"))
    rows.append(Row("  of which the port's own CPU", cpu, n, "user + sys of the port process"))
    rows.append(Row("ctypes loop, noop, structures reused", through_ctypes(n, repeat, per_call=False), n,
                    "fn(byref(task), byref(out)) in Python"))
    rows.append(Row("ctypes loop, noop, a task built per call", through_ctypes(n, repeat, per_call=True), n,
                    "OrchTask(...) + byref + call"))
    encode, decode = codec(n, repeat)
    rows.append(Row("frames.encode_task (Python)", encode, n, "one task frame"))
    rows.append(Row("frames.decode_results (Python)", decode, n, "one result frame, in bulk"))

    table = Table(title=f"one task: orch-port vs ctypes ({n:,} tasks, best of {repeat})")
    table.add_column("path")
    table.add_column("µs/task", justify="right")
    table.add_column("tasks/s", justify="right")
    table.add_column("what is timed")
    for row in rows:
        rate = f"{row.tasks / row.seconds:,.0f}" if row.seconds else "-"  # CPU times tick at 10 ms
        table.add_row(row.path, f"{row.us_per_task:.3f}", rate, row.note)
    console.print(table)


if __name__ == "__main__":
    main()
