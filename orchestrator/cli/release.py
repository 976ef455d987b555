"""``orch release``: upload, build, list, show and remove releases; where the header is."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from orchestrator.cli.common import (
    JsonFlag,
    console,
    open_store,
    print_fields,
    print_json,
    print_table,
    workspace,
)
from orchestrator.cli.lazy import lazy
from orchestrator.state import ArtifactRecord

if TYPE_CHECKING:
    from orchestrator.deploy import builds
    from orchestrator.deploy import releases as catalog
else:
    catalog, builds = lazy("orchestrator.deploy.releases"), lazy("orchestrator.deploy.builds")

app = typer.Typer(help="Upload and manage releases (versioned, checksummed bundles).", no_args_is_help=True)


@app.command("upload")
def upload(
    ctx: typer.Context,
    source: Annotated[Path, typer.Argument(help="Release folder (with release.yaml) or tarball.")],
    force: Annotated[bool, typer.Option(help="Replace name@version even when its content differs.")] = False,
    max_bytes: Annotated[
        int | None, typer.Option("--max-bytes", min=1, help="Largest tarball accepted (default: orch.yaml).")
    ] = None,
    build: Annotated[bool, typer.Option(help="Build it for this machine's platform too (needs a C compiler "
                                              "here, never on the nodes).")] = True,
    as_json: JsonFlag = False,
) -> None:
    """Validate, pack (deterministically) and register a release; build it for this machine's platform."""
    ws = workspace(ctx)
    with open_store(ws) as store:
        outcome = catalog.upload_release(ws, store, source, force=force, max_bytes=max_bytes)
        built = builds.ensure_built_here(ws, store, outcome.record) if build else None
    record = outcome.record
    if as_json:
        print_json({"release": record.ref, "sha256": record.sha256, "size": record.size, "changed": outcome.changed,
                    "build": _build_json(built.artifact) if built else None})
        return
    verb = "uploaded" if outcome.changed else "unchanged (same content already uploaded)"
    console.print(f"release {record.ref} {verb}: sha256 {record.sha256}, {record.size} bytes")
    if built is not None:
        done = "built" if built.built else "already built"
        console.print(f"{done} for {built.artifact.platform}: sha256 {built.artifact.sha256}, "
                      f"{built.artifact.size} bytes")
    elif build:
        console.print("not built here (it builds on each node, or this machine has no C compiler): "
                      f"build it with `orch release build {record.ref} --platform PLATFORM --builder FAMILY`")


@app.command("build")
def build_(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="NAME or NAME@VERSION.")],
    platform: Annotated[str | None, typer.Option(help="Platform to build for, e.g. linux-aarch64-glibc2.36 "
                                                       "(default: this machine's, or the builder's).")] = None,
    builder: Annotated[str | None, typer.Option(help="Family whose ready node builds (default: this machine, "
                                                      "or orch.yaml's builders for --platform).")] = None,
    force: Annotated[bool, typer.Option(help="Build again even when this source is built for the platform.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Build a release once for a platform: nodes of that platform get the binaries, no compiler."""
    ws = workspace(ctx)
    with open_store(ws) as store:
        record = catalog.find_release(store, ref)
        outcome = builds.build_release(ws, store, record, platform=platform, builder=builder, force=force)
    artifact = outcome.artifact
    if as_json:
        print_json({**_build_json(artifact), "built": outcome.built})
        return
    done = "built" if outcome.built else "already built (same source)"
    console.print(f"release {artifact.ref} {done} for {artifact.platform} on {artifact.builder}: "
                  f"sha256 {artifact.sha256}, {artifact.size} bytes")


@app.command("include-dir")
def include_dir() -> None:
    """Print the folder of orch_work.h, the work-function ABI header (for -I, as python3-config --includes)."""
    from orchestrator.deploy import native

    print(native.include_dir())


@app.command("list")
def list_(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """List uploaded releases."""
    with open_store(workspace(ctx)) as store:
        records = store.list_releases()
        built = store.list_artifacts()
    platforms = {r.ref: [a.platform for a in built if a.ref == r.ref] for r in records}
    if as_json:
        print_json([{"release": r.ref, "name": r.name, "version": r.version, "sha256": r.sha256,
                     "size": r.size, "uploaded_at": r.uploaded_at, "platforms": platforms[r.ref]} for r in records])
        return
    rows = [(r.name, r.version, r.sha256[:16], r.size, _when(r.uploaded_at), ", ".join(platforms[r.ref]) or "-")
            for r in records]
    print_table("releases", ["name", "version", "sha256", "bytes", "uploaded", "built for"], rows,
                empty="no releases; upload one with `orch release upload releases/primes`")


@app.command("show")
def show(ctx: typer.Context, ref: Annotated[str, typer.Argument(help="NAME or NAME@VERSION.")],
         as_json: JsonFlag = False) -> None:
    """Show a release: checksum, functions, build and setup (its tarball is verified)."""
    ws = workspace(ctx)
    with open_store(ws) as store:
        record = catalog.find_release(store, ref)
        catalog.read_release(ws, record)  # verifies the stored tarball's sha256
        users = [n.id for n in store.list_nodes() if n.release == record.ref and n.state.live]
        built = store.list_artifacts(record.name, record.version)
    manifest = catalog.manifest_of(record)
    if as_json:
        print_json({"release": record.ref, "sha256": record.sha256, "size": record.size,
                    "manifest": record.manifest, "nodes": users, "builds": [_build_json(a) for a in built]})
        return
    print_fields(f"release {record.ref}", [
        ("sha256", record.sha256),
        ("bytes", record.size),
        ("uploaded", _when(record.uploaded_at)),
        ("library", manifest.library),
        ("functions", ", ".join(f"{f.name} ({f.work_module})" for f in manifest.functions)),
        ("build", " && ".join(manifest.build) + (" (on each node)" if manifest.build_on == "node" else "")),
        ("setup", " && ".join(manifest.setup) or "-"),
        ("nodes", ", ".join(users) or "-"),
        *[(f"built for {a.platform}", f"sha256 {a.sha256}, {a.size} bytes, ABI {a.abi}, {a.compiler}, "
                                       f"on {a.builder}, {_when(a.built_at)}") for a in built],
    ])


@app.command("remove")
def remove(ctx: typer.Context, ref: Annotated[str, typer.Argument(help="NAME@VERSION (or NAME if one version).")]
           ) -> None:
    """Remove a release (refused while a node runs it)."""
    ws = workspace(ctx)
    with open_store(ws) as store:
        record = catalog.remove_release(ws, store, ref)
    console.print(f"release {record.ref} removed")


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _build_json(artifact: ArtifactRecord) -> dict[str, object]:
    return {"release": artifact.ref, "platform": artifact.platform, "sha256": artifact.sha256, "size": artifact.size,
            "source_sha256": artifact.source_sha256, "abi": artifact.abi, "compiler": artifact.compiler,
            "flags": artifact.flags, "builder": artifact.builder, "built_at": artifact.built_at}
