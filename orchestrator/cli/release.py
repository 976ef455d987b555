"""``orch release``: upload, list, show and remove releases."""

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

if TYPE_CHECKING:
    from orchestrator.deploy import releases as catalog
else:
    catalog = lazy("orchestrator.deploy.releases")

app = typer.Typer(help="Upload and manage releases (versioned, checksummed bundles).", no_args_is_help=True)


@app.command("upload")
def upload(
    ctx: typer.Context,
    source: Annotated[Path, typer.Argument(help="Release folder (with release.yaml) or tarball.")],
    force: Annotated[bool, typer.Option(help="Replace name@version even when its content differs.")] = False,
    max_bytes: Annotated[
        int | None, typer.Option("--max-bytes", min=1, help="Largest tarball accepted (default: orch.yaml).")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Validate, pack (deterministically) and register a release."""
    ws = workspace(ctx)
    with open_store(ws) as store:
        outcome = catalog.upload_release(ws, store, source, force=force, max_bytes=max_bytes)
    record = outcome.record
    if as_json:
        print_json({"release": record.ref, "sha256": record.sha256, "size": record.size, "changed": outcome.changed})
        return
    verb = "uploaded" if outcome.changed else "unchanged (same content already uploaded)"
    console.print(f"release {record.ref} {verb}: sha256 {record.sha256}, {record.size} bytes")


@app.command("list")
def list_(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """List uploaded releases."""
    with open_store(workspace(ctx)) as store:
        records = store.list_releases()
    if as_json:
        print_json([{"release": r.ref, "name": r.name, "version": r.version, "sha256": r.sha256,
                     "size": r.size, "uploaded_at": r.uploaded_at} for r in records])
        return
    rows = [(r.name, r.version, r.sha256[:16], r.size, _when(r.uploaded_at)) for r in records]
    print_table("releases", ["name", "version", "sha256", "bytes", "uploaded"], rows,
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
    manifest = catalog.manifest_of(record)
    if as_json:
        print_json({"release": record.ref, "sha256": record.sha256, "size": record.size,
                    "manifest": record.manifest, "nodes": users})
        return
    print_fields(f"release {record.ref}", [
        ("sha256", record.sha256),
        ("bytes", record.size),
        ("uploaded", _when(record.uploaded_at)),
        ("library", manifest.library),
        ("functions", ", ".join(f"{f.name} ({f.work_module})" for f in manifest.functions)),
        ("build", " && ".join(manifest.build)),
        ("setup", " && ".join(manifest.setup) or "-"),
        ("nodes", ", ".join(users) or "-"),
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
