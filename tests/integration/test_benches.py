"""The benches in ``bench/`` in their ``--quick`` mode, as CI runs them: each one a
subprocess ``python bench/NAME.py --quick`` from the repository root, which builds what
it needs itself, must exit 0 and print its tables.  The figures are not checked (on a
shared 2-core box they mean little); the verdict lines may say "NOT met".
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.helpers.workspace import REPO

NEEDS_SSHD = [pytest.mark.sshd]  # real local nodes

# bench -> the start of each table's title and one of its column headers
BENCHES = [
    pytest.param("plan", [("plan 500 nodes over 10 providers", "best ms")], id="plan"),
    pytest.param("port", [("one task: orch-port vs ctypes", "µs/task")], id="port"),
    pytest.param("exec", [("`true` on 2 local nodes", "median ms")], id="exec", marks=NEEDS_SSHD),
    pytest.param("fleet", [("0. CLI start-up", "median ms"), ("packages orch imports", "share"),
                           ("1. Time until N local nodes are ready", "engine spawn"),
                           ("where the in-process spawn of 2 goes", "stage"),
                           ("2. `true` on 2 nodes", "median"),
                           ("3. push a 2.0 MiB folder (15 files) to 2 nodes", "MiB/s across nodes")],
                 id="fleet", marks=NEEDS_SSHD),
    pytest.param("scheduler", [("3,000 no-op C tasks", "us/task"), ("CPU-bound: iterated_hash", "seconds"),
                               ("task times after each node's first 20 tasks", "within 20 %")],
                 id="scheduler", marks=NEEDS_SSHD),
]

pytestmark = [pytest.mark.slow]


@pytest.mark.parametrize(("bench", "tables"), BENCHES)
def test_the_bench_runs_quick_and_prints_its_tables(bench: str, tables: list[tuple[str, str]]) -> None:
    started = time.monotonic()
    done = subprocess.run([sys.executable, f"bench/{bench}.py", "--quick"], cwd=REPO, capture_output=True,
                          text=True, timeout=240, env={**os.environ, "COLUMNS": "200", "PYTHONIOENCODING": "utf-8"})
    took = time.monotonic() - started
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{bench}.py --quick: exit {done.returncode} after {took:.1f} s:\n{output[-6000:]}"
    for title, column in tables:
        assert title in done.stdout, f"no table {title!r} in:\n{done.stdout[-6000:]}"
        assert column in done.stdout, f"no column {column!r} in:\n{done.stdout[-6000:]}"
    assert "┏" in done.stdout, "no table border in the output"  # rich's heavy head: a table was drawn
    assert "Traceback" not in output, output[-6000:]
