"""Release safety (orchestrator/deploy/releases.py, the store's remove_release): a
release in use cannot be removed, removing one never deletes a tarball another release
or build still names, and a bare name is resolved only when it is unambiguous.
Written to kill the mutants that survived in docs/mutation.md."""

from __future__ import annotations

import dataclasses
import hashlib
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.deploy.packing import pack_release
from orchestrator.deploy.releases import archive, find_release, remove_release, upload_release
from orchestrator.errors import ConflictError, InputError, IntegrityError, NotFoundError
from orchestrator.state import JobState, Store
from orchestrator.state.records import ArtifactRecord
from orchestrator.workspace import Workspace


def version_of(ws: Workspace, version: str) -> Path:
    """A copy of the sample release source as primes@version."""
    folder = ws.root / f"primes-{version}"
    shutil.copytree(ws.releases_src_dir / "primes", folder)
    manifest = folder / "release.yaml"
    manifest.write_text(re.sub(r"(?m)^version: .*$", f"version: {version}", manifest.read_text()))
    return folder


@pytest.fixture
def store(ws: Workspace) -> Iterator[Store]:
    with Store.open(ws.state_db) as opened:
        yield opened


def stored(ws: Workspace, sha: str) -> bool:
    return archive(ws).exists(sha)


def test_a_bare_name_with_one_version_removes_that_version(ws: Workspace, store: Store) -> None:
    uploaded = upload_release(ws, store, version_of(ws, "2.0.0")).record
    removed = remove_release(ws, store, "primes")
    assert (removed.ref, removed.sha256) == ("primes@2.0.0", uploaded.sha256)
    assert store.list_releases() == [] and not stored(ws, uploaded.sha256)


def test_a_bare_name_with_two_versions_is_refused_and_nothing_removed(ws: Workspace, store: Store) -> None:
    first = upload_release(ws, store, version_of(ws, "2.0.0")).record
    second = upload_release(ws, store, version_of(ws, "2.1.0")).record
    with pytest.raises(InputError) as caught:
        remove_release(ws, store, "primes")
    assert (caught.value.message, caught.value.hint) == (
        "release primes has 2 versions (2.0.0, 2.1.0)", "name one: orch release remove primes@2.1.0")
    assert [r.ref for r in store.list_releases()] == ["primes@2.0.0", "primes@2.1.0"]
    assert stored(ws, first.sha256) and stored(ws, second.sha256)


def test_a_bare_name_never_uploaded_is_not_found(ws: Workspace, store: Store) -> None:
    upload_release(ws, store, version_of(ws, "2.0.0"))
    with pytest.raises(NotFoundError) as caught:
        remove_release(ws, store, "nope")
    assert (caught.value.message, caught.value.hint) == ("no release nope is uploaded", "see `orch release list`")
    assert [r.ref for r in store.list_releases()] == ["primes@2.0.0"]


def artifact(store: Store, ref: str, platform: str, sha: str) -> None:
    release = find_release(store, ref)
    store.add_artifact(ArtifactRecord(name=release.name, version=release.version, platform=platform, sha256=sha,
                                      size=4, source_sha256=release.sha256, abi=1, compiler="cc", flags="",
                                      builder="test", built_at=time.time()))


def test_a_tarball_another_build_names_outlives_the_release_removed(ws: Workspace, store: Store) -> None:
    first = upload_release(ws, store, version_of(ws, "2.0.0")).record
    upload_release(ws, store, version_of(ws, "2.1.0"))
    blob = b"same build bytes for both versions"
    shared = hashlib.sha256(blob).hexdigest()
    path = archive(ws).path(shared)
    path.write_bytes(blob)
    own_blob = b"a build only 2.0.0 has"
    own = hashlib.sha256(own_blob).hexdigest()
    archive(ws).path(own).write_bytes(own_blob)
    artifact(store, "primes@2.0.0", "linux-x86_64-glibc2.36", shared)
    artifact(store, "primes@2.0.0", "linux-aarch64-glibc2.36", own)
    artifact(store, "primes@2.1.0", "linux-x86_64-glibc2.36", shared)

    remove_release(ws, store, "primes@2.0.0")
    assert not stored(ws, first.sha256) and not stored(ws, own), "what nothing names any more is dropped"
    assert archive(ws).read(shared) == blob, "a build another release still names was deleted"
    remove_release(ws, store, "primes@2.1.0")
    assert not stored(ws, shared)


def test_a_release_a_live_node_runs_is_not_removed(ws: Workspace, store: Store) -> None:
    uploaded = upload_release(ws, store, version_of(ws, "2.0.0")).record
    store.add_node("w-1", family="workers", provider="local", release="primes@2.0.0")
    with pytest.raises(ConflictError) as caught:
        remove_release(ws, store, "primes@2.0.0")
    assert (caught.value.message, caught.value.hint) == (
        "release primes@2.0.0 is running on 1 node(s): w-1",
        "stop those nodes, or roll the family to another release first")
    assert stored(ws, uploaded.sha256) and [r.ref for r in store.list_releases()] == ["primes@2.0.0"]


