"""releases/primes: build the sample C release with make, call its work functions
through the orch_work.h ABI with ctypes, and compare with Python references."""

from __future__ import annotations

import ctypes
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from bench.ctypes_work import FAIL, WRITE, OrchOutput, OrchTask
from tests.helpers.native import build_primes
from tests.helpers.primes import MASK64, count_primes_reference, iterated_hash_reference

ORCH_WORK_OK, ORCH_WORK_FAILED = 0, 1
UINT64_MAX = MASK64


# -- a ctypes harness for orch_work.h (its structs: bench/ctypes_work.py) -------------


@dataclass
class Outcome:
    status: int
    output: bytes
    failure: str | None


def run_task(fn: Callable[..., int], data: bytes, *, refuse_writes: bool = False) -> Outcome:
    written: list[bytes] = []
    failures: list[str] = []

    def write(_out: object, buf: int, length: int) -> int:
        if refuse_writes:
            return -1
        written.append(ctypes.string_at(buf, length))
        return 0

    def fail(_out: object, message: bytes) -> None:
        failures.append(message.decode())

    # The CFUNCTYPE objects must outlive the call: keep them in locals.
    write_cb, fail_cb = WRITE(write), FAIL(fail)
    out = OrchOutput(None, write_cb, fail_cb)
    buffer = (ctypes.c_ubyte * max(len(data), 1)).from_buffer_copy(data or b"\0")
    task = OrchTask(buffer, len(data), 1.0, 7, 1, b"test-node")
    status = fn(ctypes.byref(task), ctypes.byref(out))
    return Outcome(status, b"".join(written), failures[-1] if failures else None)


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ctypes.CDLL]:
    work = tmp_path_factory.mktemp("build") / "primes"
    lib = ctypes.CDLL(str(build_primes(work, quiet=False)))
    for name in ("count_primes", "iterated_hash"):
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.POINTER(OrchTask), ctypes.POINTER(OrchOutput)]
        fn.restype = ctypes.c_int
    yield lib
    subprocess.run(["make", "clean"], cwd=work, check=True, capture_output=True)


# -- tests ---------------------------------------------------------------------------


def test_library_exports_the_abi_version(library: ctypes.CDLL) -> None:
    assert ctypes.c_int.in_dll(library, "orch_work_abi_version").value == 1


@pytest.mark.parametrize(
    ("start", "end", "expected"),
    [(0, 100, 25), (0, 100_000, 9592), (0, 0, 0), (0, 2, 0), (2, 3, 1), (97, 98, 1), (90, 97, 0)],
)
def test_count_primes_known_counts(library: ctypes.CDLL, start: int, end: int, expected: int) -> None:
    outcome = run_task(library.count_primes, f"{start} {end}".encode())
    assert outcome == Outcome(ORCH_WORK_OK, f"{expected}\n".encode(), None)
    assert outcome.output == count_primes_reference(start, end)


@pytest.mark.parametrize(
    ("start", "end"), [(0, 1000), (10**12, 10**12 + 2000), (2**40 - 500, 2**40 + 500), (UINT64_MAX, UINT64_MAX)]
)
def test_count_primes_matches_reference(library: ctypes.CDLL, start: int, end: int) -> None:
    assert run_task(library.count_primes, f"{start} {end}".encode()).output == count_primes_reference(start, end)


@pytest.mark.parametrize(
    ("start", "end"), [(0, 0), (0, 1), (0, 1000), (255, 257), (10**12, 10**12 + 500), (UINT64_MAX - 3, UINT64_MAX)]
)
def test_iterated_hash_matches_reference(library: ctypes.CDLL, start: int, end: int) -> None:
    outcome = run_task(library.iterated_hash, f"{start} {end}".encode())
    assert outcome == Outcome(ORCH_WORK_OK, iterated_hash_reference(start, end), None)
    assert len(outcome.output) == 17


def test_empty_range_hash_is_the_offset_basis(library: ctypes.CDLL) -> None:
    assert run_task(library.iterated_hash, b"5 5").output == b"cbf29ce484222325\n"


def test_surrounding_whitespace_is_accepted(library: ctypes.CDLL) -> None:
    assert run_task(library.count_primes, b"  0   100\n").output == b"25\n"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "must be \"START END\""),
        (b"abc", "must be \"START END\""),
        (b"5", "must be \"START END\""),
        (b"-1 5", "must be \"START END\""),
        (b"1 2 3", "unexpected text after END"),
        (b"1\x002", "must be \"START END\""),
        (b"9 3", "range start 9 is after its end 3"),
        (b"0 18446744073709551616", "does not fit in 64 bits"),
    ],
)
@pytest.mark.parametrize("function", ["count_primes", "iterated_hash"])
def test_invalid_data_fails_with_a_message(library: ctypes.CDLL, function: str, data: bytes, reason: str) -> None:
    outcome = run_task(getattr(library, function), data)
    assert outcome.status == ORCH_WORK_FAILED
    assert outcome.failure is not None and reason in outcome.failure
    assert outcome.output == b""


def test_refused_output_fails_the_task(library: ctypes.CDLL) -> None:
    outcome = run_task(library.count_primes, b"0 100", refuse_writes=True)
    assert outcome.status == ORCH_WORK_FAILED
    assert outcome.failure == "the runtime refused the output"


def test_functions_are_reentrant_across_calls(library: ctypes.CDLL) -> None:
    first = [run_task(library.iterated_hash, f"{i} {i + 50}".encode()).output for i in range(20)]
    again = [run_task(library.iterated_hash, f"{i} {i + 50}".encode()).output for i in range(20)]
    assert first == again == [iterated_hash_reference(i, i + 50) for i in range(20)]
