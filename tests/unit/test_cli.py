"""The command line as a user meets it: help, workspaces, providers, releases."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import typer

from orchestrator.agent.platforms import host_platform
from orchestrator.cli.app import app
from orchestrator.workspace import Workspace
from tests.helpers.cli import Run
from tests.helpers.workspace import REPO

Orch = Callable[..., Run]


def _commands(group: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    yield path, group
    if hasattr(group, "commands"):
        for name, sub in group.commands.items():
            yield from _commands(sub, (*path, name))


ALL_COMMANDS = list(_commands(typer.main.get_command(app)))


@pytest.mark.parametrize("path", [p for p, _ in ALL_COMMANDS], ids=lambda p: " ".join(p) or "orch")
def test_every_command_has_help_text(path: tuple[str, ...], orch: Orch) -> None:
    command = dict(ALL_COMMANDS)[path]
    assert (command.help or "").strip(), f"`orch {' '.join(path)}` has no help text"
    for param in command.params:
        if param.param_type_name == "option" and param.name not in ("help",):
            assert (param.help or "").strip(), f"option {param.opts} of `orch {' '.join(path)}` has no help"
    result = orch(*path, "--help")
    assert result.code == 0 and "Usage" in result.out


def test_list_and_show_commands_all_take_json() -> None:
    for path, command in ALL_COMMANDS:
        if path and path[-1] in ("list", "show", "check"):
            assert any("--json" in getattr(p, "opts", ()) for p in command.params), path


def test_init_makes_a_workspace_with_a_private_fleet_key(tmp_path: Path, orch: Orch) -> None:
    result = orch("init", tmp_path / "w")
    assert result.code == 0, result.err
    root = tmp_path / "w"
    for name in ("providers", "node_families", "releases", ".orch", "orch.yaml"):
        assert (root / name).exists()
    key = root / ".orch" / "ssh" / "id_ed25519"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert key.with_suffix(".pub").read_text().startswith("ssh-ed25519 ")
    assert ".orch/" in (root / ".gitignore").read_text()
    before = key.read_bytes()
    assert orch("init", root).code == 0
    assert key.read_bytes() == before, "init must keep an existing key"


def test_workspace_is_found_walking_up_or_given(ws: Workspace, tmp_path: Path, orch: Orch,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    deep = ws.families_dir / "a" / "b"
    deep.mkdir(parents=True)
    assert orch("validate", cwd=deep).code == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    missing = orch("validate", cwd=elsewhere)
    assert missing.code == 2 and "no orch workspace" in missing.err and "orch init" in missing.err
    assert orch("--workspace", ws.root, "validate", cwd=elsewhere).code == 0
    monkeypatch.setenv("ORCH_WORKSPACE", str(ws.root))
    assert orch("validate", cwd=elsewhere).code == 0


def test_the_repository_is_a_valid_workspace(orch: Orch) -> None:
    result = orch("--workspace", REPO, "validate", "--json")
    assert result.code == 0, result.err
    summary = json.loads(result.out)
    assert "local" in summary["providers"] and "workers" in summary["families"]
    assert "primes" in summary["releases"]


def test_validate_reports_every_problem_one_line_each(ws: Workspace, orch: Orch) -> None:
    (ws.families_dir / "a.yaml").write_text("release: primes\ncount: -1\n")
    (ws.families_dir / "b.yaml").write_text("release: nothere\ncount: 1\n")
    result = orch("validate", cwd=ws.root)
    assert result.code == 2
    lines = result.err.strip().splitlines()
    assert lines[0].startswith("error: node_families/a.yaml:2: count:")
    assert lines[1].startswith("error: node_families/b.yaml:1: release: unknown release 'nothere'")
    assert lines[-1] == "error: 2 problems in the workspace"


def test_schema_prints_json_schema(orch: Orch) -> None:
    result = orch("schema", "family")
    assert result.code == 0
    assert "demands" in json.loads(result.out)["properties"]


# -- providers -----------------------------------------------------------------------------


def test_provider_add_list_show_remove(ws: Workspace, orch: Orch) -> None:
    result = orch("provider", "add", "aws", "--driver", "ec2", "--option", "region=eu-west-1",
                  "--option", "port=5000", "--label", "public", "--priority", "50", "--max-nodes", "8",
                  "--credential", "key=env:ORCH_TEST_KEY", "--credential", "secret=file:secrets/aws", cwd=ws.root)
    assert result.code == 0, result.err
    text = (ws.providers_dir / "aws.yaml").read_text()
    assert "driver: ec2" in text and "port: 5000" in text and "env:ORCH_TEST_KEY" in text
    listed = json.loads(orch("provider", "list", "--json").out)
    assert [p["name"] for p in listed] == ["aws"]
    shown = json.loads(orch("provider", "show", "aws", "--json").out)
    assert shown["credentials"] == {"key": "env:ORCH_TEST_KEY", "secret": "file:secrets/aws"}
    assert shown["options"] == {"region": "eu-west-1", "port": 5000}
    again = orch("provider", "add", "aws", "--driver", "ec2")
    assert again.code == 2 and "already exists" in again.err and "--replace" in again.err
    assert orch("provider", "remove", "aws").code == 0
    assert not (ws.providers_dir / "aws.yaml").exists()
    assert json.loads(orch("provider", "list", "--json").out) == []


def test_provider_add_takes_the_image_login_user_prices_and_no_bootstrap(ws: Workspace, orch: Orch) -> None:
    """A cloud's whole registration is `orch provider add` flags: nothing to edit by hand."""
    result = orch("provider", "add", "gcp", "--driver", "gce", "--option", "project=p", "--image", "debian-12",
                  "--ssh-user", "orch", "--price", "e2-micro=0.0084", "--price", "e2-small=0.0168",
                  "--no-bootstrap", cwd=ws.root)
    assert result.code == 0, result.err
    shown = json.loads(orch("provider", "show", "gcp", "--json").out)
    assert (shown["image"], shown["ssh_user"], shown["prices"], shown["bootstrap"]) == (
        "debian-12", "orch", {"e2-micro": 0.0084, "e2-small": 0.0168}, False)
    plain = orch("provider", "add", "plain", "--driver", "gce", "--option", "project=p")
    assert plain.code == 0, plain.err
    shown = json.loads(orch("provider", "show", "plain", "--json").out)
    assert (shown["image"], shown["ssh_user"], shown["prices"], shown["bootstrap"]) == (None, "root", {}, True)


