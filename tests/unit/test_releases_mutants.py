"""Release safety (orchestrator/deploy/releases.py, the store's remove_release): a
release in use cannot be removed, removing one never deletes a tarball another release
or build still names, and a bare name is resolved only when it is unambiguous.
Written to kill the mutants that survived in docs/mutation.md."""

from __future__ import annotations

import hashlib
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.deploy.releases import archive, find_release, remove_release, upload_release
from orchestrator.errors import ConflictError, InputError, NotFoundError
from orchestrator.state import Store
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
