"""``orch release``: upload, build, list, show and remove releases; where the header is; a new one."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from orchestrator.cli.common import (
    CliState,
    JsonFlag,
    console,
    open_store,
    print_fields,
    print_json,
    print_table,
    workspace,
)
from orchestrator.cli.lazy import lazy
from orchestrator.errors import WorkspaceError
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


@app.command("new")
def new(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The release's name: its folder, libNAME.so and release.yaml's name.")],
    parent: Annotated[Path | None, typer.Option(
        "--dir", help="Make it in PARENT/NAME (default: the workspace's releases/, else the current folder).")] = None,
) -> None:
    """Start a C release that builds, uploads and runs as it is: release.yaml, Makefile, NAME.c, README.md."""
    from orchestrator.deploy import scaffold

    made = scaffold.new_release(parent if parent is not None else _releases_folder(ctx), name)
    shown = _shown(made.folder)
    console.print(f"release {name} made in {shown}: {', '.join(made.files)}", markup=False)
    console.print(f"next: orch release upload {shown} (see {shown}/README.md)", markup=False)


def _releases_folder(ctx: typer.Context) -> Path:
    """Where `orch release new` puts a release: the workspace's releases/ (spawn and validate
    find sources there), else the current folder; a workspace named but missing is an error."""
    state = ctx.find_root().obj or CliState()
    try:
        return workspace(ctx).releases_src_dir
    except WorkspaceError:
        if state.workspace is not None:
            raise
        return Path.cwd()


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve())) or "."
    except ValueError:
        return str(path)


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


# -- upgrades in place: deploy, rollback, history (orchestrator.fleet.upgrade) --------------------


@app.command("deploy")
def deploy(
    ctx: typer.Context,
    family: Annotated[str, typer.Argument(help="Node family (node_families/FAMILY.yaml).")],
    version: Annotated[str, typer.Argument(help="VERSION of the family's release (or NAME@VERSION).")],
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No live progress, only the summary.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Set a family's release to VERSION (its `release:` line only) and roll its nodes in place."""
    from orchestrator import fleet

    ws = workspace(ctx)
    with open_store(ws) as store, _progress(f"deploy {family} {version}", quiet or as_json) as shown:
        outcome = fleet.deploy(ws, store, family, version, events=shown.events())
    _show_upgrade(outcome, as_json)


@app.command("rollback")
def rollback(
    ctx: typer.Context,
    family: Annotated[str, typer.Argument(help="Node family (node_families/FAMILY.yaml).")],
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No live progress, only the summary.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Roll a family back to the release it ran before its last deploy or roll, the way deploy does."""
    from orchestrator import fleet

    ws = workspace(ctx)
    with open_store(ws) as store, _progress(f"rollback {family}", quiet or as_json) as shown:
        outcome = fleet.rollback(ws, store, family, events=shown.events())
    _show_upgrade(outcome, as_json)


@app.command("history")
def history(
    ctx: typer.Context,
    family: Annotated[str, typer.Argument(help="Node family.")],
    as_json: JsonFlag = False,
) -> None:
    """The releases a family ran, one row per change, and where a rollback would take it."""
    from orchestrator import fleet
    from orchestrator.errors import InputError, NotFoundError

    ws = workspace(ctx)
    with open_store(ws) as store:
        entries = fleet.history(store, family)
        try:
            previous: str | None = fleet.previous_release(ws, store, family)
        except NotFoundError:
            if not entries:  # no such family, and none that was
                raise
            previous = None
        except InputError:
            previous = None
    if as_json:
        print_json({"family": family, "history": entries, "rollback_to": previous})
        return
    rows = [(i + 1, e.release, e.sha256[:16], _when(e.at), e.cause, len(e.nodes)) for i, e in enumerate(entries)]
    print_table(f"releases of {family}", ["#", "release", "sha256", "since", "by", "nodes"], rows,
                empty=f"{family} has no release history yet (a spawn that brings it up records one)")
    if entries:
        console.print(f"rollback goes to {previous}" if previous else "nothing to roll back to", markup=False)


def _progress(title: str, quiet: bool) -> NodeProgress:
    from orchestrator.cli.progress import NodeProgress

    return NodeProgress(title, quiet=quiet)


def _show_upgrade(outcome: fleet.UpgradeReport, as_json: bool) -> None:
    """As `orch spawn` reports (its JSON under "spawn"), after what changed in the file."""
    from orchestrator.cli import fleet as fleet_cli

    if as_json:
        print_json({"family": outcome.family, "release": outcome.release, "was": outcome.was, "file": outcome.file,
                    "changed": outcome.changed, "spawn": fleet_cli.spawn_json(outcome.spawn)})
    else:
        change = f"{outcome.was} -> {outcome.release}" if outcome.changed else f"{outcome.release} (unchanged)"
        console.print(f"{outcome.file}: release {change}", markup=False)
        fleet_cli.print_spawn_summary(outcome.spawn)
    fleet_cli.raise_unless_ok(outcome.spawn)


if TYPE_CHECKING:  # for the annotations above (the commands import what they use when they run)
    from orchestrator import fleet
    from orchestrator.cli.progress import NodeProgress
