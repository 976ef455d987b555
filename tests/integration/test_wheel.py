"""orch installed from its wheel, as a user installs it: a wheel built from the repository,
a fresh virtualenv outside it, and the quick start with that venv's `orch` in a folder
outside the repository: init, a local provider, `orch release new`, upload (built with
this machine's cc), a family of two nodes, spawn, a job whose sum is checked, stop.

The wheel must carry the C side (orch_work.h, port.c, and orch-port built for this
machine, stamped with the source's digest): the nodes get that orch-port, so the
workspace never builds one (no ``.orch/native/``).  Nothing of the installed venv may
refer to the repository.  Every node and process is stopped whatever the outcome.

The wheel is built from a copy of the repository's files (without its build output or
caches) so that the build leaves nothing in the work tree; the dependencies come from
the package index this machine has (pip's cache, when it has one, makes that quicker).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.agent.platforms import host_platform
from orchestrator.deploy import native
from orchestrator.workspace import Workspace
from tests.helpers.processes import commands_with, processes_of
from tests.helpers.workspace import REPO, stop_everything

pytestmark = [pytest.mark.slow, pytest.mark.sshd]

NOT_COPIED = shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__", "*.so", "*.o")
SUM = sum(range(100_000))


class Timings(dict[str, float]):
    def __str__(self) -> str:
        return ", ".join(f"{what} {seconds:.1f} s" for what, seconds in self.items())


def run(argv: list[str | Path], *, cwd: Path, env: dict[str, str], timeout: float = 120
        ) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (
        f"{' '.join(map(str, argv))} exited {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def clean_env(venv: Path) -> dict[str, str]:
    """This environment without the repository's venv or workspace: the new venv's bin first."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "ORCH_WORKSPACE", "ORCH_INCLUDE")}
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and not p.startswith(str(REPO))]
    env["PATH"] = os.pathsep.join([str(venv / "bin"), *path])
    env["COLUMNS"] = "200"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


@pytest.fixture
def stopped_afterwards(tmp_path: Path) -> Iterator[Path]:
    """The workspace's root; whatever happens, its nodes are stopped and none of their
    processes is left (the venv's `orch stop --all` first, then the repository's code)."""
    root = tmp_path / "ws"
    try:
        yield root
    finally:
        orch = tmp_path / "venv" / "bin" / "orch"
        if (root / "orch.yaml").is_file():
            if orch.exists():
                subprocess.run([orch, "stop", "--all"], cwd=root, env=clean_env(tmp_path / "venv"),
                               capture_output=True, timeout=120, check=False)
            stop_everything(Workspace(root))
            deadline = time.monotonic() + 10
            while commands_with(str(root)) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert commands_with(str(root)) == [], "a process of the workspace's nodes outlived the test"


def test_the_quick_start_runs_from_the_wheel(tmp_path: Path, stopped_afterwards: Path) -> None:
    timings = Timings()
    started = time.monotonic()

    # The wheel, built from the repository's files.
    source, dist = tmp_path / "source", tmp_path / "dist"
    shutil.copytree(REPO, source, ignore=NOT_COPIED)
    run([sys.executable, "-m", "pip", "wheel", source, "--no-deps", "-w", dist, "-q"], cwd=tmp_path,
        env=clean_env(tmp_path / "venv"), timeout=300)
    (wheel,) = dist.glob("orch-*.whl")
    platform = host_platform()
    assert wheel.name.endswith(f"-py3-none-linux_{os.uname().machine}.whl"), wheel.name
    with zipfile.ZipFile(wheel) as zipped:
        names = set(zipped.namelist())
        runner = f"orchestrator/native/{platform}/orch-port"
        assert {"orchestrator/native/include/orch_work.h", "orchestrator/native/port.c", runner,
                f"{runner}.source-sha256", "orchestrator/agent/agent.py", "orchestrator/py.typed",
                "orchestrator/server/static/dashboard.html"} <= names
        assert zipped.read(f"{runner}.source-sha256").decode().strip() == native.port_digest()
        assert zipped.getinfo(runner).external_attr >> 16 & 0o111, "orch-port is executable"
        assert not any(name.startswith(("worker_native/", "tests/")) for name in names)
    timings["wheel"] = time.monotonic() - started

    # A fresh venv outside the repository (from the base interpreter, not the repository's venv).
    venv = tmp_path / "venv"
    env = clean_env(venv)
    mark = time.monotonic()
    run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", venv], cwd=tmp_path, env=env)
    timings["venv"] = time.monotonic() - mark
    mark = time.monotonic()
    run([venv / "bin" / "python", "-m", "pip", "install", "-q", wheel], cwd=tmp_path, env=env, timeout=300)
    timings["install"] = time.monotonic() - mark
    orch = venv / "bin" / "orch"
    installed = Path(run([venv / "bin" / "python", "-c", "import orchestrator; print(orchestrator.__file__)"],
                         cwd=tmp_path, env=env).stdout.strip()).parent
    assert installed.is_relative_to(venv), installed
    referring = [str(path) for path in venv.rglob("*") if path.is_file() and not path.is_symlink()
                 and (str(REPO).encode() in (data := path.read_bytes()) or str(source).encode() in data)]
    assert referring == [], "files of the installed orch refer to the repository (or the wheel's source)"

    # The quick start, in a folder outside the repository.
    ws = stopped_afterwards
    mark = time.monotonic()
    run([orch, "init", ws.name], cwd=tmp_path, env=env)
    run([orch, "provider", "add", "local", "--driver", "local", "--max-nodes", "4"], cwd=ws, env=env)
    include = run([orch, "release", "include-dir"], cwd=ws, env=env).stdout.strip()
    assert include == str(installed / "native" / "include")
    made = run([orch, "release", "new", "hello"], cwd=ws, env=env)
    assert "releases/hello" in made.stdout
    uploaded = json.loads(run([orch, "release", "upload", "releases/hello", "--json"], cwd=ws, env=env).stdout)
    assert uploaded["release"] == "hello@0.1.0" and uploaded["build"]["platform"] == platform
    (ws / "node_families" / "hello.yaml").write_text(
        "# two nodes of the new release on this machine\n"
        "release: hello\ncount: 2\nplacement:\n  policy: ordered\n  providers: [local]\n")
    run([orch, "validate"], cwd=ws, env=env)
    run([orch, "spawn", "hello"], cwd=ws, env=env)
    nodes = json.loads(run([orch, "nodes", "--json"], cwd=ws, env=env).stdout)
    assert [(n["family"], n["state"]) for n in nodes] == [("hello", "ready")] * 2, nodes
    assert not (ws / ".orch" / "native").exists(), "the nodes got the wheel's orch-port: none was built here"

    job = json.loads(run([orch, "job", "run", "hello:sum_range", "--input", "0:100000", "--json"],
                         cwd=ws, env=env).stdout)
    assert job["state"] == "done" and job["counters"]["failed"] == 0, job
    lines = run([orch, "job", "result", job["job"]], cwd=ws, env=env).stdout.split()
    assert len(lines) == job["counters"]["done"] and sum(int(line) for line in lines) == SUM == 4_999_950_000

    run([orch, "stop", "--all"], cwd=ws, env=env)
    assert json.loads(run([orch, "nodes", "--json"], cwd=ws, env=env).stdout) == []
    for node in nodes:
        assert processes_of(node["id"], ws / "no-such-folder") == [], f"{node['id']} left processes"
    timings["quick start"] = time.monotonic() - mark
    timings["total"] = time.monotonic() - started
    print(f"wheel test: {timings}")
