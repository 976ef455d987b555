"""The workspace's catalogue of uploaded releases: stored tarballs + store records.

``orchestrator.deploy.packing`` packs and keeps tarballs by content; this module ties them
to ``name@version`` records in the state store.  A release's builds (``builds.py``) are
kept the same way and go with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from orchestrator.config import ReleaseManifest, load_settings
from orchestrator.deploy.packing import ReleaseArchive, pack_release
from orchestrator.errors import InputError, NotFoundError
from orchestrator.state import ReleaseRecord, Store
from orchestrator.workspace import Workspace


@dataclass(frozen=True)
class UploadOutcome:
    record: ReleaseRecord
    changed: bool  # False: the same content was already registered


def archive(ws: Workspace) -> ReleaseArchive:
    return ReleaseArchive(ws.release_store)


def upload_release(
    ws: Workspace, store: Store, source: Path, *, force: bool = False, max_bytes: int | None = None
) -> UploadOutcome:
    """Pack ``source`` (folder or tarball), store it by content, register name@version."""
    limit = max_bytes if max_bytes is not None else load_settings(ws).release_max_bytes
    packed = pack_release(source, max_bytes=limit)
    blobs = archive(ws)
    blobs.put(packed)  # content-addressed: putting it twice is a no-op
    try:
        previous: str | None = store.get_release(packed.manifest.name, packed.manifest.version).sha256
    except NotFoundError:
        previous = None
    builds = [a.sha256 for a in store.list_artifacts(packed.manifest.name, packed.manifest.version)]
    record, changed = store.add_release(
        packed.manifest.name,
        packed.manifest.version,
        packed.sha256,
        packed.size,
        packed.manifest.model_dump(mode="json"),
        force=force,
    )
    if previous and previous != record.sha256:  # replaced with --force: drop what nothing refers to any more
        _drop_unused(ws, store, [previous, *builds])
    return UploadOutcome(record=record, changed=changed)


def _drop_unused(ws: Workspace, store: Store, shas: list[str]) -> None:
    """Delete the stored tarballs (sources, builds) no release or build refers to."""
    for sha in shas:
        if not store.release_sha_in_use(sha):
            archive(ws).remove(sha)


def parse_ref(ref: str) -> tuple[str, str | None]:
    """``name`` or ``name@version``."""
    name, _, version = ref.partition("@")
    return name, version or None


def find_release(store: Store, ref: str) -> ReleaseRecord:
    name, version = parse_ref(ref)
    return store.get_release(name, version)


def read_release(ws: Workspace, record: ReleaseRecord) -> bytes:
    """The stored tarball, its sha256 verified."""
    return archive(ws).read(record.sha256)


def manifest_of(record: ReleaseRecord) -> ReleaseManifest:
    return ReleaseManifest.model_validate(record.manifest)


def remove_release(ws: Workspace, store: Store, ref: str) -> ReleaseRecord:
    """Unregister name@version (refused while a node runs it); drop its tarball when unused."""
    name, version = parse_ref(ref)
    if version is None:
        versions = [r.version for r in store.list_releases() if r.name == name]
        if not versions:
            raise NotFoundError(f"no release {name} is uploaded", hint="see `orch release list`")
        if len(versions) > 1:
            raise InputError(
                f"release {name} has {len(versions)} versions ({', '.join(versions)})",
                hint=f"name one: orch release remove {name}@{versions[-1]}",
            )
        version = versions[0]
    builds = [a.sha256 for a in store.list_artifacts(name, version)]
    record = store.remove_release(name, version)  # its builds go with it
    _drop_unused(ws, store, [record.sha256, *builds])
    return record
