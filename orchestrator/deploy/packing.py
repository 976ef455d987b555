"""Releases: pack a source (folder or tarball) into a deterministic, checked tarball,
and keep packed tarballs by content.

A packed release is a gzip tarball whose every entry lives under ``NAME-VERSION/``.
Entries are sorted by path, carry no times, owners or stray mode bits, and the gzip
header has no time or file name, so the same content always gives the same bytes and
the same sha256 (with the same zlib), however the files sit on disk.

Nothing in a release may reach outside it when a node unpacks it: absolute paths,
``..``, links leading out, devices, FIFOs and sockets are refused with
``UnsafeReleaseError``.  Hard links are stored as copies of their target, so a folder
and a tarball of the same content pack to the same bytes.

>>> packed = pack_release(Path("releases/primes"), max_bytes=64 << 20)  # doctest: +SKIP
>>> ReleaseArchive(Path(".orch/releases")).put(packed)                  # doctest: +SKIP
PosixPath('.orch/releases/3f2a....tar.gz')
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import stat
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from orchestrator.config.models import ReleaseManifest
from orchestrator.config.workspace import RELEASE_MANIFEST, validate_release_manifest_text
from orchestrator.errors import ConfigError, IntegrityError, NotFoundError, ReleaseError, UnsafeReleaseError

TARBALL_SUFFIXES = (".tar", ".tar.gz", ".tgz")
SKIPPED_DIRS = frozenset({".git", "__pycache__"})
# A release folder's own build output: releases are built on the nodes, and a local
# `make` must not change what gets uploaded.
SKIPPED_TOP_DIRS = frozenset({"build"})
UNPACKED_FACTOR = 4  # unpacked bytes allowed per byte of limit: stops decompression bombs
_LIMIT_HINT = "raise release_max_bytes in orch.yaml or pass --max-bytes"
_REUPLOAD_HINT = "re-upload the release with `orch release upload --force`"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MAX_LINK_HOPS = 40  # the kernel's ELOOP limit
_MAX_MANIFEST_BYTES = 1 << 20
_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)
_SPECIAL_KINDS = {
    stat.S_IFIFO: "FIFO", stat.S_IFSOCK: "socket", stat.S_IFCHR: "character device", stat.S_IFBLK: "block device",
}
_TAR_SPECIAL_KINDS = {tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device", tarfile.FIFOTYPE: "FIFO"}


@dataclass(frozen=True)
class PackedRelease:
    """A validated release: its manifest and the deterministic ``.tar.gz`` bytes."""

    manifest: ReleaseManifest
    sha256: str
    size: int
    data: bytes = field(repr=False)


@dataclass
class _Entry:
    kind: str  # "file", "dir", "symlink", or "hardlink" (until replaced by a copy)
    data: bytes = b""
    executable: bool = False
    target: str = ""  # symlink: as written; hardlink: the release path it names


@dataclass
class _Budget:
    """Bytes a packing may unpack or read; ``limit`` None: no bound."""

    limit: int | None
    max_bytes: int = 0
    used: int = 0

    def charge(self, size: int) -> None:
        self.used += size
        if self.limit is not None and self.used > self.limit:
            raise ReleaseError(
                f"release unpacks to more than {self.limit} bytes "
                f"({UNPACKED_FACTOR} x the limit of {self.max_bytes} bytes)",
                hint=_LIMIT_HINT,
            )


# -- packing -----------------------------------------------------------------------


def pack_release(source: Path, *, max_bytes: int) -> PackedRelease:
    """Validate ``source`` (a release folder or a .tar/.tar.gz/.tgz) and pack it.

    Runs nothing from the release: building happens on the nodes.
    """
    budget = _Budget(UNPACKED_FACTOR * max_bytes, max_bytes)
    if source.is_dir():
        shown = f"{source}/"
        entries = _read_folder(source, budget)
    elif source.is_file() and source.name.endswith(TARBALL_SUFFIXES):
        size = source.stat().st_size
        if size > max_bytes:
            raise ReleaseError(
                f"{source}: tarball is {size} bytes, over the limit of {max_bytes} bytes", hint=_LIMIT_HINT
            )
        top, entries = _read_tarball(source.read_bytes(), budget, str(source))
        shown = f"{source}:{top}"
    elif source.exists():
        raise ReleaseError(
            f"{source}: neither a release folder nor a tarball",
            hint=f"give a folder holding {RELEASE_MANIFEST}, or a {', '.join(TARBALL_SUFFIXES)} file",
        )
    else:
        raise ReleaseError(f"{source}: no such file or folder", hint="check the path")

    manifest_entry = entries.get(RELEASE_MANIFEST)
    if manifest_entry is None or manifest_entry.kind != "file":
        raise ReleaseError(
            f"{shown}{RELEASE_MANIFEST}: missing (or not a plain file)",
            hint=f"a release needs {RELEASE_MANIFEST} at its top; see `orch schema release`",
        )
    manifest = _validate_manifest(manifest_entry.data, f"{shown}{RELEASE_MANIFEST}")
    _check_links(entries, budget, shown)
    data = _write_tarball(f"{manifest.name}-{manifest.version}", entries)
    if len(data) > max_bytes:
        raise ReleaseError(
            f"release {manifest.ref} is {len(data)} bytes packed, over the limit of {max_bytes} bytes",
            hint=_LIMIT_HINT,
        )
    sha256 = hashlib.sha256(data).hexdigest()
    return PackedRelease(manifest=manifest, sha256=sha256, size=len(data), data=data)


def read_manifest_from_tarball(data: bytes, *, shown_as: str = "release tarball") -> ReleaseManifest:
    """The manifest of a packed release (``NAME-VERSION/release.yaml``), or of a
    tarball with ``release.yaml`` at its top; the first such member wins."""
    try:
        with tarfile.open(fileobj=io.BufferedReader(_BoundedReader(data, _Budget(None))), mode="r|") as tar:
            for info in tar:
                parts = _safe_parts(info.name, f"{shown_as}:{info.name}")
                if parts[-1:] == [RELEASE_MANIFEST] and len(parts) <= 2 and info.isreg():
                    if info.size > _MAX_MANIFEST_BYTES:
                        raise ReleaseError(f"{shown_as}:{info.name}: too large for a manifest")
                    return _validate_manifest(_read_member(tar, info), f"{shown_as}:{info.name}")
    except _TAR_ERRORS as exc:
        raise ReleaseError(f"{shown_as}: unreadable or corrupt tarball: {exc}") from exc
    raise ReleaseError(f"{shown_as}: no {RELEASE_MANIFEST} in the tarball")


def _validate_manifest(raw: bytes, shown: str) -> ReleaseManifest:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError("not UTF-8 text", file=shown, hint="save the file as UTF-8") from exc
    return validate_release_manifest_text(text, shown)


def _read_folder(root: Path, budget: _Budget) -> dict[str, _Entry]:
    entries: dict[str, _Entry] = {}
    for path, st in _walk(root):
        rel = path.relative_to(root).as_posix()
        if stat.S_ISDIR(st.st_mode):
            entries[rel] = _Entry("dir")
        elif stat.S_ISREG(st.st_mode):
            budget.charge(st.st_size)  # before reading: a huge file is refused unread
            data = path.read_bytes()
            budget.charge(len(data) - st.st_size)
            entries[rel] = _Entry("file", data=data, executable=bool(st.st_mode & 0o111))
        elif stat.S_ISLNK(st.st_mode):
            entries[rel] = _Entry("symlink", target=os.readlink(path))
        else:
            kind = _SPECIAL_KINDS.get(stat.S_IFMT(st.st_mode), "special file")
            raise UnsafeReleaseError(
                f"{path}: is a {kind}; a release holds only files, folders and links",
                hint="remove it from the release folder",
            )
    return entries


def _walk(folder: Path, *, top: bool = True) -> Iterator[tuple[Path, os.stat_result]]:
    """Every path below ``folder`` with its lstat, never following links."""
    with os.scandir(folder) as it:
        found = sorted(it, key=lambda e: e.name)
    skipped = SKIPPED_DIRS | SKIPPED_TOP_DIRS if top else SKIPPED_DIRS
    for entry in found:
        st = entry.stat(follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode) and entry.name in skipped:
            continue
        yield Path(entry.path), st
        if stat.S_ISDIR(st.st_mode):
            yield from _walk(Path(entry.path), top=False)


def _read_tarball(raw: bytes, budget: _Budget, shown: str) -> tuple[str, dict[str, _Entry]]:
    """Every member, member by member (nothing touches the disk), re-rooted at the
    release top; and the top folder (``"NAME/"`` or ``""``) the tarball used."""
    found: list[tuple[list[str], _Entry, str]] = []
    try:
        reader = _BoundedReader(raw, budget)
        stream = io.BufferedReader(reader)
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for info in tar:
                where = f"{shown}:{info.name}"
                parts = _safe_parts(info.name, where)
                if parts and not SKIPPED_DIRS.intersection(parts if info.isdir() else parts[:-1]):
                    found.append((parts, _tar_entry(tar, info, where), where))
        # Reading to the end checks gzip's CRC.  And tarfile takes a damaged header
        # after the first for the end of the archive: only non-zero bytes after its
        # stopping point reveal it.
        while stream.read(1 << 16):
            pass
    except _TAR_ERRORS as exc:
        raise ReleaseError(f"{shown}: unreadable or corrupt tarball: {exc}", hint="re-create it") from exc
    if reader.last_nonzero >= tar.offset:
        raise ReleaseError(f"{shown}: corrupt tarball: damaged header at byte {tar.offset}", hint="re-create it")

    top = _top_folder(found)
    entries: dict[str, _Entry] = {}
    for parts, entry, where in found:
        path = "/".join(parts[len(top):])
        if entry.kind == "hardlink" and top:
            entry.target = entry.target.removeprefix(f"{top[0]}/")
        if not path:
            continue
        previous = entries.setdefault(path, entry)
        if previous is not entry and not previous.kind == entry.kind == "dir":
            raise ReleaseError(f"{where}: appears twice in the tarball", hint="keep one of them")
    return (f"{top[0]}/" if top else ""), entries


def _tar_entry(tar: tarfile.TarFile, info: tarfile.TarInfo, where: str) -> _Entry:
    if info.isreg():
        return _Entry("file", data=_read_member(tar, info), executable=bool(info.mode & 0o111))
    if info.isdir():
        return _Entry("dir")
    if info.issym():
        return _Entry("symlink", target=info.linkname)
    if info.islnk():
        parts = _safe_parts(info.linkname, f"{where} (hard link to {info.linkname})")
        return _Entry("hardlink", target="/".join(parts))
    kind = _TAR_SPECIAL_KINDS.get(info.type, f"member of type {info.type!r}")
    raise UnsafeReleaseError(
        f"{where}: is a {kind}; a release holds only files, folders and links",
        hint="re-create the tarball without it",
    )


def _read_member(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    reader = tar.extractfile(info)
    assert reader is not None, "only called for regular files"
    with reader:
        return reader.read()


def _safe_parts(name: str, where: str) -> list[str]:
    """The path's parts, refusing absolute paths and ``..``."""
    if name.startswith("/") or re.match(r"^[A-Za-z]:[\\/]", name):
        raise UnsafeReleaseError(f"{where}: absolute path", hint="re-create the tarball with relative paths")
    parts = [p for p in PurePosixPath(name).parts if p != "."]
    if ".." in parts:
        raise UnsafeReleaseError(f"{where}: path contains '..'", hint="re-create the tarball without '..'")
    return parts


