"""The C side orch ships, and the platforms binaries are built for.

orch carries the work-function ABI header (``orch_work.h``) and the port runner's
source (``port.c``).  In a wheel they are package data under ``orchestrator/native/``,
with the port runner already built for the wheel's platform; in a source checkout
(an editable install) they are the repository's ``worker_native/``.

A *platform* is what decides whether a binary runs on a machine: the architecture as
``uname -m`` names it and the C library with its version, ``linux-x86_64-glibc2.36``.
Nodes report theirs (bootstrap asks ``uname -m`` and ``getconf GNU_LIBC_VERSION``, the
agent ``os.uname`` and ``os.confstr``: the same two facts), and every binary orch ships
(a release's build, the port runner) is chosen by it.

The port runner for a platform comes from, in order: the wheel's build when the
platforms and the source match; the workspace's cache (``.orch/native/PLATFORM/``);
a build on this machine with ``cc`` when the platform is this machine's.  For other
platforms it is built on a builder node by ``orch release build --platform``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

from orchestrator.agent.platforms import host_platform, platform_of
from orchestrator.errors import ReleaseError
from orchestrator.locks import exclusive
from orchestrator.workspace import Workspace

_PACKAGED = Path(__file__).resolve().parents[1] / "native"
_CHECKOUT = Path(__file__).resolve().parents[2] / "worker_native"
PORT_BINARY = "orch-port"
PORT_FLAGS = ("-O2", "-std=c11")
PORT_LIBS = ("-ldl",)
BUILD_TIMEOUT = 600.0
_ABI = re.compile(rb"#define\s+ORCH_WORK_ABI_VERSION\s+(\d+)")


class NoBuildForPlatform(ReleaseError):
    """A binary orch would ship to a node does not exist for the node's platform."""


def native_dir() -> Path:
    """Where the header and the port runner's source are: the wheel's package data,
    else the source checkout's ``worker_native/``."""
    return _PACKAGED if (_PACKAGED / "include" / "orch_work.h").is_file() else _CHECKOUT


def include_dir() -> Path:
    """The folder holding ``orch_work.h`` (what a release's build passes to ``-I``)."""
    return native_dir() / "include"


def header() -> Path:
    return include_dir() / "orch_work.h"


def port_source() -> Path:
    return native_dir() / "port.c"


def abi_version() -> int:
    """``ORCH_WORK_ABI_VERSION`` of the header orch ships."""
    found = _ABI.search(header().read_bytes())
    if found is None:
        raise ReleaseError(f"{header()} defines no ORCH_WORK_ABI_VERSION")
    return int(found.group(1))


def port_digest() -> str:
    """sha256 of the port runner's source (port.c and the header it includes)."""
    return hashlib.sha256(port_source().read_bytes() + b"\0" + header().read_bytes()).hexdigest()


PLATFORM_COMMAND = "echo \"$(uname -m) $(getconf GNU_LIBC_VERSION 2>/dev/null)\""
"""A shell command whose output ``parse_platform`` reads (on a node, in one round trip)."""


def parse_platform(line: str) -> str:
    machine, _, libc = line.strip().partition(" ")
    return platform_of(machine, libc)


def compiler() -> list[str]:
    """The C compiler orch builds with: ``$CC``, else ``cc``."""
    return shlex.split(os.environ.get("CC") or "cc")


def compiler_version() -> str:
    """The compiler's first line of ``--version`` (recorded with every build)."""
    try:
        done = subprocess.run([*compiler(), "--version"], capture_output=True, text=True, timeout=30, check=False)
    except OSError as exc:
        raise ReleaseError(f"no C compiler on this machine ({' '.join(compiler())}: {exc.strerror})",
                           hint="install one (Debian: apt install gcc), or build on a builder node "
                                "with `orch release build --platform`") from exc
    return (done.stdout.splitlines() or ["unknown"])[0].strip()


def has_compiler() -> bool:
    return shutil.which(compiler()[0]) is not None


def port_runner(ws: Workspace, platform: str) -> bytes:
    """The port runner built for ``platform`` from the source orch ships."""
    digest = port_digest()
    packaged = _PACKAGED / platform / PORT_BINARY
    if packaged.is_file() and _stamp(packaged) == digest:
        return packaged.read_bytes()
    cached = ws.runtime_dir / "native" / platform / PORT_BINARY
    if cached.is_file() and _stamp(cached) == digest:
        return cached.read_bytes()
    if platform != host_platform():
        raise NoBuildForPlatform(
            f"no port runner for {platform} (this machine is {host_platform()})",
            hint=f"orch release build RELEASE --platform {platform} --builder FAMILY (it builds the port runner too)",
        )
    with exclusive(ws.runtime_dir / "locks" / f"native-{platform}.lock"):  # one build, for every spawn thread
        if not (cached.is_file() and _stamp(cached) == digest):
            build_port_runner(cached)
    return cached.read_bytes()


def store_port_runner(ws: Workspace, platform: str, binary: bytes, digest: str) -> None:
    """Keep a port runner built elsewhere (on a builder node) for ``platform``."""
    target = ws.runtime_dir / "native" / platform / PORT_BINARY
    _write_stamped(target, binary, digest)


def build_port_runner(target: Path) -> None:
    """Compile ``port.c`` on this machine into ``target`` (and its source stamp)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as scratch:
        out = Path(scratch) / PORT_BINARY
        argv = [*compiler(), *PORT_FLAGS, f"-I{include_dir()}", "-o", str(out), str(port_source()), *PORT_LIBS]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False)
        except OSError as exc:
            raise ReleaseError(f"cannot build the port runner: {argv[0]}: {exc.strerror}",
                               hint="install a C compiler (Debian: apt install gcc)") from exc
        if done.returncode != 0:
            last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ReleaseError(f"building the port runner failed (exit {done.returncode}): {last[0]}")
        _write_stamped(target, out.read_bytes(), port_digest())


def _stamp(binary: Path) -> str:
    try:
        return binary.with_name(binary.name + ".source-sha256").read_text().strip()
    except OSError:
        return ""


def _write_stamped(target: Path, binary: bytes, digest: str) -> None:
    """The binary, then its stamp: a reader that sees the stamp sees this binary."""
    target.parent.mkdir(parents=True, exist_ok=True)
    stamp = target.with_name(target.name + ".source-sha256")
    stamp.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    with os.fdopen(fd, "wb") as out:
        out.write(binary)
    os.chmod(tmp, 0o755)
    os.replace(tmp, target)
    stamp.write_text(digest + "\n")
