"""Poison isolation and honest failure reports on real local nodes: real agents
(bootstrapped over SSH), real ports, real C that crashes, exits and is refused.

One workspace with two local nodes (two ports each) serves the module.  The release
``poison`` is built here from the C below: ``listing`` writes each number of its range
on a line and crashes (abort() or a null store) on five chosen numbers; ``exit3`` calls
exit(3), the port runner's own code for an ABI refusal, in one known task.  The release
``future`` says it was built for work ABI version 99.  Jobs run through the CLI
(`orch job run`, `orch job status`, `orch job result`), each a process of its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator import fleet
from orchestrator.deploy.releases import upload_release
from orchestrator.scheduler import jobs
from orchestrator.state import Store
from orchestrator.workspace import Workspace

pytestmark = [pytest.mark.sshd, pytest.mark.slow]
ORCH = [sys.executable, "-m", "orchestrator"]

ABORTS = (13_577, 402_001, 999_999)
SEGVS = (250_000, 777_777)
BAD = sorted(ABORTS + SEGVS)
EXIT_TASK = 504  # exit3 runs tasks of 10 numbers: task 504 is [5040, 5050)
EXIT_AT = 5_047

POISON_C = f"""
#define _POSIX_C_SOURCE 200809L
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include "orch_work.h"

ORCH_WORK_DEFINE_ABI_VERSION;

static int range_of(const orch_task *task, uint64_t *low, uint64_t *high, orch_output *out)
{{
    char text[64];
    size_t n = task->data_len < sizeof text - 1 ? task->data_len : sizeof text - 1;
    for (size_t i = 0; i < n; i++)
        text[i] = (char)task->data[i];
    text[n] = '\\0';
    if (sscanf(text, "%" SCNu64 " %" SCNu64, low, high) != 2) {{
        orch_fail(out, "bad range");
        return 0;
    }}
    return 1;
}}

/* Each number of the range on a line; abort() on {ABORTS}, a null store on {SEGVS}. */
int listing(const orch_task *task, orch_output *out)
{{
    uint64_t low, high;
    if (!range_of(task, &low, &high, out))
        return ORCH_WORK_FAILED;
    for (uint64_t x = low; x < high; x++) {{
        if ({" || ".join(f"x == {n}u" for n in ABORTS)})
            abort();
        if ({" || ".join(f"x == {n}u" for n in SEGVS)}) {{
            volatile int *volatile nowhere = NULL;
            *nowhere = 1;
        }}
        char line[32];
        int len = snprintf(line, sizeof line, "%" PRIu64 "\\n", x);
        if (orch_write(out, line, (size_t)len) != 0)
            return ORCH_WORK_FAILED;
    }}
    return ORCH_WORK_OK;
}}

