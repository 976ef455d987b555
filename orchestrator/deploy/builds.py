"""Release builds: a release's source built once per platform into an artifact that
nodes unpack and run, with no compiler on them.

``build_release`` runs the manifest's ``build`` commands on a builder (this machine,
or a ready node of a family for a platform this machine cannot build), collects the
library and the manifest's ``artifact`` files, and packs them deterministically
(``packing.pack_files``) with ``release.yaml`` and ``.orch-build.json`` (release,
platform, source sha256, ABI, compiler, flags).  The tarball is kept by its sha256
beside the sources and recorded in the store, one per (release, platform).

Determinism: a build on this machine runs in a folder whose path depends only on the
release and platform (``.orch/build/NAME-VERSION-PLATFORM``), with ``LC_ALL=C``,
``SOURCE_DATE_EPOCH=0`` and the same compiler, and the packing carries no times or
owners; so two builds of the same source on the same machine give the same sha256
(tested).  A release whose build writes times or random bytes into its output (or
compiles with ``-g`` elsewhere, which embeds the folder) cannot be; nothing else
differs between two builds.

``ReleaseBuilds`` is what a spawn or a job asks: the build for a node's platform, or a
one-line error naming the platform and the command that makes it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shlex
import shutil
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.agent.platforms import host_platform
from orchestrator.config import ReleaseManifest, load_settings
from orchestrator.config.workspace import RELEASE_MANIFEST
from orchestrator.deploy import native
from orchestrator.deploy.native import NoBuildForPlatform
from orchestrator.deploy.packing import PackedRelease, pack_files
from orchestrator.deploy.releases import archive, manifest_of, read_release
from orchestrator.errors import NotFoundError, ReleaseError
from orchestrator.locks import exclusive
from orchestrator.remote.fanout import ssh_target
from orchestrator.remote.ssh import SSHSession
from orchestrator.state import ArtifactRecord, NodeRecord, NodeState, ReleaseRecord, Store
from orchestrator.workspace import Workspace

BUILD_TIMEOUT = 900.0
BUILD_INFO = ".orch-build.json"
REMOTE_BUILDS = "orch/build"


@dataclass(frozen=True)
class BuildOutcome:
    artifact: ArtifactRecord
    built: bool  # False: this source was already built for this platform; nothing ran


@dataclass(frozen=True)
class Artifact:
    """What a node of one platform gets: the build's sha256 and its bytes (read once)."""

    platform: str
    sha256: str
    load: Callable[[], bytes] = field(repr=False, compare=False)


def build_release(ws: Workspace, store: Store, release: ReleaseRecord, *, platform: str | None = None,
                  builder: str | None = None, force: bool = False) -> BuildOutcome:
    """Build ``release`` for ``platform`` (default: this machine's, or the builder's).

    ``builder`` is a family whose ready nodes build; without it a platform other than
    this machine's is built on the family that orch.yaml's ``builders`` names for it.
    Building again what is already built (same source, same platform) does nothing
    unless ``force``.
    """
    manifest = manifest_of(release)
    if manifest.build_on == "node":
        raise ReleaseError(f"release {release.ref} is built on each node (build_on: node): it has no builds",
                           hint="remove build_on from its release.yaml to build it once per platform")
    host = host_platform()
    family = builder or (load_settings(ws).builders.get(platform) if platform and platform != host else None)
    if family is None and platform not in (None, host):
        raise NoBuildForPlatform(
            f"this machine is {host} and cannot build {release.ref} for {platform}",
            hint=f"name a family of {platform} nodes to build on: orch release build {release.ref} "
                 f"--platform {platform} --builder FAMILY (or builders: {{{platform}: FAMILY}} in orch.yaml)")
    node = _builder_node(store, family, platform) if family else None
    target = (node.extra.get("platform") if node is not None else None) or platform or host
    lock = ws.runtime_dir / "locks" / f"build-{release.name}-{release.version}-{target}.lock"
    with exclusive(lock):  # builds of one release for one platform take turns (they share a folder)
        return _build_locked(ws, store, release, manifest, node, str(target), force)


