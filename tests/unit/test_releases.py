"""orchestrator.deploy.packing: deterministic packing, refusal of unsafe content, the store."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import shutil
import socket
import stat
import subprocess
import tarfile
from pathlib import Path
from typing import Literal

import pytest

from orchestrator.deploy.packing import PackedRelease, ReleaseArchive, pack_release, read_manifest_from_tarball
from orchestrator.errors import (
    ConfigError,
    IntegrityError,
    NotFoundError,
    ReleaseError,
    UnsafeReleaseError,
    ValidationFailed,
)
from tests.helpers.workspace import REPO

LIMIT = 1 << 20

MANIFEST = """\
name: demo
version: 0.1.0
library: build/libdemo.so
functions:
  - name: work
"""

FILES = {
    "release.yaml": MANIFEST.encode(),
    "Makefile": b"all:\n\ttrue\n",
    "src/demo.c": b"int work(void) { return 0; }\n",
    "bin/run.sh": b"#!/bin/sh\necho hi\n",
}
EXECUTABLE = {"bin/run.sh"}


def write_release(root: Path, order: list[str] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for rel in order or list(FILES):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(FILES[rel])
        path.chmod(0o755 if rel in EXECUTABLE else 0o644)
    return root


def tar_member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", link: str = "") -> tuple[
    tarfile.TarInfo, bytes
]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    return info, data


def write_tarball(path: Path, members: list[tuple[tarfile.TarInfo, bytes]], *, with_manifest: bool = True) -> Path:
    mode: Literal["w", "w:gz"] = "w:gz" if path.name.endswith((".tar.gz", ".tgz")) else "w"
    with tarfile.open(path, mode) as tar:
        if with_manifest:
            info, data = tar_member("release.yaml", data=MANIFEST.encode())
            tar.addfile(info, io.BytesIO(data))
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def names_in(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return tar.getnames()


# -- determinism --------------------------------------------------------------------


def test_packing_the_same_folder_twice_gives_the_same_bytes(tmp_path: Path) -> None:
    source = write_release(tmp_path / "demo")
    first = pack_release(source, max_bytes=LIMIT)
    second = pack_release(source, max_bytes=LIMIT)
    assert first.data == second.data
    assert first.sha256 == second.sha256 == hashlib.sha256(first.data).hexdigest()
    assert first.size == len(first.data)
    assert first.manifest.ref == "demo@0.1.0"


def test_mtimes_modes_and_creation_order_do_not_change_the_sha(tmp_path: Path) -> None:
    one = pack_release(write_release(tmp_path / "one"), max_bytes=LIMIT)
    other = write_release(tmp_path / "other", order=list(reversed(FILES)))
    for i, path in enumerate(sorted(other.rglob("*"))):
        os.utime(path, (1_000_000 + i * 7919, 1_000_000 + i * 7919))
    (other / "Makefile").chmod(0o600)  # no exec bit: still packed as 0644
    (other / "bin/run.sh").chmod(0o700)  # an exec bit: packed as 0755
    assert pack_release(other, max_bytes=LIMIT).sha256 == one.sha256


def test_copy_with_new_mtimes_packs_the_same(tmp_path: Path) -> None:
    source = write_release(tmp_path / "src")
    copy = tmp_path / "copy"
    shutil.copytree(source, copy)  # copytree gives fresh mtimes to folders
    (copy / "src/demo.c").touch()
    assert pack_release(copy, max_bytes=LIMIT).sha256 == pack_release(source, max_bytes=LIMIT).sha256


def test_packed_tarball_is_normalised(tmp_path: Path) -> None:
    packed = pack_release(write_release(tmp_path / "demo"), max_bytes=LIMIT)
    header = packed.data[:10]
    assert header[:2] == b"\x1f\x8b"
    assert header[3] & 0x08 == 0, "no file name in the gzip header"
    assert header[4:8] == b"\0\0\0\0", "gzip mtime is 0"
    with tarfile.open(fileobj=io.BytesIO(packed.data), mode="r:gz") as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == [
        "demo-0.1.0",
        "demo-0.1.0/Makefile",
        "demo-0.1.0/bin",
        "demo-0.1.0/bin/run.sh",
        "demo-0.1.0/release.yaml",
        "demo-0.1.0/src",
        "demo-0.1.0/src/demo.c",
    ]
    for m in members:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname) == (0, 0, 0, "", "")
    modes = {m.name: m.mode for m in members}
    assert modes["demo-0.1.0/bin"] == 0o755
    assert modes["demo-0.1.0/bin/run.sh"] == 0o755
    assert modes["demo-0.1.0/Makefile"] == 0o644


def test_git_and_pycache_folders_are_left_out(tmp_path: Path) -> None:
    plain = pack_release(write_release(tmp_path / "plain"), max_bytes=LIMIT)
    noisy = write_release(tmp_path / "noisy")
    (noisy / ".git/objects").mkdir(parents=True)
    (noisy / ".git/HEAD").write_text("ref: refs/heads/main\n")
    (noisy / "src/__pycache__").mkdir()
    (noisy / "src/__pycache__/x.pyc").write_bytes(b"\0")
    assert pack_release(noisy, max_bytes=LIMIT).sha256 == plain.sha256


@pytest.mark.parametrize("name", ["demo.tar.gz", "demo.tgz", "demo.tar"])
@pytest.mark.parametrize("top", ["", "whatever-name/"])
def test_tarball_input_packs_like_the_folder(tmp_path: Path, name: str, top: str) -> None:
    source = write_release(tmp_path / "demo")
    from_folder = pack_release(source, max_bytes=LIMIT)
    mode: Literal["w", "w:gz"] = "w" if name.endswith(".tar") else "w:gz"
    tarball = tmp_path / name
    with tarfile.open(tarball, mode) as tar:  # tar's own order, times and owners
        tar.add(source, arcname=top.rstrip("/") or ".")
    assert pack_release(tarball, max_bytes=LIMIT).data == from_folder.data


def test_repacking_a_packed_release_is_a_fixed_point(tmp_path: Path) -> None:
    packed = pack_release(write_release(tmp_path / "demo"), max_bytes=LIMIT)
    tarball = tmp_path / "demo.tar.gz"
    tarball.write_bytes(packed.data)
    assert pack_release(tarball, max_bytes=LIMIT).sha256 == packed.sha256


def test_symlinks_inside_the_release_stay_symlinks(tmp_path: Path) -> None:
    source = write_release(tmp_path / "demo")
    (source / "src/current.c").symlink_to("demo.c")
    (source / "top").symlink_to("src/../bin")
    with tarfile.open(fileobj=io.BytesIO(pack_release(source, max_bytes=LIMIT).data)) as tar:
        link = tar.getmember("demo-0.1.0/src/current.c")
        top = tar.getmember("demo-0.1.0/top")
    assert link.issym() and link.linkname == "demo.c"
    assert top.issym() and top.linkname == "src/../bin"


def test_hard_links_in_a_tarball_become_copies(tmp_path: Path) -> None:
    source = write_release(tmp_path / "demo")
    (source / "src/copy.c").write_bytes(FILES["src/demo.c"])
    expected = pack_release(source, max_bytes=LIMIT)
    (source / "src/copy.c").unlink()
    tarball = tmp_path / "demo.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(source, arcname="demo")
        tar.addfile(tar_member("demo/src/copy.c", tarfile.LNKTYPE, link="demo/src/demo.c")[0])
    assert pack_release(tarball, max_bytes=LIMIT).sha256 == expected.sha256


def test_read_manifest_from_tarball(tmp_path: Path) -> None:
    packed = pack_release(write_release(tmp_path / "demo"), max_bytes=LIMIT)
    assert read_manifest_from_tarball(packed.data) == packed.manifest
    with pytest.raises(ReleaseError, match=r"no release\.yaml"):
        read_manifest_from_tarball(gzip.compress(b"\0" * 1024))


# -- refused: unsafe members ------------------------------------------------------


def refuse_tarball(tmp_path: Path, *members: tuple[tarfile.TarInfo, bytes], match: str) -> UnsafeReleaseError:
    tarball = write_tarball(tmp_path / "evil.tar.gz", list(members))
    with pytest.raises(UnsafeReleaseError, match=match) as caught:
        pack_release(tarball, max_bytes=LIMIT)
    assert "\n" not in str(caught.value)
    assert caught.value.hint, "names the fix"
    return caught.value


def test_absolute_member_path_is_refused(tmp_path: Path) -> None:
    err = refuse_tarball(tmp_path, tar_member("/etc/cron.d/evil", data=b"x"), match="absolute path")
    assert "/etc/cron.d/evil" in str(err)


def test_dotdot_member_path_is_refused(tmp_path: Path) -> None:
    err = refuse_tarball(tmp_path, tar_member("src/../../evil", data=b"x"), match=r"'\.\.'")
    assert "src/../../evil" in str(err)


def test_symlink_with_absolute_target_is_refused(tmp_path: Path) -> None:
    refuse_tarball(tmp_path, tar_member("passwd", tarfile.SYMTYPE, link="/etc/passwd"),
                   match="passwd: symlink to '/etc/passwd' leads outside")


def test_symlink_climbing_out_is_refused(tmp_path: Path) -> None:
    refuse_tarball(tmp_path, tar_member("src/x", tarfile.SYMTYPE, link="../../x"),
                   match="src/x: symlink to '../../x' leads outside")


def test_symlink_escaping_through_another_symlink_is_refused(tmp_path: Path) -> None:
    # Lexically "here/.." is inside; the kernel follows here -> . first, then climbs out.
    refuse_tarball(
        tmp_path,
        tar_member("here", tarfile.SYMTYPE, link="."),
        tar_member("out", tarfile.SYMTYPE, link="here/.."),
        match="out: symlink",
    )


def test_member_under_a_symlink_is_refused(tmp_path: Path) -> None:
    refuse_tarball(
        tmp_path,
        tar_member("lib", tarfile.SYMTYPE, link="src"),
        tar_member("lib/evil.c", data=b"x"),
        match="lies under the symlink lib",
    )


def test_hardlink_to_outside_is_refused(tmp_path: Path) -> None:
    refuse_tarball(tmp_path, tar_member("shadow", tarfile.LNKTYPE, link="/etc/shadow"), match="absolute path")


def test_hardlink_climbing_out_is_refused(tmp_path: Path) -> None:
    refuse_tarball(tmp_path, tar_member("shadow", tarfile.LNKTYPE, link="../shadow"), match=r"'\.\.'")


def test_dangling_hardlink_is_refused(tmp_path: Path) -> None:
    refuse_tarball(tmp_path, tar_member("copy", tarfile.LNKTYPE, link="not/there"),
                   match="copy: hard link to 'not/there', which is not a file")


@pytest.mark.parametrize(
    ("kind", "word"),
    [(tarfile.CHRTYPE, "character device"), (tarfile.BLKTYPE, "block device"), (tarfile.FIFOTYPE, "FIFO")],
)
def test_special_file_members_are_refused(tmp_path: Path, kind: bytes, word: str) -> None:
    refuse_tarball(tmp_path, tar_member("dev/thing", kind), match=f"dev/thing: is a {word}")


def test_symlink_escaping_a_folder_source_is_refused(tmp_path: Path) -> None:
    source = write_release(tmp_path / "demo")
    (source / "src/up").symlink_to("../../outside")
    with pytest.raises(UnsafeReleaseError, match=re.escape("src/up: symlink to '../../outside' leads outside")):
        pack_release(source, max_bytes=LIMIT)


def test_absolute_symlink_in_a_folder_source_is_refused(tmp_path: Path) -> None:
    source = write_release(tmp_path / "demo")
    (source / "etc").symlink_to("/etc")
    with pytest.raises(UnsafeReleaseError, match="etc: symlink to '/etc' leads outside"):
        pack_release(source, max_bytes=LIMIT)


def test_fifo_in_a_folder_source_is_refused(tmp_path: Path) -> None:
    source = write_release(tmp_path / "demo")
    os.mkfifo(source / "src/pipe")
    with pytest.raises(UnsafeReleaseError, match=r"src/pipe: is a FIFO") as caught:
        pack_release(source, max_bytes=LIMIT)
    assert caught.value.hint == "remove it from the release folder"


def test_socket_in_a_folder_source_is_refused(tmp_path: Path) -> None:
    source = write_release(tmp_path / "demo")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(source / "sock"))
        with pytest.raises(UnsafeReleaseError, match="sock: is a socket"):
            pack_release(source, max_bytes=LIMIT)


def test_device_in_a_folder_source_is_refused(tmp_path: Path) -> None:
    source = write_release(tmp_path / "demo")
    try:
        os.mknod(source / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("creating a device node needs CAP_MKNOD")
    with pytest.raises(UnsafeReleaseError, match="null: is a character device"):
        pack_release(source, max_bytes=LIMIT)


# -- refused: not a release ---------------------------------------------------------


def test_missing_manifest_in_a_folder(tmp_path: Path) -> None:
    source = write_release(tmp_path / "demo")
    (source / "release.yaml").unlink()
    with pytest.raises(ReleaseError, match=r"demo/release.yaml: missing"):
        pack_release(source, max_bytes=LIMIT)


def test_missing_manifest_in_a_tarball(tmp_path: Path) -> None:
    tarball = write_tarball(tmp_path / "x.tgz", [tar_member("a/Makefile", data=b"")], with_manifest=False)
    with pytest.raises(ReleaseError, match=r"x.tgz:a/release.yaml: missing"):
        pack_release(tarball, max_bytes=LIMIT)


def test_invalid_manifest_names_file_and_line(tmp_path: Path) -> None:
    source = write_release(tmp_path / "demo")
    (source / "release.yaml").write_text(MANIFEST.replace("version: 0.1.0", "version: 0.1.0\nfunctions: []"))
    with pytest.raises(ConfigError) as caught:
        pack_release(source, max_bytes=LIMIT)
    assert caught.value.file == str(source / "release.yaml")
    assert caught.value.line is not None
    assert f"{source}/release.yaml:" in str(caught.value)


def test_invalid_manifest_in_a_tarball_names_the_member(tmp_path: Path) -> None:
    tarball = tmp_path / "demo.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        info, data = tar_member("demo/release.yaml", data=b"name: demo\nversion: 1\nlibrary: /abs.so\n")
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValidationFailed) as caught:  # two problems: the library's path, no functions
        pack_release(tarball, max_bytes=LIMIT)
    assert [e.field for e in caught.value.errors] == ["functions", "library"]
    assert all(re.match(r".*demo.tar.gz:demo/release.yaml:\d+: ", str(e)) for e in caught.value.errors)


def test_tarball_over_the_limit_is_refused(tmp_path: Path) -> None:
    tarball = write_tarball(tmp_path / "big.tar", [tar_member("blob", data=os.urandom(4096))])
    with pytest.raises(ReleaseError, match="over the limit of 2048 bytes") as caught:
        pack_release(tarball, max_bytes=2048)
    assert "release_max_bytes" in str(caught.value) and "--max-bytes" in str(caught.value)


def test_packed_release_over_the_limit_is_refused(tmp_path: Path) -> None:
    source = write_release(tmp_path / "demo")
    (source / "blob").write_bytes(os.urandom(8192))  # does not compress
    with pytest.raises(ReleaseError, match=r"demo@0.1.0 is \d+ bytes packed, over the limit of 4096"):
        pack_release(source, max_bytes=4096)


def test_decompression_bomb_is_stopped(tmp_path: Path) -> None:
    tarball = write_tarball(tmp_path / "bomb.tar.gz", [tar_member("zeros", data=bytes(2 << 20))])
    assert tarball.stat().st_size < 16 * 1024
    with pytest.raises(ReleaseError, match="unpacks to more than 65536 bytes"):
        pack_release(tarball, max_bytes=16 * 1024)


def test_folder_too_large_to_pack_is_refused_before_reading(tmp_path: Path) -> None:
    source = write_release(tmp_path / "demo")
    with (source / "sparse").open("wb") as f:
        f.truncate(1 << 30)
    with pytest.raises(ReleaseError, match="unpacks to more than"):
        pack_release(source, max_bytes=LIMIT)


@pytest.mark.parametrize(
    "content",
    [b"definitely not a tarball" * 50, b"\x1f\x8b\x08\x00garbage", b""],
    ids=["text", "bad-gzip", "empty"],
)
def test_corrupt_tarball_is_refused(tmp_path: Path, content: bytes) -> None:
    tarball = tmp_path / "broken.tar.gz"
    tarball.write_bytes(content)
    with pytest.raises(ReleaseError, match=r"broken\.tar\.gz: unreadable or corrupt tarball"):
        pack_release(tarball, max_bytes=LIMIT)


def test_truncated_tarball_is_refused(tmp_path: Path) -> None:
    good = pack_release(write_release(tmp_path / "demo"), max_bytes=LIMIT).data
    tarball = tmp_path / "cut.tar.gz"
    tarball.write_bytes(good[: len(good) // 2])
    with pytest.raises(ReleaseError, match="corrupt tarball"):
        pack_release(tarball, max_bytes=LIMIT)


def test_damaged_later_header_is_refused(tmp_path: Path) -> None:
    # tarfile would take a bad header after the first one for the end of the archive.
    tarball = write_tarball(tmp_path / "x.tar", [tar_member("Makefile", data=b"all:\n")])
    raw = bytearray(tarball.read_bytes())
    second_header = 1024  # release.yaml's header and one block of its data come first
    raw[second_header + 10] ^= 0xFF
    tarball.write_bytes(bytes(raw))
    with pytest.raises(ReleaseError, match="damaged header at byte 1024"):
        pack_release(tarball, max_bytes=LIMIT)


def test_duplicate_members_are_refused(tmp_path: Path) -> None:
    tarball = write_tarball(tmp_path / "x.tar", [tar_member("release.yaml", data=b"name: other\n")])
    with pytest.raises(ReleaseError, match=r"release\.yaml: appears twice"):
        pack_release(tarball, max_bytes=LIMIT)


def test_missing_source_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ReleaseError, match="no such file or folder"):
        pack_release(tmp_path / "nope", max_bytes=LIMIT)


def test_source_neither_folder_nor_tarball_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "release.zip"
    other.write_bytes(b"PK")
    with pytest.raises(ReleaseError, match="neither a release folder nor a tarball"):
        pack_release(other, max_bytes=LIMIT)


# -- the store ------------------------------------------------------------------


@pytest.fixture
def packed(tmp_path: Path) -> PackedRelease:
    return pack_release(write_release(tmp_path / "demo"), max_bytes=LIMIT)


def test_put_writes_by_content_and_is_idempotent(tmp_path: Path, packed: PackedRelease) -> None:
    archive = ReleaseArchive(tmp_path / ".orch/releases")
    assert not archive.exists(packed.sha256)
    path = archive.put(packed)
    assert path == tmp_path / ".orch/releases" / f"{packed.sha256}.tar.gz"
    assert path.read_bytes() == packed.data
    before = path.stat()
    assert archive.put(packed) == path
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert [p.name for p in path.parent.iterdir()] == [path.name], "no temp files left"
    assert archive.exists(packed.sha256)
    assert archive.read(packed.sha256) == packed.data


def test_corrupted_stored_tarball_is_detected_on_read(tmp_path: Path, packed: PackedRelease) -> None:
    archive = ReleaseArchive(tmp_path / "store")
    path = archive.put(packed)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError) as caught:
        archive.read(packed.sha256)
    assert str(path) in str(caught.value)
    assert "orch release upload --force" in str(caught.value)
    archive.put(packed)  # putting again repairs it
    assert archive.read(packed.sha256) == packed.data


def test_remove_and_missing(tmp_path: Path, packed: PackedRelease) -> None:
    archive = ReleaseArchive(tmp_path / "store")
    archive.put(packed)
    archive.remove(packed.sha256)
    archive.remove(packed.sha256)  # already gone: nothing to do
    assert not archive.exists(packed.sha256)
    with pytest.raises(NotFoundError, match="missing"):
        archive.read(packed.sha256)


def test_malformed_sha_never_becomes_a_path(tmp_path: Path) -> None:
    archive = ReleaseArchive(tmp_path / "store")
    with pytest.raises(NotFoundError, match="64 lower-case hex digits"):
        archive.path("../../etc/passwd")


def test_put_refuses_data_not_matching_its_sha(tmp_path: Path, packed: PackedRelease) -> None:
    forged = PackedRelease(manifest=packed.manifest, sha256="0" * 64, size=packed.size, data=packed.data)
    with pytest.raises(IntegrityError):
        ReleaseArchive(tmp_path / "store").put(forged)


# -- with the real tar ---------------------------------------------------------------


@pytest.mark.parametrize("tar_format", ["gnu", "posix", "ustar"])
def test_gnu_tar_tarball_packs_like_the_folder(tmp_path: Path, tar_format: str) -> None:
    source = write_release(tmp_path / "demo")
    (source / "src/current.c").symlink_to("demo.c")
    tarball = tmp_path / "demo.tgz"
    subprocess.run(["tar", f"--format={tar_format}", "-C", tmp_path, "-czf", tarball, "demo"], check=True)
    assert pack_release(tarball, max_bytes=LIMIT).sha256 == pack_release(source, max_bytes=LIMIT).sha256


def test_packed_release_unpacks_with_tar_to_the_same_tree(tmp_path: Path) -> None:
    source = write_release(tmp_path / "demo")
    (source / "src/current.c").symlink_to("demo.c")
    packed = pack_release(source, max_bytes=LIMIT)
    (tmp_path / "demo.tar.gz").write_bytes(packed.data)
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["tar", "-C", out, "-xzf", tmp_path / "demo.tar.gz"], check=True)
    unpacked = out / "demo-0.1.0"
    for rel, content in FILES.items():
        assert (unpacked / rel).read_bytes() == content
    assert os.access(unpacked / "bin/run.sh", os.X_OK)
    assert os.readlink(unpacked / "src/current.c") == "demo.c"


def test_member_under_a_file_is_refused(tmp_path: Path) -> None:
    tarball = write_tarball(
        tmp_path / "x.tar", [tar_member("lib", data=b"x"), tar_member("lib/inner.c", data=b"y")]
    )
    with pytest.raises(ReleaseError, match=r"lib/inner\.c: lies under the file lib"):
        pack_release(tarball, max_bytes=LIMIT)


def test_a_local_build_folder_does_not_change_the_release(tmp_path: Path) -> None:
    src = tmp_path / "rel"
    shutil.copytree(REPO / "releases" / "primes", src, ignore=shutil.ignore_patterns("build"))
    before = pack_release(src, max_bytes=1 << 20).sha256
    (src / "build").mkdir()
    (src / "build" / "libprimes.so").write_bytes(b"\x7fELF local build")
    assert pack_release(src, max_bytes=1 << 20).sha256 == before
