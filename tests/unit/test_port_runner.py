"""worker_native/build/orch-port: the port runner, driven as the agent drives it: a real
process, real frames on its stdin and stdout (orchestrator.agent.frames), the real
test work library (worker_native/testlib/faults.c) and the sample primes release."""

from __future__ import annotations

import math
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestrator.agent.frames import (
    EXIT_ABI_MISMATCH,
    EXIT_MALFORMED,
    EXIT_NO_FUNCTION,
    EXIT_NO_LIBRARY,
    EXIT_OK,
    EXIT_USAGE,
    HEADER_LEN,
    MAX_DATA,
    MAX_OUTPUT,
    NO_MESSAGE,
    OUTPUT_OVER_CAP,
    RESULT_HEADER,
    RESULT_MAGIC,
    TASK_HEADER,
    TASK_MAGIC,
    FrameError,
    PortResult,
    decode_result_tuples,
    decode_results,
    describe_exit,
    encode_task,
)
from tests.helpers.native import FAULTS, INCLUDE, PORT, build_native, build_primes
from tests.helpers.primes import count_primes_reference, iterated_hash_reference

# -- fixtures and helpers ------------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def built() -> None:
    """Build the runner and the test library in place (worker_native/build is ignored by git)."""
    build_native()


@pytest.fixture(scope="session")
def primes_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_primes(tmp_path_factory.mktemp("primes") / "primes")


def build_lib(directory: Path, name: str, source: str) -> Path:
    """Compile a one-file work library with the real header."""
    (directory / f"{name}.c").write_text(source)
    lib = directory / f"lib{name}.so"
    subprocess.run(
        ["cc", "-O2", "-std=c11", "-Wall", "-Werror", "-fPIC", "-shared", f"-I{INCLUDE}", "-o", str(lib),
         str(directory / f"{name}.c")],
        check=True, capture_output=True,
    )
    return lib


@dataclass
class PortRun:
    returncode: int
    results: list[PortResult]
    rest: bytes
    stderr: str

    @property
    def seqs(self) -> list[int]:
        return [r.seq for r in self.results]


def run_port(
    library: Path, function: str, frames: bytes, *extra: str, wrapper: Sequence[str] = (), timeout: float = 120
) -> PortRun:
    done = subprocess.run(
        [*wrapper, str(PORT), str(library), function, *extra], input=frames, capture_output=True, timeout=timeout
    )
    results, rest = decode_results(done.stdout)
    return PortRun(done.returncode, results, rest, done.stderr.decode())


def run_port_with_status(library: Path, function: str, frames: bytes) -> tuple[PortRun, list[str]]:
    """``run_port`` as the agent runs it, with a status pipe (``--status-fd``): the run
    and the runner's status lines."""
    status_r, status_w = os.pipe()
    try:
        done = subprocess.run([str(PORT), f"--status-fd={status_w}", str(library), function], input=frames,
                              capture_output=True, timeout=120, pass_fds=(status_w,))
        os.close(status_w)
        status_w = -1
        said = b""
        while chunk := os.read(status_r, 4096):
            said += chunk
    finally:
        os.close(status_r)
        if status_w >= 0:
            os.close(status_w)
    results, rest = decode_results(done.stdout)
    return PortRun(done.returncode, results, rest, done.stderr.decode()), said.decode().splitlines()


def tasks(datas: Iterable[bytes], *, first_seq: int = 0, attempt: int = 1, size: float = 1.0) -> bytes:
    return b"".join(encode_task(first_seq + i, attempt, size, data) for i, data in enumerate(datas))


def first_seq_without_result(sent: Sequence[int], results: Sequence[PortResult]) -> int | None:
    answered = {r.seq for r in results}
    return next((seq for seq in sent if seq not in answered), None)


def raw_task(magic: bytes = TASK_MAGIC, seq: int = 0, attempt: int = 1, size: float = 1.0,
             data_len: int | None = None, data: bytes = b"x") -> bytes:
    """A task frame without encode_task's checks, to make malformed ones."""
    return TASK_HEADER.pack(magic, seq, attempt, size, len(data) if data_len is None else data_len) + data


# -- the codec -----------------------------------------------------------------------


def test_task_frame_layout() -> None:
    assert encode_task(7, 1, 0.5, b"hi") == bytes.fromhex(
        "4f54534b" "0700000000000000" "01000000" "000000000000e03f" "02000000" "6869"
    )
    assert TASK_HEADER.size == RESULT_HEADER.size == HEADER_LEN == 28


