"""Releases built once per platform: deterministic builds, builds on a builder node,
nodes without a compiler running C work from a build, and a node whose platform has no
build failing in one line with nothing installed."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator import fleet
from orchestrator.agent.platforms import host_platform
from orchestrator.deploy import native
from orchestrator.deploy.builds import BUILD_INFO, build_release
from orchestrator.deploy.releases import archive, find_release, upload_release
from orchestrator.errors import ReleaseError
from orchestrator.remote.fanout import exec_on
from orchestrator.scheduler import jobs
from orchestrator.state import ArtifactRecord, Store
from orchestrator.workspace import Workspace
from tests.helpers.cli import ORCH, orch
from tests.helpers.primes import primes_below
from tests.helpers.workspace import primes_workspace, stop_everything

pytestmark = [pytest.mark.sshd, pytest.mark.slow]

# What a node needs on its PATH to be bootstrapped and run its agent: no cc, gcc or make.
NODE_TOOLS = ("sh", "bash", "tar", "gzip", "sha256sum", "rm", "mkdir", "mv", "ln", "cat", "grep", "uname",
              "getconf", "chmod", "python3", "head", "env", "sleep", "ls", "true", "false", "test")


@pytest.fixture
def ws(tmp_path: Path) -> Iterator[Workspace]:
    made = primes_workspace(tmp_path / "ws", count=2)
    try:
        yield made
    finally:
        stop_everything(made)


def members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return {m.name: (tar.extractfile(m) or io.BytesIO()).read() for m in tar.getmembers() if m.isfile()}


def test_a_build_carries_binaries_only_and_two_builds_are_the_same_bytes(ws: Workspace) -> None:
    with Store.open(ws.state_db) as store:
        release = find_release(store, "primes")
        first = build_release(ws, store, release).artifact
        again = build_release(ws, store, release, force=True)
        assert again.built and again.artifact.sha256 == first.sha256, "a build is deterministic"
        assert build_release(ws, store, release).built is False, "built already: nothing runs"
    files = members(archive(ws).read(first.sha256))
    assert sorted(files) == sorted(f"primes-{release.version}/{p}" for p in
                                   ("release.yaml", "build/libprimes.so", BUILD_INFO))
    info = json.loads(files[f"primes-{release.version}/{BUILD_INFO}"])
    assert info["platform"] == host_platform() and info["source_sha256"] == release.sha256
    assert info["abi"] == native.abi_version() == first.abi and info["compiler"] == first.compiler
    assert first.compiler.startswith(("cc", "gcc")) and first.builder == "local"


def test_a_builder_node_builds_what_this_machine_would(ws: Workspace) -> None:
    (ws.families_dir / "builders.yaml").write_text(
        "release: primes\ncount: 1\nworkers_per_node: 1\nplacement:\n  providers: [local]\n")
    with Store.open(ws.state_db) as store:
        assert fleet.spawn(ws, store, "builders").ok
        release = find_release(store, "primes")
        here = build_release(ws, store, release).artifact
        (builder,) = store.list_nodes(family="builders")
        shutil.rmtree(ws.runtime_dir / "native")  # the builder makes the port runner for its platform too
        there = build_release(ws, store, release, builder="builders", force=True)
    assert there.built and there.artifact.builder == builder.id
    assert (there.artifact.platform, there.artifact.sha256) == (host_platform(), here.sha256)
    assert (ws.runtime_dir / "native" / host_platform() / native.PORT_BINARY).is_file()


def test_nodes_without_a_compiler_run_the_primes_job(ws: Workspace, tmp_path: Path) -> None:
    tools = tmp_path / "image-bin"  # a minimal image: what bootstrap and the agent use, and no compiler
    tools.mkdir()
    for tool in NODE_TOOLS:
        found = shutil.which(tool, path="/usr/local/bin:/usr/bin:/bin")  # what sshd gives sessions
        assert found, tool
        (tools / tool).symlink_to(found)
    (ws.providers_dir / "local.yaml").write_text(f"driver: local\nmax_nodes: 8\noptions:\n  path: {tools}\n")
    with Store.open(ws.state_db) as store:
        report = fleet.spawn(ws, store, "workers")
        assert report.ok, [str(f) for f in report.failures]
        nodes = fleet.select_nodes(store, family="workers")
        probe = exec_on(ws, nodes, "command -v cc gcc make || echo none")
        assert all(r.stdout.strip() == "none" for r in probe.nodes.values()), probe.nodes  # type: ignore[union-attr]
        for node in nodes:
            log = (ws.logs_dir / f"{node.id}.log").read_text()
            assert "::orch-step unpack" in log and "::orch-step build" not in log
        job = jobs.submit(ws, store, "primes:count_primes", input="0:300000", family="workers")
        outcome = jobs.run(ws, store, job.id)
        assert outcome.state.value == "done", outcome.reason
        total = sum(int(n) for r in jobs.result(ws, store, job.id) if r.ok for n in r.payload.split())
    assert total == primes_below(300000)


def test_a_node_whose_platform_has_no_build_fails_in_one_line_with_nothing_installed(ws: Workspace) -> None:
    with Store.open(ws.state_db) as store:  # a build for another machine only: nothing for these nodes
        release = find_release(store, "primes")
        mine = build_release(ws, store, release).artifact
        store.add_artifact(ArtifactRecord(**{**mine.__dict__, "platform": "linux-aarch64-glibc2.36"}))
        store._query("DELETE FROM artifacts WHERE platform=?", (host_platform(),))
    no_compiler = {**os.environ, "CC": "/nonexistent/cc", "COLUMNS": "400"}  # nor can this machine build
    done = subprocess.run([*ORCH, "spawn", "workers", "--keep-failed"], cwd=ws.root, env=no_compiler,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode != 0, done.stdout
    output = done.stdout + done.stderr
    line = next(line for line in output.splitlines() if "linux-aarch64-glibc2.36" in line)
    assert f"is {host_platform()}" in line and "node workers-" in line
    assert f"orch release build primes@{release.version} --platform {host_platform()}" in line
    with Store.open(ws.state_db) as store:
        failed = store.list_nodes(family="workers")
        assert failed and all(n.state.value == "failed" for n in failed)
    homes = [Path(n) / "home" for n in (ws.runtime_dir / "drivers" / "local" / "local").glob("workers-*")]
    assert homes and all(not (home / "orch").exists() for home in homes), "nothing was installed"


def test_building_for_a_platform_this_machine_is_not_needs_a_builder(ws: Workspace) -> None:
    done = orch(ws, "release", "build", "primes", "--platform", "linux-aarch64-glibc2.36")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "--builder FAMILY" in done.stderr and "linux-aarch64-glibc2.36" in done.stderr
    with Store.open(ws.state_db) as store, pytest.raises(ReleaseError, match="has no ready node"):
        build_release(ws, store, find_release(store, "primes"), builder="nobody")


def test_a_release_built_on_each_node_is_built_there(ws: Workspace) -> None:
    manifest = ws.releases_src_dir / "primes" / "release.yaml"
    manifest.write_text(manifest.read_text().replace("version: 1.1.0", "version: 1.1.0-src") + "build_on: node\n")
    (ws.families_dir / "workers.yaml").write_text(
        (ws.families_dir / "workers.yaml").read_text().replace("release: primes", "release: primes@1.1.0-src"))
    with Store.open(ws.state_db) as store:
        release = upload_release(ws, store, ws.releases_src_dir / "primes").record
        with pytest.raises(ReleaseError, match="built on each node"):
            build_release(ws, store, release)
        report = fleet.spawn(ws, store, "workers", count=1)
        assert report.ok, [str(f) for f in report.failures]
        (node,) = fleet.select_nodes(store, family="workers")
        log = (ws.logs_dir / f"{node.id}.log").read_text()
        assert "::orch-step build" in log and f"gets {release.sha256}" in log  # the source, built there
        assert store.list_artifacts("primes", "1.1.0-src") == []
        job = jobs.submit(ws, store, "primes@1.1.0-src:count_primes", input="0:100000", family="workers")
        assert jobs.run(ws, store, job.id).state.value == "done"
        total = sum(int(n) for r in jobs.result(ws, store, job.id) if r.ok for n in r.payload.split())
    assert total == primes_below(100000)