def _top_folder(found: list[tuple[list[str], _Entry, str]]) -> list[str]:
    """``[NAME]`` when every member sits under one folder NAME; else ``[]``."""
    heads = {parts[0] for parts, _, _ in found}
    if len(heads) != 1 or any(parts == [RELEASE_MANIFEST] for parts, _, _ in found):
        return []
    head = heads.pop()
    return [] if any(parts == [head] and entry.kind != "dir" for parts, entry, _ in found) else [head]


# -- links -------------------------------------------------------------------------


def _check_links(entries: dict[str, _Entry], budget: _Budget, shown: str) -> None:
    """Refuse links that lead out, and replace hard links by copies of their target."""
    symlinks = {path: e.target for path, e in entries.items() if e.kind == "symlink"}
    for path in entries:
        parts = path.split("/")
        for parent in ("/".join(parts[:i]) for i in range(1, len(parts))):
            if parent in symlinks:  # unpacking would write through the link
                raise UnsafeReleaseError(
                    f"{shown}{path}: lies under the symlink {parent}", hint="make that symlink a real folder"
                )
            if parent in entries and entries[parent].kind != "dir":
                raise ReleaseError(f"{shown}{path}: lies under the file {parent}", hint="rename one of them")
    for path, target in symlinks.items():
        if not target or _resolve(path.split("/")[:-1], target, symlinks, [0]) is None:
            raise UnsafeReleaseError(
                f"{shown}{path}: symlink to {target!r} leads outside the release",
                hint="point it at a path inside the release, relative to the link",
            )
    files = {path: e for path, e in entries.items() if e.kind == "file"}
    for path, entry in entries.items():
        if entry.kind == "hardlink":
            origin = files.get(entry.target)
            if origin is None:
                raise UnsafeReleaseError(
                    f"{shown}{path}: hard link to {entry.target!r}, which is not a file of the release",
                    hint="store a copy of the file instead of a hard link",
                )
            budget.charge(len(origin.data))
            entries[path] = _Entry("file", data=origin.data, executable=origin.executable)