def test_decode_results_across_every_split() -> None:
    frames = (
        RESULT_HEADER.pack(RESULT_MAGIC, 1, 0, 123, 5) + b"hello"
        + RESULT_HEADER.pack(RESULT_MAGIC, 2, 1, 4, 8) + b"bad task"
        + RESULT_HEADER.pack(RESULT_MAGIC, 2**64 - 1, 0, 2**64 - 1, 0)
    )
    expected = [
        PortResult(1, True, 123, b"hello"),
        PortResult(2, False, 4, b"bad task"),
        PortResult(2**64 - 1, True, 2**64 - 1, b""),
    ]
    assert decode_results(frames) == (expected, b"")
    assert expected[1].message == "bad task" and expected[0].message == ""
    for cut in range(len(frames) + 1):
        got, rest = decode_results(frames[:cut])
        more, rest = decode_results(bytearray(rest + frames[cut:]))
        assert (got + more, rest) == (expected, b"")
    # The scheduler's decoder: the same results as tuples; a partial frame is an error.
    assert decode_result_tuples(memoryview(frames)) == [(r.seq, r.ok, r.elapsed_ns, r.payload) for r in expected]
    for cut in range(1, len(frames)):
        if cut not in (HEADER_LEN + 5, 2 * HEADER_LEN + 13):
            with pytest.raises(FrameError, match="partial"):
                decode_result_tuples(frames[:cut])


@pytest.mark.parametrize(
    ("frame", "complaint"),
    [
        (b"XRES" + b"\0" * 24, "bad result magic"),
        (RESULT_HEADER.pack(RESULT_MAGIC, 1, 2, 0, 0), "bad result status 2"),
        (RESULT_HEADER.pack(RESULT_MAGIC, 1, 0, 0, MAX_OUTPUT + 1), "over the limit"),
    ],
)
def test_decode_rejects_what_a_port_never_writes(frame: bytes, complaint: str) -> None:
    with pytest.raises(FrameError, match=complaint):
        decode_results(frame)
    with pytest.raises(FrameError, match=complaint if "limit" not in complaint else "oversized"):
        decode_result_tuples(frame)


@pytest.mark.parametrize(
    ("seq", "attempt", "size", "length", "complaint"),
    [
        (-1, 1, 1.0, 0, "seq"),
        (2**64, 1, 1.0, 0, "seq"),
        (0, 0, 1.0, 0, "attempt"),
        (0, 2**32, 1.0, 0, "attempt"),
        (0, 1, 0.0, 0, "size"),
        (0, 1, 1.0000001, 0, "size"),
        (0, 1, math.nan, 0, "size"),
        (0, 1, -0.5, 0, "size"),
        (0, 1, 1.0, MAX_DATA + 1, "over the limit"),
    ],
)
def test_encode_refuses_what_a_port_would_reject(seq: int, attempt: int, size: float, length: int,
                                                 complaint: str) -> None:
    with pytest.raises(FrameError, match=complaint):
        encode_task(seq, attempt, size, bytes(length))


def test_describe_exit() -> None:
    assert describe_exit(-signal.SIGSEGV) == "killed by SIGSEGV"
    # An exit status alone does not say who chose it: the runner, or the work's exit().
    assert describe_exit(EXIT_MALFORMED) == "exit status 2"
    assert describe_exit(EXIT_ABI_MISMATCH) == "exit status 3"
    assert describe_exit(99) == "exit status 99"


# -- running tasks ---------------------------------------------------------------------


def test_ten_thousand_echo_tasks_round_trip_in_order() -> None:
    rng = random.Random(5)
    datas = [rng.randbytes(rng.choice((0, 1, 7, 28, 300, 4000))) for _ in range(10_000)]
    run = run_port(FAULTS, "echo", tasks(datas, first_seq=1_000))
    assert (run.returncode, run.rest, run.stderr) == (EXIT_OK, b"", "")
    assert run.seqs == list(range(1_000, 11_000))
    assert all(r.ok for r in run.results)
    assert [r.payload for r in run.results] == datas