def _build_locked(ws: Workspace, store: Store, release: ReleaseRecord, manifest: ReleaseManifest,
                  node: NodeRecord | None, target: str, force: bool) -> BuildOutcome:
    if not force:
        try:
            done = store.get_artifact(release.name, release.version, str(target))
        except NotFoundError:
            done = None
        if done is not None and done.source_sha256 == release.sha256 and archive(ws).exists(done.sha256):
            return BuildOutcome(done, built=False)
    log = ws.logs_dir / f"build-{release.name}-{release.version}-{target}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    if node is None:
        files, compiler = _build_here(ws, release, manifest, log)
        name = "local"
    else:
        files, compiler, target = _build_on(ws, node, release, manifest, log)
        name = node.id
    files[RELEASE_MANIFEST] = (_manifest_text(ws, release), False)
    flags = f"CC={os.environ.get('CC') or 'cc'} CFLAGS={os.environ.get('CFLAGS', '(the build files)')}; " \
            f"build: {' && '.join(manifest.build)}"
    info = {"release": release.ref, "platform": target, "source_sha256": release.sha256,
            "abi": native.abi_version(), "compiler": compiler, "flags": flags}
    files[BUILD_INFO] = (json.dumps(info, indent=2, sort_keys=True).encode() + b"\n", False)
    data = pack_files(f"{release.name}-{release.version}", files)
    sha = hashlib.sha256(data).hexdigest()
    archive(ws).put(PackedRelease(manifest, sha, len(data), data))
    record = store.add_artifact(ArtifactRecord(
        name=release.name, version=release.version, platform=str(target), sha256=sha, size=len(data),
        source_sha256=release.sha256, abi=native.abi_version(), compiler=compiler, flags=flags, builder=name,
        built_at=time.time(),
    ))
    return BuildOutcome(record, built=True)


def _manifest_text(ws: Workspace, release: ReleaseRecord) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(read_release(ws, release)), mode="r:gz") as tar:
        for member in tar.getmembers():
            if member.name.split("/")[1:] == [RELEASE_MANIFEST]:
                extracted = tar.extractfile(member)
                if extracted is not None:
                    return extracted.read()
    raise ReleaseError(f"release {release.ref}: its tarball has no {RELEASE_MANIFEST}")


# -- on this machine ---------------------------------------------------------------------------


def _build_here(ws: Workspace, release: ReleaseRecord, manifest: ReleaseManifest, log: Path
                ) -> tuple[dict[str, tuple[bytes, bool]], str]:
    compiler = native.compiler_version()
    folder = ws.runtime_dir / "build" / f"{release.name}-{release.version}-{host_platform()}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        _unpack_source(read_release(ws, release), folder)
        env = {**os.environ, "ORCH_INCLUDE": str(native.include_dir()), "LC_ALL": "C", "SOURCE_DATE_EPOCH": "0"}
        with log.open("w", encoding="utf-8") as out:
            out.write(f"== build {release.ref} ({release.sha256}) on this machine ({host_platform()}), "
                      f"{compiler}\n")
            for command in manifest.build:
                out.write(f"$ {command}\n")
                out.flush()
                try:
                    done = subprocess.run(["sh", "-c", command], cwd=folder, env=env, stdin=subprocess.DEVNULL,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT,
                                          check=False)
                except subprocess.TimeoutExpired as exc:
                    raise ReleaseError(f"building {release.ref}: `{command}` ran past {BUILD_TIMEOUT:.0f} s",
                                       hint=f"full log: {log}") from exc
                text = done.stdout.decode("utf-8", "replace")
                out.write(text + f"[exit {done.returncode}]\n")
                if done.returncode != 0:
                    last = text.strip().splitlines()[-1:] or ["no output"]
                    raise ReleaseError(f"building {release.ref}: `{command}` exited {done.returncode}: {last[0]}",
                                       hint=f"full log: {log}")
        return _collect(folder, release, manifest), compiler
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _unpack_source(data: bytes, folder: Path) -> None:
    """The release's own (validated) tarball, its top folder stripped."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")[1:]
            if not parts:
                continue
            member.name = "/".join(parts)
            tar.extract(member, folder, filter="data")


def _collect(folder: Path, release: ReleaseRecord, manifest: ReleaseManifest) -> dict[str, tuple[bytes, bool]]:
    """The library and the manifest's artifact files, as the build left them."""
    files: dict[str, tuple[bytes, bool]] = {}
    for wanted in [manifest.library, *manifest.artifact]:
        path = folder / wanted
        if path.is_dir():
            for found in sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink()):
                files[found.relative_to(folder).as_posix()] = (found.read_bytes(), os.access(found, os.X_OK))
        elif path.is_file():
            files[wanted] = (path.read_bytes(), os.access(path, os.X_OK))
        else:
            raise ReleaseError(f"building {release.ref}: the build made no {wanted}",
                               hint=f"its build ({' && '.join(manifest.build)}) must produce what release.yaml's "
                                    "library and artifact name")
    return files


# -- on a builder node -----------------------------------------------------------------------


def _builder_node(store: Store, family: str, platform: str | None) -> NodeRecord:
    ready = [n for n in store.list_nodes(family=family, states=[NodeState.READY]) if n.address]
    fitting = [n for n in ready if platform is None or n.extra.get("platform") in (None, platform)]
    if not fitting:
        wanted = f" of platform {platform}" if platform else ""
        raise NoBuildForPlatform(f"family {family!r} has no ready node{wanted} to build on",
                                 hint=f"orch spawn {family}")
    return fitting[0]