def _resolve(base: list[str], target: str, symlinks: dict[str, str], hops: list[int]) -> list[str] | None:
    """Where ``target``, seen from folder ``base``, leads as the kernel walks it, or
    None when it leaves the release.  Lexical checks are not enough: ``a -> .`` then
    ``b -> a/..`` climbs out."""
    if target.startswith("/"):
        return None
    current = list(base)
    for part in target.split("/"):
        if part == "..":
            if not current:
                return None
            current.pop()
        elif part not in ("", "."):
            current.append(part)
            inner = symlinks.get("/".join(current))
            if inner is not None:
                hops[0] += 1
                resolved = None if hops[0] > _MAX_LINK_HOPS else _resolve(current[:-1], inner, symlinks, hops)
                if resolved is None:
                    return None
                current = resolved
    return current


# -- writing -----------------------------------------------------------------------


def pack_files(top: str, files: dict[str, tuple[bytes, bool]]) -> bytes:
    """A deterministic tarball of ``files`` (path -> (content, executable)) under
    ``top/``, with the same guarantees as a packed release: how a build is shipped."""
    for path in files:
        _safe_parts(path, "build output")
    return _write_tarball(top, {path: _Entry("file", data, executable) for path, (data, executable) in files.items()})


def _write_tarball(top: str, entries: dict[str, _Entry]) -> bytes:
    paths = set(entries)
    for path in entries:  # a tarball may leave folders implicit; the output never does
        parts = path.split("/")
        paths.update("/".join(parts[:i]) for i in range(1, len(parts)))
    buffer = io.BytesIO()
    with (
        gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=9) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        tar.addfile(_tar_info(top, _Entry("dir")))
        for path in sorted(paths, key=lambda p: p.split("/")):
            entry = entries.get(path, _Entry("dir"))
            tar.addfile(_tar_info(f"{top}/{path}", entry), io.BytesIO(entry.data))
    return buffer.getvalue()