def test_large_tasks_grow_the_read_buffer() -> None:
    datas = [b"a" * 5, os.urandom((1 << 20) + 5), b"", os.urandom(3 << 20), b"z", os.urandom(700_000) * 2]
    run = run_port(FAULTS, "echo", tasks(datas))
    assert run.returncode == EXIT_OK
    assert [r.payload for r in run.results] == datas


def test_no_tasks_is_a_clean_exit() -> None:
    assert run_port(FAULTS, "echo", b"") == PortRun(EXIT_OK, [], b"", "")


def test_noop_writes_nothing() -> None:
    run = run_port(FAULTS, "noop", tasks([b"anything", b""]))
    assert run.returncode == EXIT_OK
    assert [(r.seq, r.ok, r.payload) for r in run.results] == [(0, True, b""), (1, True, b"")]


@pytest.mark.parametrize("function", ["count_primes", "iterated_hash"])
def test_primes_release_through_the_port_matches_the_reference(primes_lib: Path, function: str) -> None:
    ranges = [(0, 100), (0, 100_000), (0, 0), (97, 98), (10**12, 10**12 + 2000), (2**40 - 500, 2**40 + 500)]
    run = run_port(primes_lib, function, tasks(f"{a} {b}".encode() for a, b in ranges))
    reference = count_primes_reference if function == "count_primes" else iterated_hash_reference
    assert run.returncode == EXIT_OK
    assert [r.payload for r in run.results] == [reference(a, b) for a, b in ranges]
    assert run.results[1].elapsed_ns > run.results[2].elapsed_ns > 0


def test_a_function_failure_is_a_result_and_the_port_goes_on(primes_lib: Path) -> None:
    run = run_port(primes_lib, "count_primes", tasks([b"0 10", b"9 3", b"0 100"]))
    assert run.returncode == EXIT_OK
    assert [(r.ok, r.payload) for r in run.results] == [
        (True, b"4\n"), (False, b"range start 9 is after its end 3"), (True, b"25\n"),
    ]


def test_fail_on_gives_status_failed_with_the_message() -> None:
    run = run_port(FAULTS, "fail_on", tasks([b"one", b"fail", b"three", b"fail"]))
    assert run.returncode == EXIT_OK
    assert [(r.seq, r.ok, r.payload) for r in run.results] == [
        (0, True, b"one"), (1, False, b"bad task"), (2, True, b"three"), (3, False, b"bad task"),
    ]
    assert run.results[1].message == "bad task"


def test_failed_without_calling_fail_gets_a_message_and_drops_output() -> None:
    run = run_port(FAULTS, "fail_quiet", tasks([b"x"]))
    assert [(r.ok, r.message) for r in run.results] == [(False, NO_MESSAGE)]


def test_an_unknown_return_code_is_a_failure() -> None:
    run = run_port(FAULTS, "odd_status", tasks([b"x"]))
    assert [(r.ok, r.message) for r in run.results] == [(False, "returned 7 (not ORCH_WORK_OK or ORCH_WORK_FAILED)")]


def test_attempt_size_seq_and_node_name_reach_the_function() -> None:
    frames = encode_task(5, 2, 0.25, b"") + encode_task(2**64 - 1, 7, 1.0, b"")
    run = run_port(FAULTS, "attempt", frames, "node-a")
    assert [r.payload for r in run.results] == [
        b"seq=5 attempt=2 size=0.250 node=node-a",
        b"seq=18446744073709551615 attempt=7 size=1.000 node=node-a",
    ]
    default = run_port(FAULTS, "attempt", encode_task(1, 1, 0.5, b""))
    assert default.results[0].payload == f"seq=1 attempt=1 size=0.500 node={socket.gethostname()}".encode()


def test_output_grows_to_megabytes() -> None:
    data = os.urandom(5000)
    run = run_port(FAULTS, "big", tasks([b"ab", data, b""]))
    assert run.returncode == EXIT_OK
    assert [len(r.payload) for r in run.results] == [2000, 5_000_000, 0]
    assert run.results[1].payload == data * 1000


def test_output_over_the_cap_fails_the_task_and_the_port_goes_on() -> None:
    run = run_port(FAULTS, "big", tasks([bytes(70_000), b"ok"]))  # 70 MB > 64 MiB
    assert run.returncode == EXIT_OK
    assert [(r.ok, r.payload) for r in run.results] == [(False, OUTPUT_OVER_CAP.encode()), (True, b"ok" * 1000)]