/* The work's own exit status 3, the code the port runner gives an ABI refusal. */
int exit3(const orch_task *task, orch_output *out)
{{
    uint64_t low, high;
    if (!range_of(task, &low, &high, out))
        return ORCH_WORK_FAILED;
    if (low <= {EXIT_AT}u && {EXIT_AT}u < high)
        exit(3);
    return orch_write(out, "ok\\n", 3) ? ORCH_WORK_FAILED : ORCH_WORK_OK;
}}
"""

FUTURE_C = """
#include "orch_work.h"
const int orch_work_abi_version = 99; /* not this orch's: the port runner refuses it */
int work(const orch_task *task, orch_output *out) { return orch_write(out, task->data, task->data_len); }
"""

MAKEFILE = """ORCH_INCLUDE ?= ../../worker_native/include
build/lib{name}.so: {name}.c
\tmkdir -p build
\t$(CC) -O2 -std=c11 -fPIC -shared -Wall -I$(ORCH_INCLUDE) -o $@ {name}.c
"""


def write_release(folder: Path, name: str, source: str, functions: list[str]) -> Path:
    where = folder / name
    where.mkdir(parents=True)
    (where / f"{name}.c").write_text(source)
    (where / "Makefile").write_text(MAKEFILE.format(name=name))
    listed = "".join(f"  - {{name: {f}, work_module: range}}\n" for f in functions)
    (where / "release.yaml").write_text(f"name: {name}\nversion: 1.0.0\nbuild:\n  - make\n"
                                        f"library: build/lib{name}.so\nfunctions:\n{listed}")
    return where


class Cluster:
    def __init__(self, ws: Workspace) -> None:
        self.ws = ws

    def orch(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*ORCH, *args], cwd=self.ws.root, capture_output=True, text=True, timeout=300)

    def run_job(self, *args: str) -> dict[str, Any]:
        ran = self.orch("job", "run", *args, "--json")
        assert ran.returncode in (0, 1), ran.stderr
        outcome: dict[str, Any] = json.loads(ran.stdout)
        return outcome

    def status(self, job: str) -> dict[str, Any]:
        shown = self.orch("job", "status", job, "--json")
        assert shown.returncode == 0, shown.stderr
        status: dict[str, Any] = json.loads(shown.stdout)
        return status


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("poison")
    ws = Workspace.init(root / "ws")
    (ws.providers_dir / "local.yaml").write_text("driver: local\nmax_nodes: 4\n")
    (ws.families_dir / "workers.yaml").write_text(
        "release: poison\ncount: 2\nworkers_per_node: 2\nplacement:\n  providers: [local]\n")
    with Store.open(ws.state_db) as store:
        upload_release(ws, store, write_release(ws.releases_src_dir, "poison", POISON_C, ["listing", "exit3"]))
        upload_release(ws, store, write_release(ws.releases_src_dir, "future", FUTURE_C, ["work"]))
        try:
            report = fleet.spawn(ws, store, "workers")
            assert len(report.ready) == 2, report
            yield Cluster(ws)
        finally:
            live = fleet.select_nodes(store, all_nodes=True)
            if live:
                fleet.stop(ws, store, live)


def test_five_crashing_numbers_in_a_million_are_all_the_job_loses(cluster: Cluster, tmp_path: Path) -> None:
    outcome = cluster.run_job("poison:listing", "--input", "0:1000000", "--task-size", "0.01")
    assert outcome["state"] == "done", outcome
    job = outcome["job"]
    status = cluster.status(job)  # a process of its own: from the store alone
    assert [(p["unit"], p["first"], p["last"]) for p in status["failed_pieces"]] == [
        ("numbers", n, n) for n in BAD]
    assert [p["task"] for p in status["failed_pieces"]] == [n // 10_000 for n in BAD]
    for piece in status["failed_pieces"]:
        crash = "SIGABRT" if piece["first"] in ABORTS else "SIGSEGV"
        assert f"died during task {piece['task']} (its piece numbers {piece['first']}): killed by {crash}" \
            in piece["error"], piece
    assert status["failed_tasks"] == []
    counters = status["counters"]
    assert (counters["done"], counters["failed"], counters["pieces_failed"]) == (100, 0, 5), counters
    # Every other number's output: present, in order, once.
    out = tmp_path / "out.txt"
    assert cluster.orch("job", "result", job, "--out", str(out)).returncode == 0
    bad = set(BAD)
    assert out.read_bytes() == b"".join(b"%d\n" % n for n in range(1_000_000) if n not in bad)
    # `orch job status` names them.
    text = cluster.orch("job", "status", job).stdout
    assert "5: numbers 13577, numbers 250000, numbers 402001, numbers 777777, numbers 999999" in " ".join(
        text.split()), text
    for n in BAD:
        assert f"failed piece numbers {n} (task {n // 10_000})" in text


def test_a_work_that_exits_3_is_reported_as_its_exit_status_3_in_its_task(cluster: Cluster) -> None:
    outcome = cluster.run_job("poison:exit3", "--input", "0:10000", "--task-size", "1", "-o", "max_span=10",
                              "--no-isolate-failures", "--max-attempts", "2")
    assert outcome["state"] == "done", outcome
    status = cluster.status(outcome["job"])
    [(seq, error)] = status["failed_tasks"]
    assert seq == EXIT_TASK
    assert error.startswith("attempt 2: port ") and error.endswith(
        f"died during task {EXIT_TASK}: the work exited with status 3"), error
    assert "ABI" not in error and "refused" not in error
    assert status["counters"]["done"] == 999
    assert not any(where.startswith("excluded") for where in status["nodes"].values()), status["nodes"]


def test_a_library_of_another_abi_version_is_refused_by_the_runner_with_both_versions(cluster: Cluster) -> None:
    with Store.open(cluster.ws.state_db) as store:  # a short wait for agents: every node refuses it
        job = jobs.submit(cluster.ws, store, "future:work", input="0:10", agent_wait_seconds=2).id
    resumed = cluster.orch("job", "resume", job, "--json")
    assert resumed.returncode == 1 and json.loads(resumed.stdout)["state"] == "suspended", resumed.stdout
    status = cluster.status(job)
    assert len(status["nodes"]) == 2
    for where in status["nodes"].values():
        assert where.startswith("excluded: the port runner refused the library: work ABI version mismatch: "), where
        assert "says version 99, this runner speaks version 1" in where, where
    assert status["counters"].get("done", 0) == 0 and status["failed_tasks"] == []


@pytest.mark.parametrize(("args", "message"), [
    (["--isolate-floor", "0"], "--isolate-floor: Input should be greater than or equal to 1"),
    (["--isolate-floor", "x"], "Invalid value for '--isolate-floor'"),
])
def test_a_bad_isolation_option_is_one_line_and_changes_nothing(cluster: Cluster, args: list[str],
                                                                 message: str) -> None:
    before = cluster.orch("job", "list", "--json").stdout
    ran = cluster.orch("job", "run", "poison:listing", "--input", "0:10", *args)
    assert ran.returncode == 2, ran.stderr
    assert message in ran.stderr and "Traceback" not in ran.stderr, ran.stderr
    assert cluster.orch("job", "list", "--json").stdout == before