def _tar_info(name: str, entry: _Entry) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
    if entry.kind == "dir":
        info.type, info.mode = tarfile.DIRTYPE, 0o755
    elif entry.kind == "symlink":
        info.type, info.mode, info.linkname = tarfile.SYMTYPE, 0o777, entry.target
    else:
        info.mode, info.size = (0o755 if entry.executable else 0o644), len(entry.data)
    return info


class _BoundedReader(io.RawIOBase):
    """``raw`` decompressed, charging every byte to a budget and noting the offset of the
    last non-zero byte.  tarfile reads a pax header whole before anyone sees its size,
    so the bound sits under tarfile rather than between members."""

    def __init__(self, raw: bytes, budget: _Budget) -> None:
        plain = io.BytesIO(raw)
        # gzip or not by the magic bytes, whatever the file's name says
        self.inner = gzip.GzipFile(fileobj=plain, mode="rb") if raw.startswith(b"\x1f\x8b") else plain
        self.budget, self.total, self.last_nonzero = budget, 0, -1

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        chunk = self.inner.read(len(buffer))
        self.budget.charge(len(chunk))
        meaningful = len(chunk.rstrip(b"\0"))
        if meaningful:
            self.last_nonzero = self.total + meaningful - 1
        self.total += len(chunk)
        buffer[: len(chunk)] = chunk
        return len(chunk)


# -- the store --------------------------------------------------------------------


class ReleaseArchive:
    """Packed releases kept by content, as ``FOLDER/<sha256>.tar.gz``.

    Every read verifies the checksum: a tarball is never handed to a node unchecked.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def path(self, sha256: str) -> Path:
        if not _SHA256.match(sha256):
            raise NotFoundError(f"no stored release tarball {sha256!r}", hint="a sha256 is 64 lower-case hex digits")
        return self.folder / f"{sha256}.tar.gz"

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def put(self, packed: PackedRelease) -> Path:
        """Store ``packed``: a no-op when a valid copy is there, a repair when a bad one is."""
        if hashlib.sha256(packed.data).hexdigest() != packed.sha256:
            raise IntegrityError(f"release {packed.manifest.ref}: data does not match its sha256")
        target = self.path(packed.sha256)
        if target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == packed.sha256:
            return target
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".incoming-", suffix=".tar.gz")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(packed.data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        folder_fd = os.open(self.folder, os.O_RDONLY)  # the rename, too, must survive a crash
        try:
            os.fsync(folder_fd)
        finally:
            os.close(folder_fd)
        return target

    def read(self, sha256: str) -> bytes:
        """The tarball's bytes, checked against ``sha256``."""
        target = self.path(sha256)
        try:
            data = target.read_bytes()
        except FileNotFoundError as exc:
            raise NotFoundError(f"{target}: stored release tarball is missing", hint=_REUPLOAD_HINT) from exc
        found = hashlib.sha256(data).hexdigest()
        if found != sha256:
            raise IntegrityError(
                f"{target}: checksum mismatch (expected {sha256}, found {found})", hint=_REUPLOAD_HINT
            )
        return data

    def remove(self, sha256: str) -> None:
        """Delete the tarball; nothing to do when it is already gone."""
        self.path(sha256).unlink(missing_ok=True)


__all__ = ["PackedRelease", "ReleaseArchive", "pack_files", "pack_release", "read_manifest_from_tarball"]
