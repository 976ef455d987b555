"""`orch release new`: a C release that validates, builds (by `orch release upload`, and by
a plain `make`) and computes what it says; an existing folder or a bad name is refused
with nothing written."""

from __future__ import annotations

import ctypes
import io
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

from bench.ctypes_work import FAIL, WRITE, OrchOutput, OrchTask
from orchestrator.agent.platforms import host_platform
from orchestrator.config import ReleaseManifest, load_model
from orchestrator.deploy.releases import archive
from orchestrator.workspace import Workspace
from tests.helpers.cli import Run

Orch = Callable[..., Run]


def call(library: Path, function: str, data: bytes) -> tuple[int, bytes, str | None]:
    """One task through the orch_work.h ABI, in this process: (status, output, failure)."""
    fn = getattr(ctypes.CDLL(str(library)), function)
    fn.argtypes = [ctypes.POINTER(OrchTask), ctypes.POINTER(OrchOutput)]
    fn.restype = ctypes.c_int
    written: list[bytes] = []
    failures: list[str] = []

    def write(_out: object, buf: int, length: int) -> int:
        written.append(ctypes.string_at(buf, length))
        return 0

    def fail(_out: object, message: bytes) -> None:
        failures.append(message.decode())

    write_cb, fail_cb = WRITE(write), FAIL(fail)  # kept alive through the call
    buffer = (ctypes.c_ubyte * max(len(data), 1)).from_buffer_copy(data or b"\0")
    task = OrchTask(buffer, len(data), 1.0, 0, 1, b"test")
    status = fn(ctypes.byref(task), ctypes.byref(OrchOutput(None, write_cb, fail_cb)))
    return status, b"".join(written), failures[-1] if failures else None


def test_a_new_release_validates_uploads_builds_and_sums(tmp_path: Path, orch: Orch) -> None:
    ws = Workspace.init(tmp_path / "ws")
    made = orch("release", "new", "hello", cwd=ws.root)
    assert made.code == 0, made.err
    folder = ws.releases_src_dir / "hello"  # in a workspace: its releases/ folder
    assert sorted(p.name for p in folder.iterdir()) == ["Makefile", "README.md", "hello.c", "release.yaml"]
    assert "releases/hello" in made.out and "orch release upload releases/hello" in made.out
    manifest = load_model(ReleaseManifest, folder / "release.yaml")
    assert (manifest.ref, manifest.library, manifest.build) == ("hello@0.1.0", "build/libhello.so", ["make"])
    assert [(f.name, f.work_module) for f in manifest.functions] == [("sum_range", "range")]
    assert orch("validate").code == 0

    up = orch("release", "upload", "releases/hello", "--json")  # builds it with this machine's cc
    assert up.code == 0, up.err
    uploaded = json.loads(up.out)
    assert uploaded["release"] == "hello@0.1.0" and uploaded["build"]["platform"] == host_platform()
    with tarfile.open(fileobj=io.BytesIO(archive(ws).read(uploaded["build"]["sha256"])), mode="r:gz") as tar:
        assert "hello-0.1.0/build/libhello.so" in tar.getnames()

    # A plain `make` finds the header through `orch release include-dir` (orch on PATH).
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("ORCH_INCLUDE", None)
    built = subprocess.run(["make"], cwd=folder, env=env, capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    library = folder / "build" / "libhello.so"
    assert call(library, "sum_range", b"0 100000") == (0, b"4999950000\n", None)
    assert call(library, "sum_range", b"7 7") == (0, b"0\n", None)
    assert call(library, "sum_range", b"10 5")[0::2] == (1, "range start 10 is after its end 5")
    assert call(library, "sum_range", b"18446744073709551610 18446744073709551615")[0::2] == (
        1, "the sum does not fit in 64 bits: cut the input into smaller tasks")


def test_outside_a_workspace_it_goes_in_the_current_folder(tmp_path: Path, orch: Orch) -> None:
    made = orch("release", "new", "demo_1", cwd=tmp_path)
    assert made.code == 0, made.err
    assert (tmp_path / "demo_1" / "demo_1.c").is_file() and "orch release upload demo_1" in made.out


def test_an_existing_folder_or_a_bad_name_is_refused_with_nothing_written(tmp_path: Path, orch: Orch) -> None:
    parent = tmp_path / "parent"
    (parent / "hello").mkdir(parents=True)
    (parent / "hello" / "mine.txt").write_text("keep me\n")
    refused = orch("release", "new", "hello", "--dir", parent, cwd=tmp_path)
    assert refused.code == 2 and refused.out == ""
    assert len(refused.err.strip().splitlines()) == 1 and "exists already" in refused.err
    assert [p.name for p in parent.iterdir()] == ["hello"] and [p.name for p in (parent / "hello").iterdir()] == [
        "mine.txt"]
    (parent / "taken").write_text("a file, not a folder\n")
    assert orch("release", "new", "taken", "--dir", parent).code == 2
    assert (parent / "taken").read_text() == "a file, not a folder\n"

    bad = orch("release", "new", "Hello World", "--dir", parent)
    assert bad.code == 2 and "not a release name" in bad.err and len(bad.err.strip().splitlines()) == 1
    assert sorted(p.name for p in parent.iterdir()) == ["hello", "taken"]