def _build_on(ws: Workspace, node: NodeRecord, release: ReleaseRecord, manifest: ReleaseManifest, log: Path
              ) -> tuple[dict[str, tuple[bytes, bool]], str, str]:
    """Build on ``node`` over SSH: the source and the header go up, the build runs in
    ``~/orch/build/NAME-VERSION``, the outputs come back; the port runner for the
    node's platform is built there too when orch has none for it."""
    q = shlex.quote
    folder = f"{REMOTE_BUILDS}/{release.name}-{release.version}"
    with SSHSession(ssh_target(ws, node)) as session, log.open("w", encoding="utf-8") as out:
        probe = session.run(f'cd "$HOME" && {native.PLATFORM_COMMAND} && (cc --version 2>/dev/null | head -n 1)')
        lines = probe.stdout.splitlines()
        platform = native.parse_platform(lines[0] if lines else "")
        compiler = lines[1].strip() if len(lines) > 1 else "unknown"
        out.write(f"== build {release.ref} ({release.sha256}) on node {node.id} ({platform}), {compiler}\n")
        session.makedirs(f"{folder}.src/include")
        session.put_bytes(read_release(ws, release), f"{folder}.src/source.tar.gz")
        session.put_bytes(native.header().read_bytes(), f"{folder}.src/include/orch_work.h")
        session.put_bytes(native.port_source().read_bytes(), f"{folder}.src/port.c")
        script = "\n".join([
            "set -e", 'cd "$HOME"', f"rm -rf {folder} && mkdir -p {folder}",
            f"tar -xzf {folder}.src/source.tar.gz -C {folder} --strip-components=1 --no-same-owner",
            f'export ORCH_INCLUDE="$HOME/{folder}.src/include" LC_ALL=C SOURCE_DATE_EPOCH=0',
            *[f"(cd {folder} && {command})" for command in manifest.build],
            f"cc {' '.join(native.PORT_FLAGS)} -I{folder}.src/include -o {folder}.src/orch-port "
            f"{folder}.src/port.c {' '.join(native.PORT_LIBS)}",
        ])
        done = session.run(script, timeout=BUILD_TIMEOUT)
        out.write(f"$ {script}\n{done.stdout}{done.stderr}[exit {done.exited}]\n")
        if done.failed:
            raise ReleaseError(f"building {release.ref} on node {node.id}: exited {done.exited}: "
                               f"{(done.stderr or done.stdout).strip().splitlines()[-1:] or ['no output']}",
                               hint=f"full log: {log}")
        files: dict[str, tuple[bytes, bool]] = {}
        for wanted in [manifest.library, *manifest.artifact]:
            listing = session.run(f'cd "$HOME/{folder}" && find {q(wanted)} -type f -printf "%m %p\\n" 2>/dev/null '
                                  "|| true").stdout.split("\n")
            found = [line.split(" ", 1) for line in listing if " " in line]
            if not found:
                raise ReleaseError(f"building {release.ref} on node {node.id}: the build made no {wanted}",
                                   hint="its build must produce what release.yaml's library and artifact name")
            for mode, path in found:
                files[path] = (session.get_bytes(f"{folder}/{path}"), int(mode, 8) & 0o111 != 0)
        native.store_port_runner(ws, platform, session.get_bytes(f"{folder}.src/orch-port"), native.port_digest())
        session.run(f'cd "$HOME" && rm -rf {folder} {folder}.src')
    return files, compiler, platform


# -- what a node gets ---------------------------------------------------------------------------


class ReleaseBuilds:
    """A release's builds by platform, each read from the archive once; shared by the
    threads of a spawn."""

    def __init__(self, ws: Workspace, store: Store, release: ReleaseRecord) -> None:
        self.ws, self.release = ws, release
        self.by_platform = {a.platform: a for a in store.list_artifacts(release.name, release.version)
                            if a.source_sha256 == release.sha256}
        self._data: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def for_platform(self, platform: str, *, node: str) -> Artifact:
        """The build for ``platform``; NoBuildForPlatform (one line, naming the node, its
        platform and the command that makes the build) when there is none."""
        found = self.by_platform.get(platform)
        if found is None:
            built = ", ".join(sorted(self.by_platform)) or "no platform"
            raise NoBuildForPlatform(
                f"node {node} is {platform}, and release {self.release.ref} is built for {built}",
                hint=f"orch release build {self.release.ref} --platform {platform}")
        return Artifact(platform, found.sha256, lambda: self._read(found.sha256))

    def _read(self, sha256: str) -> bytes:
        with self._lock:
            if sha256 not in self._data:
                self._data[sha256] = archive(self.ws).read(sha256)
            return self._data[sha256]


def ensure_built_here(ws: Workspace, store: Store, release: ReleaseRecord) -> BuildOutcome | None:
    """Build ``release`` for this machine's platform unless it builds on nodes, is built
    already, or there is no compiler here (then None, and nothing happens)."""
    if manifest_of(release).build_on == "node" or not native.has_compiler():
        return None
    return build_release(ws, store, release)