def test_output_over_the_cap_fails_even_when_the_function_ignores_the_refusal() -> None:
    run = run_port(FAULTS, "overrun", tasks([bytes(65), bytes(2)]))  # 65 MiB, then 2 MiB
    assert [(r.ok, len(r.payload)) for r in run.results] == [(False, len(OUTPUT_OVER_CAP)), (True, 2 << 20)]
    assert run.results[0].message == OUTPUT_OVER_CAP


def test_stray_prints_of_the_function_go_to_stderr_not_into_the_frames() -> None:
    run = run_port(FAULTS, "chatty", tasks([b"one", b"two"]))
    assert run.returncode == EXIT_OK
    assert [r.payload for r in run.results] == [b"one", b"two"]
    assert "chatty on stdout: seq 1" in run.stderr and "chatty on stderr: seq 0" in run.stderr


# -- crashes: the port dies, the results before the crash are out ---------------------


@pytest.mark.parametrize(
    ("function", "poison", "signum"), [("segv_on", b"crash", signal.SIGSEGV), ("abort_on", b"abort", signal.SIGABRT)]
)
def test_a_crash_kills_the_port_after_every_earlier_result_was_written(
    function: str, poison: bytes, signum: int
) -> None:
    datas = [f"task {i}".encode() for i in range(200)]
    datas[137] = poison
    run = run_port(FAULTS, function, tasks(datas, first_seq=10))
    assert run.returncode == -signum
    assert run.rest == b""
    assert run.seqs == list(range(10, 147))
    assert [r.payload for r in run.results] == datas[:137]
    assert first_seq_without_result(range(10, 210), run.results) == 147


def test_a_crash_on_the_first_task_leaves_no_result() -> None:
    run = run_port(FAULTS, "segv_on", tasks([b"crash", b"after"]))
    assert (run.returncode, run.results) == (-signal.SIGSEGV, [])


