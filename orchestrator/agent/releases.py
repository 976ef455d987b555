"""Releases on the node: what is installed (``releases/NAME/.orch-sha256``), and
unpacking a RELEASE's tarball safely (checked against its sha256; nothing may land
outside the release folder: no absolute or ``..`` paths, links, devices or setuid
bits).

``NodeReleases`` is the agent's collaborator for them: LOAD (the release's ports
started), UNLOAD, RELEASE (installed: unpacked, built, marked) and the port runner
built before a LOAD."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import re
import shutil
import stat
import tarfile
from pathlib import Path
from typing import Any, Protocol

from . import protocol
from .portbuild import build_port
from .ports import Port, PortOwner
from .protocol import LOAD_FAILED, LOADED

SHA_FILE = ".orch-sha256"
_RELEASE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
BUILD_TIMEOUT = 900.0


class ReleasesOwner(PortOwner, Protocol):
    """What the releases need of the agent that holds them (and their ports)."""

    ports: dict[int, Port]


class NodeReleases:
    """LOAD, UNLOAD and RELEASE for the agent that holds this, and the port runner."""

    def __init__(self, agent: ReleasesOwner) -> None:
        self.agent = agent
        self.folder = Path(agent.cfg.releases)
        self.wanting: dict[str, str] = {}  # release sha256 -> the work that asked for it
        self.install_failed: dict[str, str] = {}  # release sha256 -> why (this connection)
        self._port_build: asyncio.Future[str | None] | None = None

    def new_connection(self) -> None:
        self.wanting.clear()
        self.install_failed.clear()  # a new connection may send the release again

    def installed(self) -> list[dict[str, str]]:
        return installed_releases(self.folder)

    async def load(self, msg: dict[str, Any]) -> None:
        agent = self.agent
        work = str(msg.get("work", ""))
        sha = str(msg.get("sha256", ""))
        try:
            folder = release_folder(self.folder, msg.get("release"))
            indexes = [int(i) for i in msg.get("ports") or []]
            if any(i < 0 or i >= 1 << 16 for i in indexes) or len(set(indexes)) != len(indexes):
                raise ValueError(f"bad port indexes {indexes}")
            library = _inside(folder, str(msg.get("library", "")))
            function = str(msg.get("function", ""))
            if not function:
                raise ValueError("no function named")
            timeout = float(msg["task_timeout"]) if msg.get("task_timeout") else None
        except (TypeError, ValueError) as exc:
            agent.send(protocol.control(LOAD_FAILED, work=work, missing=False, reason=f"bad LOAD: {exc}"))
            return
        not_built = await asyncio.shield(self.build_port_binary())
        if not_built:
            agent.send(protocol.control(LOAD_FAILED, work=work, missing=False, reason=not_built))
            return
        if not is_installed(folder, sha) and sha in self.install_failed:  # the reason, not "missing"
            agent.send(protocol.control(LOAD_FAILED, work=work, missing=False, reason=self.install_failed[sha]))
            return
        if not is_installed(folder, sha):
            self.wanting[sha] = work
            agent.log(f"load {work}: release {folder.name} ({sha[:12]}) is not installed")
            agent.send(protocol.control(LOAD_FAILED, work=work, missing=True,
                                        reason=f"release {folder.name} with sha256 {sha} is not installed"))
            return
        await asyncio.gather(*(agent.ports[i].stop() for i in indexes if i in agent.ports))
        ports = [Port(agent, i, work, library, function, timeout) for i in indexes]
        for port in ports:
            agent.ports[port.index] = port
            port.loading = True
        failure = ""
        try:
            await asyncio.gather(*(p.start() for p in ports))
            reasons = await asyncio.gather(*(p.loaded() for p in ports))
            failure = next((r for r in reasons if r), "")
        except OSError as exc:
            failure = f"cannot start {agent.cfg.port_binary}: {exc}"
        if failure:
            await asyncio.gather(*(p.stop() for p in ports))
            for port in ports:
                agent.forget_port(port)
            agent.log(f"load {work} failed: {failure}")
            agent.send(protocol.control(LOAD_FAILED, work=work, missing=False, reason=failure))
            return
        for port in ports:
            port.loading = False
            if port.proc is not None and port.proc.returncode is not None and port.watcher is not None \
                    and port.watcher.done():  # died between the check and now: report it like any death
                port.watcher = asyncio.ensure_future(port._watch(port.proc))
        agent.log(f"loaded {work}: {folder.name} {function} on ports {indexes}")
        agent.send(protocol.control(LOADED, work=work, ports=indexes))

    async def unload(self, msg: dict[str, Any]) -> None:
        agent = self.agent
        work = str(msg.get("work", ""))
        ports = [p for p in agent.ports.values() if p.work == work]
        await asyncio.gather(*(p.stop() for p in ports))
        for port in ports:
            agent.forget_port(port)
        agent.log(f"unloaded {work}: ports {sorted(p.index for p in ports)} stopped")

    async def install(self, header: dict[str, Any], tarball: memoryview) -> None:
        agent = self.agent
        sha = str(header.get("sha256", ""))
        work = self.wanting.pop(sha, "")
        try:
            folder = release_folder(self.folder, header.get("release"))
            if not SHA256.match(sha):
                raise ValueError(f"{sha!r} is not a sha256")
            build = header.get("build") or []
            if not isinstance(build, list) or not all(isinstance(c, str) for c in build):
                raise ValueError("build must be a list of shell commands")
        except ValueError as exc:
            agent.send(protocol.control(LOAD_FAILED, work=work, missing=False, reason=f"bad RELEASE: {exc}"))
            return
        self.install_failed.pop(sha, None)
        agent.log(f"installing {folder.name} ({sha[:12]}, {len(tarball)} bytes)")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(unpack_release, tarball, sha, folder)
            for command in build:
                await self._build(folder, command)
            (folder / SHA_FILE).write_text(sha + "\n")
        except (OSError, ValueError, tarfile.TarError, EOFError, RuntimeError) as exc:
            reason = f"installing {folder.name} failed: {exc}"
            self.install_failed[sha] = reason
            agent.log(reason)
            agent.send(protocol.control(LOAD_FAILED, work=work, missing=False, reason=reason))
            return
        agent.log(f"installed {folder.name} ({sha[:12]})")

    async def _build(self, folder: Path, command: str) -> None:
        env = dict(os.environ, ORCH_INCLUDE=str(self.agent.cfg.include))
        proc = await asyncio.create_subprocess_shell(
            command, cwd=str(folder), env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        try:
            output, _ = await asyncio.wait_for(proc.communicate(), BUILD_TIMEOUT)
        except BaseException:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            raise
        text = output.decode("utf-8", "replace").strip()
        for line in text.splitlines()[-20:]:
            self.agent.log(f"build {folder.name}: {line}")
        if proc.returncode != 0:
            tail = text.splitlines()[-1] if text else "no output"
            raise RuntimeError(f"`{command}` exited {proc.returncode}: {tail}")

    # -- the port runner ----------------------------------------------------------------------

    def build_port_binary(self) -> asyncio.Future[str | None]:
        """The port runner built from ``port_source`` unless it is current (``launch``
        built it before the agent dialed; a build that failed is tried again at each
        LOAD).  Resolves to None when ready, else why not."""
        if self._port_build is None or (self._port_build.done() and self._port_build.result() is not None):
            self._port_build = asyncio.ensure_future(self._build_port())
        return self._port_build

    async def _build_port(self) -> str | None:
        return await asyncio.to_thread(build_port, self.agent.cfg, self.agent.log)


def _inside(folder: Path, relative: str) -> Path:
    if not relative or relative.startswith("/") or ".." in relative.split("/"):
        raise ValueError(f"library {relative!r} must be a path inside the release")
    return folder / relative


def installed_releases(folder: Path) -> list[dict[str, str]]:
    """The release folders with a finished build: [{release, sha256}]."""
    found = []
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return []
    for entry in entries:
        try:
            sha = (entry / SHA_FILE).read_text().strip()
        except OSError:
            continue
        if SHA256.match(sha):
            found.append({"release": entry.name, "sha256": sha})
    return found


def release_folder(releases: Path, name: Any) -> Path:
    if not isinstance(name, str) or not _RELEASE_NAME.match(name) or name.endswith(".new"):
        raise ValueError(f"{name!r} is not a release folder name")
    return releases / name


def is_installed(folder: Path, sha256: str) -> bool:
    try:
        return (folder / SHA_FILE).read_text().strip() == sha256
    except OSError:
        return False


def unpack_release(tarball: bytes | memoryview, sha256: str, dest: Path) -> None:
    """Check ``tarball`` against ``sha256`` and unpack it into ``dest`` (replacing it),
    stripping the top folder as ``tar --strip-components=1`` does.  Refuses members
    that are absolute, climb out with ``..``, link out of ``dest``, or are devices."""
    data = bytes(tarball)
    found = hashlib.sha256(data).hexdigest()
    if found != sha256:
        raise ValueError(f"tarball sha256 is {found}, not {sha256}")
    staging = dest.with_name(dest.name + ".new")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            members = [m for m in (_stripped(m) for m in tar.getmembers()) if m is not None]
            root = os.path.realpath(staging)
            for member in members:
                _check_member(member, root)
                if hasattr(tarfile, "data_filter"):
                    tar.extract(member, staging, filter="data")
                else:  # Python < 3.11.4: the checks above are the filter
                    tar.extract(member, staging, set_attrs=not member.issym())
                    _check_landed(staging / member.name, root)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _stripped(member: tarfile.TarInfo) -> tarfile.TarInfo | None:
    parts = [p for p in member.name.split("/") if p not in ("", ".")]
    if member.name.startswith("/"):
        raise ValueError(f"absolute path in the tarball: {member.name!r}")
    if len(parts) <= 1:
        return None  # the top folder itself
    member.name = "/".join(parts[1:])
    if member.islnk():
        link = [p for p in member.linkname.split("/") if p not in ("", ".")]
        if member.linkname.startswith("/") or len(link) <= 1:
            raise ValueError(f"hard link {member.name!r} points outside the release")
        member.linkname = "/".join(link[1:])
    return member


def _check_member(member: tarfile.TarInfo, root: str) -> None:
    name = member.name
    if ".." in name.split("/"):
        raise ValueError(f"path climbs out of the release: {name!r}")
    if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
        raise ValueError(f"{name!r} is not a file, folder or link")
    target = os.path.realpath(os.path.join(root, name))
    if target != root and not target.startswith(root + os.sep):
        raise ValueError(f"{name!r} lands outside the release")
    if member.issym():
        if os.path.isabs(member.linkname):
            raise ValueError(f"symlink {name!r} -> {member.linkname!r} is absolute")
        resolved = os.path.realpath(os.path.join(root, os.path.dirname(name), member.linkname))
        if resolved != root and not resolved.startswith(root + os.sep):
            raise ValueError(f"symlink {name!r} -> {member.linkname!r} points outside the release")
    if member.islnk() and ".." in member.linkname.split("/"):
        raise ValueError(f"hard link {name!r} -> {member.linkname!r} climbs out of the release")
    member.mode = (member.mode & 0o755) | (0o700 if member.isdir() else 0o600)
    member.uid = member.gid = 0
    member.uname = member.gname = ""


def _check_landed(path: Path, root: str) -> None:
    parent = os.path.realpath(path.parent)
    if parent != root and not parent.startswith(root + os.sep):
        raise ValueError(f"{path.name!r} was written outside the release")
    with_mode = path.lstat()
    if stat.S_ISREG(with_mode.st_mode) and with_mode.st_mode & 0o6000:
        os.chmod(path, with_mode.st_mode & 0o755)
