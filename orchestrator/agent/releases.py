"""Releases on the node: what is installed (``releases/NAME/.orch-sha256``), and
unpacking a RELEASE's tarball safely (checked against its sha256; nothing may land
outside the release folder: no absolute or ``..`` paths, links, devices or setuid
bits)."""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import stat
import tarfile
from pathlib import Path
from typing import Any

SHA_FILE = ".orch-sha256"
_RELEASE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")


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