def test_a_hanging_task_blocks_only_itself_and_earlier_results_are_out() -> None:
    port = subprocess.Popen(
        [str(PORT), str(FAULTS), "hang_on"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert port.stdin is not None and port.stdout is not None
    try:
        port.stdin.write(tasks([b"a", b"b", b"hang", b"c"]))
        port.stdin.flush()
        received = b""
        deadline = time.monotonic() + 10
        while len(decode_results(received)[0]) < 2 and time.monotonic() < deadline:
            if select.select([port.stdout], [], [], 0.1)[0]:
                received += os.read(port.stdout.fileno(), 1 << 16)
        # Nothing else comes: the third task is in flight and stays there.
        assert not select.select([port.stdout], [], [], 0.3)[0]
        results, rest = decode_results(received)
        assert ([r.payload for r in results], rest) == ([b"a", b"b"], b"")
        assert first_seq_without_result(range(4), results) == 2
        assert port.poll() is None
    finally:
        port.kill()
        port.communicate()
    assert port.returncode == -signal.SIGKILL


# -- refusals ----------------------------------------------------------------------------


def test_a_missing_function_exits_4_with_a_message() -> None:
    run = run_port(FAULTS, "no_such_function", tasks([b"x"]))
    assert (run.returncode, run.results) == (EXIT_NO_FUNCTION, [])
    assert "has no function no_such_function" in run.stderr


def test_an_abi_mismatch_exits_3_with_a_message(tmp_path: Path) -> None:
    lib = build_lib(tmp_path, "future", """
#include "orch_work.h"
const int orch_work_abi_version = 99;
int work(const orch_task *task, orch_output *out) { return orch_write(out, task->data, task->data_len); }
""")
    run = run_port(lib, "work", tasks([b"x"]))
    assert (run.returncode, run.results) == (EXIT_ABI_MISMATCH, [])
    assert f"work ABI version mismatch: {lib} says version 99, this runner speaks version 1" in run.stderr


# -- the status channel: the runner's own word, never an exit code a work can give ----------


def test_the_runner_says_ready_on_its_status_pipe_and_nothing_else_on_a_clean_run() -> None:
    run, said = run_port_with_status(FAULTS, "echo", tasks([b"a", b"b"]))
    assert (run.returncode, [r.payload for r in run.results], said) == (EXIT_OK, [b"a", b"b"], ["ready"])


def test_a_work_that_calls_exit_3_is_not_a_refusal(tmp_path: Path) -> None:
    """exit(3) inside the work function gives the same exit code as the runner's ABI
    refusal; the status pipe tells them apart: "ready" and no refusal, against a refusal."""
    run, said = run_port_with_status(FAULTS, "exit_on", tasks([b"one", b"two", b"exit", b"never"], first_seq=502))
    assert run.returncode == 3
    assert [(r.seq, r.payload) for r in run.results] == [(502, b"one"), (503, b"two")]
    assert first_seq_without_result(range(502, 506), run.results) == 504  # the task it exited in
    assert said == ["ready"]
    assert run.stderr == ""  # the runner said nothing: it did not end on its own

    lib = build_lib(tmp_path, "future", """
#include "orch_work.h"
const int orch_work_abi_version = 99;
int work(const orch_task *task, orch_output *out) { return orch_write(out, task->data, task->data_len); }
""")
    refused, said = run_port_with_status(lib, "work", tasks([b"x"]))
    assert (refused.returncode, refused.results) == (EXIT_ABI_MISMATCH, [])
    assert said == [f"refused work ABI version mismatch: {lib} says version 99, this runner speaks version 1 "
                    "(rebuild the release against this orch's orch_work.h)"]


def test_every_refusal_and_the_runners_own_errors_are_on_the_status_pipe(tmp_path: Path) -> None:
    _, said = run_port_with_status(FAULTS, "no_such_function", b"")
    assert said == [f"refused {FAULTS} has no function no_such_function"]
    _, said = run_port_with_status(tmp_path / "missing.so", "work", b"")
    assert len(said) == 1 and said[0].startswith(f"refused cannot load {tmp_path / 'missing.so'}: ")
    malformed, said = run_port_with_status(FAULTS, "echo", tasks([b"first"]) + raw_task(magic=b"OTSX"))
    assert malformed.returncode == EXIT_MALFORMED
    assert said[0] == "ready" and said[1].startswith("error malformed frame after 1 tasks: bad magic")


def test_the_status_pipe_is_the_runners_alone(tmp_path: Path) -> None:
    """Close-on-exec: a program the work function runs does not get it."""
    lib = build_lib(tmp_path, "spawner", """
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include "orch_work.h"
int work(const orch_task *task, orch_output *out) {
    (void)task;
    char line[64];
    FILE *ls = popen("ls /proc/self/fd | wc -l", "r");
    if (ls == NULL || fgets(line, sizeof line, ls) == NULL) return ORCH_WORK_FAILED;
    pclose(ls);
    return orch_write(out, line, strlen(line));
}
""".replace("#include \"orch_work.h\"", "#include <string.h>\n#include \"orch_work.h\""))
    run, said = run_port_with_status(lib, "work", tasks([b"x"]))
    assert said == ["ready"] and run.returncode == EXIT_OK
    # ls's own: stdin, stdout, stderr and the folder it reads; nothing of the runner's
    assert run.results[0].payload == b"4\n"


def test_a_bad_status_fd_is_a_usage_error() -> None:
    for option in ("--status-fd=99", "--status-fd=1", "--status-fd=x", "--status-fd="):
        done = subprocess.run([str(PORT), option, str(FAULTS), "echo"], capture_output=True, input=b"")
        assert done.returncode == EXIT_USAGE
        assert f"orch-port: {option} is not an open descriptor above 2" in done.stderr.decode()


def test_a_library_without_an_abi_version_is_accepted(tmp_path: Path) -> None:
    lib = build_lib(tmp_path, "plain", """
#include "orch_work.h"
int work(const orch_task *task, orch_output *out) { return orch_write(out, task->data, task->data_len); }
""")
    run = run_port(lib, "work", tasks([b"x", b"yz"]))
    assert (run.returncode, [r.payload for r in run.results]) == (EXIT_OK, [b"x", b"yz"])


def test_a_library_that_cannot_be_loaded_exits_5(tmp_path: Path) -> None:
    (tmp_path / "junk.so").write_bytes(b"not an ELF file")
    for library in (tmp_path / "junk.so", tmp_path / "missing.so"):
        run = run_port(library, "work", b"")
        assert run.returncode == EXIT_NO_LIBRARY
        assert run.stderr.startswith(f"orch-port: cannot load {library}")


def test_a_bad_command_line_exits_1() -> None:
    done = subprocess.run([str(PORT), str(FAULTS)], capture_output=True, input=b"")
    assert done.returncode == EXIT_USAGE
    assert b"usage: orch-port [--status-fd=N] LIBRARY.so FUNCTION [NODE_NAME]" in done.stderr


NEVER = encode_task(9, 1, 1.0, b"never")


@pytest.mark.parametrize(
    ("bad", "complaint"),
    [
        (raw_task(magic=b"OTSX") + NEVER, "bad magic"),
        (b"OTSK\x02\x00", "end of input inside a header (6 of 28 bytes)"),
        (raw_task(data=b"abcdef")[:-2], "end of input inside the data (4 of 6 bytes)"),
        (raw_task(data_len=MAX_DATA + 1, data=b"") + NEVER, "over the limit"),
        (raw_task(size=0.0) + NEVER, "size 0 is not in (0, 1]"),
        (raw_task(size=1.5) + NEVER, "size 1.5 is not in (0, 1]"),
        (raw_task(size=math.nan) + NEVER, "is not in (0, 1]"),
        (raw_task(attempt=0) + NEVER, "attempt is 0"),
    ],
    ids=["magic", "short-header", "short-data", "data-len", "size-0", "size-1.5", "size-nan", "attempt-0"],
)
def test_a_malformed_frame_exits_2_after_the_results_before_it(bad: bytes, complaint: str) -> None:
    run = run_port(FAULTS, "echo", tasks([b"first", b"second"]) + bad)
    assert run.returncode == EXIT_MALFORMED
    assert [r.payload for r in run.results] == [b"first", b"second"]
    assert run.stderr.startswith("orch-port: malformed frame") and complaint in run.stderr
    assert run.stderr.count("\n") == 1


# -- speed (printed, not asserted) and valgrind ----------------------------------------------


def test_noop_overhead_per_task() -> None:
    n = 200_000
    frames = tasks([b""] * n)
    before = os.times()
    start = time.perf_counter()
    run = run_port(FAULTS, "noop", frames)
    wall = time.perf_counter() - start
    after = os.times()
    assert run.returncode == EXIT_OK and len(run.results) == n
    port_cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    in_function = sum(r.elapsed_ns for r in run.results) / n / 1000
    print(
        f"\norch-port: {n} noop tasks piped in one go: {wall / n * 1e6:.2f} us/task wall (spawn to exit, "
        f"with Python's pipe I/O and decoding), {port_cpu / n * 1e6:.2f} us/task port CPU, "
        f"{in_function:.3f} us/task inside the function"
    )


def _valgrind_available() -> bool:
    return shutil.which("valgrind") is not None


@pytest.mark.slow
@pytest.mark.skipif(not _valgrind_available(), reason="valgrind is not installed")
def test_valgrind_finds_no_errors_or_leaks(primes_lib: Path) -> None:
    valgrind = ["valgrind", "--error-exitcode=1", "--leak-check=full", "--errors-for-leak-kinds=definite,possible",
                "--quiet"]
    datas = [os.urandom(i % 97) for i in range(300)] + [bytes(3 << 20), b"end"]
    run = run_port(FAULTS, "echo", tasks(datas), wrapper=valgrind, timeout=240)
    assert (run.returncode, run.stderr) == (EXIT_OK, "")
    assert [r.payload for r in run.results] == datas

    mixed = run_port(FAULTS, "fail_on", tasks([b"a", b"fail", b"b"] * 50), wrapper=valgrind, timeout=240)
    assert (mixed.returncode, mixed.stderr) == (EXIT_OK, "")
    assert len(mixed.results) == 150

    grown = run_port(FAULTS, "big", tasks([os.urandom(3000), bytes(70_000), b"x"]), wrapper=valgrind, timeout=240)
    assert (grown.returncode, grown.stderr) == (EXIT_OK, "")
    assert [r.ok for r in grown.results] == [True, False, True]

    primes = run_port(primes_lib, "count_primes", tasks([b"0 1000", b"bad"]), wrapper=valgrind, timeout=240)
    assert (primes.returncode, primes.stderr) == (EXIT_OK, "")
    assert [r.payload for r in primes.results] == [b"168\n", b'range data must be "START END" (two decimal integers)']

    malformed = run_port(FAULTS, "echo", tasks([b"a"]) + raw_task(magic=b"JUNK"), wrapper=valgrind, timeout=240)
    assert malformed.returncode == EXIT_MALFORMED
    assert "malformed frame" in malformed.stderr and "==" not in malformed.stderr