def test_six_users_are_counted_and_five_named(ws: Workspace, store: Store) -> None:
    upload_release(ws, store, version_of(ws, "2.0.0"))
    for i in range(6):
        store.add_node(f"w-{i}", family="workers", provider="local", release="primes@2.0.0")
    with pytest.raises(ConflictError) as caught:
        remove_release(ws, store, "primes@2.0.0")
    assert caught.value.message == "release primes@2.0.0 is running on 6 node(s): w-0, w-1, w-2, w-3, w-4"


def test_a_release_an_unfinished_job_names_is_not_removed(ws: Workspace, store: Store) -> None:
    upload_release(ws, store, version_of(ws, "2.0.0"))
    for i in range(6):
        store.add_job(f"j{i}", release="primes@2.0.0", function="count_primes", spec={})
        time.sleep(0.002)  # (listed by creation time)
    with pytest.raises(ConflictError) as caught:
        remove_release(ws, store, "primes@2.0.0")
    assert (caught.value.message, caught.value.hint) == (
        "release primes@2.0.0 is the release of 6 unfinished job(s): j0, j1, j2, j3, j4",
        "let them finish, or delete them (`orch job delete JOB`) first")
    for i in range(6):
        store.set_job_state(f"j{i}", JobState.RUNNING)
        store.set_job_state(f"j{i}", JobState.DONE)
    assert remove_release(ws, store, "primes@2.0.0").ref == "primes@2.0.0"
    [event] = [e for e in store.events() if e.kind == "release.removed"]
    assert event.data == {"release": "primes@2.0.0"}


# -- the archive: content-addressed, every read checked ------------------------------------


def test_a_malformed_sha_is_no_stored_tarball(ws: Workspace) -> None:
    with pytest.raises(NotFoundError) as caught:
        archive(ws).read("ABC")
    assert (caught.value.message, caught.value.hint) == (
        "no stored release tarball 'ABC'", "a sha256 is 64 lower-case hex digits")


def test_a_missing_tarball_says_to_upload_again(ws: Workspace, store: Store) -> None:
    record = upload_release(ws, store, version_of(ws, "2.0.0")).record
    path = archive(ws).path(record.sha256)
    path.unlink()
    with pytest.raises(NotFoundError) as caught:
        archive(ws).read(record.sha256)
    assert (caught.value.message, caught.value.hint) == (
        f"{path}: stored release tarball is missing", "re-upload the release with `orch release upload --force`")


def test_put_refuses_data_that_is_not_its_sha(ws: Workspace) -> None:
    packed = pack_release(version_of(ws, "2.0.0"), max_bytes=64 << 20)
    with pytest.raises(IntegrityError) as caught:
        archive(ws).put(dataclasses.replace(packed, data=packed.data + b"x"))
    assert caught.value.message == "release primes@2.0.0: data does not match its sha256"
    assert not archive(ws).exists(packed.sha256)


def test_put_writes_in_the_archive_folder_then_renames(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tarball is written beside its final name, so the rename never crosses a
    filesystem: with the default temporary folder on another one (tmpfs), put still works."""
    other = Path("/dev/shm")
    if not other.is_dir() or other.stat().st_dev == ws.root.stat().st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the workspace")
    elsewhere = Path(tempfile.mkdtemp(dir=other))
    try:
        monkeypatch.setattr(tempfile, "tempdir", str(elsewhere))
        packed = pack_release(version_of(ws, "2.0.0"), max_bytes=64 << 20)
        path = archive(ws).put(packed)
        assert path == archive(ws).path(packed.sha256) and archive(ws).read(packed.sha256) == packed.data
        assert list(elsewhere.iterdir()) == []
    finally:
        shutil.rmtree(elsewhere)


def test_a_put_that_cannot_rename_leaves_no_temporary_file(ws: Workspace) -> None:
    packed = pack_release(version_of(ws, "2.0.0"), max_bytes=64 << 20)
    blocker = archive(ws).path(packed.sha256)
    (blocker / "inside").mkdir(parents=True)  # a non-empty folder where the tarball goes
    with pytest.raises(OSError):
        archive(ws).put(packed)
    assert sorted(p.name for p in blocker.parent.iterdir()) == [blocker.name]


def test_the_hint_names_the_last_of_three_versions(ws: Workspace, store: Store) -> None:
    for version in ("2.0.0", "2.1.0", "2.2.0"):
        upload_release(ws, store, version_of(ws, version))
    with pytest.raises(InputError) as caught:
        remove_release(ws, store, "primes")
    assert (caught.value.message, caught.value.hint) == (
        "release primes has 3 versions (2.0.0, 2.1.0, 2.2.0)", "name one: orch release remove primes@2.2.0")