def test_provider_check_never_prints_secret_values(ws: Workspace, orch: Orch, monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("s3cr3t-file-value\n")
    os.chmod(secret_file, 0o600)
    monkeypatch.setenv("ORCH_TEST_KEY", "s3cr3t-env-value")
    orch("provider", "add", "dummy", "--driver", "dummy", "--credential", "key=env:ORCH_TEST_KEY", cwd=ws.root)
    result = orch("provider", "check", "dummy")
    assert result.code == 0, result.err
    assert "s3cr3t" not in result.out + result.err
    every_byte = b"".join(p.read_bytes() for p in ws.root.rglob("*") if p.is_file() and p.suffix != ".so")
    assert b"s3cr3t" not in every_byte


# -- releases ------------------------------------------------------------------------------


def test_release_upload_is_idempotent_and_guards_versions(ws: Workspace, orch: Orch) -> None:
    src = ws.releases_src_dir / "primes"
    first = json.loads(orch("release", "upload", src, "--json", cwd=ws.root).out)
    assert first["changed"] and first["release"] == "primes@1.1.0"
    again = json.loads(orch("release", "upload", src, "--json").out)
    assert again == {**first, "changed": False}
    build = first["build"]  # built once for this machine's platform, as it was uploaded
    assert build["platform"] == host_platform() and build["source_sha256"] == first["sha256"]
    assert {p.name for p in ws.release_store.glob("*.tar.gz")} == {f"{first['sha256']}.tar.gz",
                                                                   f"{build['sha256']}.tar.gz"}

    (src / "primes.c").write_text((src / "primes.c").read_text() + "\n/* changed */\n")
    refused = orch("release", "upload", src)
    assert refused.code == 2 and "other content" in refused.err and "--force" in refused.err
    forced = json.loads(orch("release", "upload", src, "--force", "--json").out)
    assert forced["changed"] and forced["sha256"] != first["sha256"]
    assert not (ws.release_store / f"{first['sha256']}.tar.gz").exists(), "the replaced tarball is unused"
    assert not (ws.release_store / f"{build['sha256']}.tar.gz").exists(), "so is the build of the old source"
    listed = json.loads(orch("release", "list", "--json").out)
    assert [(r["release"], r["platforms"]) for r in listed] == [("primes@1.1.0", [host_platform()])]
    shown = json.loads(orch("release", "show", "primes", "--json").out)
    assert shown["sha256"] == forced["sha256"]
    assert [b["source_sha256"] for b in shown["builds"]] == [forced["sha256"]]
    assert [f["name"] for f in shown["manifest"]["functions"]] == ["count_primes", "iterated_hash", "list_primes"]
    assert orch("release", "remove", "primes@1.1.0").code == 0
    assert json.loads(orch("release", "list", "--json").out) == []
    assert list(ws.release_store.glob("*.tar.gz")) == [], "the source and its build went with the release"


def test_a_corrupted_stored_release_is_detected_on_read(ws: Workspace, orch: Orch) -> None:
    up = json.loads(orch("release", "upload", ws.releases_src_dir / "primes", "--json", cwd=ws.root).out)
    blob = ws.release_store / f"{up['sha256']}.tar.gz"
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    result = orch("release", "show", "primes")
    assert result.code == 4
    assert "checksum mismatch" in result.err and "--force" in result.err
    repaired = orch("release", "upload", ws.releases_src_dir / "primes", "--force")
    assert repaired.code == 0
    assert orch("release", "show", "primes").code == 0
