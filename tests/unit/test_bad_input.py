"""Bad input, end to end through the command line.

Every case must: exit with code 2, print one line naming the file and line or the
field, print no traceback, and leave .orch/state.db byte-identical.  Files with several
problems list every one, a line each, then a summary line.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestrator.workspace import Workspace
from tests.helpers.cli import Run
from tests.helpers.workspace import file_digest

MANIFEST = b"name: evil\nversion: 1.0.0\nlibrary: build/lib.so\nfunctions:\n  - name: f\n"


def _tarball(path: Path, *members: tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("evil/release.yaml")
        info.size = len(MANIFEST)
        tar.addfile(info, io.BytesIO(MANIFEST))
        for member in members:
            if isinstance(member, tuple):
                member[0].size = len(member[1])
                tar.addfile(member[0], io.BytesIO(member[1]))
            else:
                tar.addfile(member)
    return path


def _info(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


@dataclass
class Case:
    """``setup`` prepares files in the workspace and returns the command's arguments."""

    setup: Callable[[Workspace, Path], list[str]]
    expect: str  # regex the one-line message must match


def _family(text: str) -> Callable[[Workspace, Path], list[str]]:
    def setup(ws: Workspace, tmp: Path) -> list[str]:
        (ws.families_dir / "bad.yaml").write_text(text)
        return ["validate"]
    return setup


def _provider_file(text: str) -> Callable[[Workspace, Path], list[str]]:
    def setup(ws: Workspace, tmp: Path) -> list[str]:
        (ws.providers_dir / "bad.yaml").write_text(text)
        return ["validate"]
    return setup


def _upload(*members: tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]) -> Callable[[Workspace, Path], list[str]]:
    def setup(ws: Workspace, tmp: Path) -> list[str]:
        return ["release", "upload", str(_tarball(tmp / "evil.tar.gz", *members))]
    return setup


def _release_dir(manifest: str | None, extra: Callable[[Path], None] | None = None
                 ) -> Callable[[Workspace, Path], list[str]]:
    def setup(ws: Workspace, tmp: Path) -> list[str]:
        folder = tmp / "rel"
        folder.mkdir()
        if manifest is not None:
            (folder / "release.yaml").write_text(manifest)
        if extra:
            extra(folder)
        return ["release", "upload", str(folder)]
    return setup


def _args(*args: str) -> Callable[[Workspace, Path], list[str]]:
    return lambda ws, tmp: list(args)


def _check_with(cred: str, prepare: Callable[[Path], None] | None = None) -> Callable[[Workspace, Path], list[str]]:
    def setup(ws: Workspace, tmp: Path) -> list[str]:
        if prepare:
            prepare(tmp)
        (ws.providers_dir / "dummy.yaml").write_text(f"driver: dummy\ncredentials:\n  key: {cred.format(tmp=tmp)}\n")
        return ["provider", "check", "dummy"]
    return setup


def _secret_file(mode: int) -> Callable[[Path], None]:
    def prepare(tmp: Path) -> None:
        (tmp / "secret").write_text("value")
        os.chmod(tmp / "secret", mode)
    return prepare


GOOD_MANIFEST = "name: r\nversion: '1'\nlibrary: lib.so\nfunctions:\n  - name: f\n"

CASES: dict[str, Case] = {
    "yaml syntax error": Case(_family("release: primes\ncount: [1\n"),
                              r"^error: node_families/bad\.yaml:3: YAML syntax"),
    "count of the wrong type": Case(_family("release: primes\ncount: many\n"), r"bad\.yaml:2: count: .*integer"),
    "negative count": Case(_family("release: primes\ncount: -2\n"), r"bad\.yaml:2: count: .*greater than or equal"),
    "unknown key": Case(_family("release: primes\ncount: 1\nnodes: 3\n"), r"bad\.yaml:3: nodes: unknown key"),
    "unknown nested key": Case(_family("release: primes\ncount: 1\nbootstrap:\n  mode: fast\n"),
                               r"bad\.yaml:4: bootstrap\.mode: unknown key"),
    "unknown provider in placement": Case(
        _family("release: primes\ncount: 1\nplacement:\n  providers: [nowhere]\n"),
        r"bad\.yaml:4: placement\.providers\.0: unknown provider 'nowhere'"),
    "dependency cycle": Case(_family("release: primes\ncount: 1\nbootstrap:\n  depends_on: [bad]\n"),
                             r"bad\.yaml:4: bootstrap\.depends_on\.0: a family cannot refer to itself"),
    "unknown driver": Case(_provider_file("driver: amazon\n"), r"providers/bad\.yaml:1: driver: unknown driver"),
    "literal secret in yaml": Case(_provider_file("driver: ec2\ncredentials:\n  secret: hunter2hunter2\n"),
                                   r"providers/bad\.yaml:3: credentials\.secret: .*literal secrets are refused"),
    "cli unknown driver": Case(_args("provider", "add", "p", "--driver", "amazon"), r"--driver .*unknown driver"),
    "cli literal credential": Case(_args("provider", "add", "p", "--driver", "ec2", "--credential", "secret=hunter2"),
                                   r"--credential.*literal secrets are refused"),
    "cli secret as option": Case(_args("provider", "add", "p", "--driver", "ec2", "--option", "password=x"),
                                 r"--option.*looks like a secret"),
    "cli option without value": Case(_args("provider", "add", "p", "--driver", "ec2", "--option", "region"),
                                     r"--option: 'region' is not KEY=VALUE"),
    "cli negative quota": Case(_args("provider", "add", "p", "--driver", "local", "--max-nodes", "-1"),
                               r"--max-nodes.*greater than or equal to 0"),
    "cli price not a number": Case(_args("provider", "add", "p", "--driver", "local", "--price", "local-1=cheap"),
                                   r"--price \(prices\.local-1\).*valid number"),
    "cli login user not a user name": Case(_args("provider", "add", "p", "--driver", "local", "--ssh-user", "a b"),
                                           r"--ssh-user \(ssh_user\)"),
    "an event id past SQLite's integers": Case(_args("events", "--after", "9" * 40), r"--after.*less than or equal"),
    "cli bad provider name": Case(_args("provider", "add", "Big Cloud", "--driver", "local"),
                                  r"NAME.*should match pattern"),
    "check: env var not set": Case(_check_with("env:ORCH_TEST_SURELY_UNSET"),
                                   r"credentials\.key: environment variable ORCH_TEST_SURELY_UNSET is not set"),
    "check: credential file readable by others": Case(_check_with("file:{tmp}/secret", _secret_file(0o644)),
                                                     r"credentials\.key: .*readable by others.*chmod 600"),
    "check: credential file missing": Case(_check_with("file:{tmp}/nothere"),
                                           r"credentials\.key: file .*nothere does not exist"),
    "upload: no manifest": Case(_release_dir(None), r"release\.yaml"),
    "upload: invalid manifest": Case(_release_dir("name: r\nversion: '1'\nlibrary: lib.so\n"),
                                     r"release\.yaml:1: functions: required key is missing"),
    "upload: manifest syntax error": Case(_release_dir("name: [r\n"), r"release\.yaml:2: YAML syntax error"),
    "upload: source does not exist": Case(_args("release", "upload", "/nonexistent/release"), r"/nonexistent/release"),
    "upload: fifo in folder": Case(_release_dir(GOOD_MANIFEST, lambda d: os.mkfifo(d / "pipe")), r"pipe"),
    "upload: symlink out of folder": Case(_release_dir(GOOD_MANIFEST, lambda d: (d / "l").symlink_to("/etc/passwd")),
                                          r"\bl\b"),
    "tar: absolute path": Case(_upload((_info("/etc/evil"), b"x")), r"/etc/evil"),
    "tar: dot-dot segment": Case(_upload((_info("evil/../../escape"), b"x")), r"\.\./\.\./escape|\.\."),
    "tar: absolute symlink": Case(_upload(_info("evil/link", tarfile.SYMTYPE, "/etc/shadow")), r"link"),
    "tar: relative symlink escaping": Case(_upload(_info("evil/link", tarfile.SYMTYPE, "../../etc/shadow")), r"link"),
    "tar: hardlink outside": Case(_upload(_info("evil/hard", tarfile.LNKTYPE, "/etc/shadow")), r"hard"),
    "tar: char device": Case(_upload(_info("evil/null", tarfile.CHRTYPE)), r"null"),
    "tar: block device": Case(_upload(_info("evil/disk", tarfile.BLKTYPE)), r"disk"),
    "tar: fifo": Case(_upload(_info("evil/fifo", tarfile.FIFOTYPE)), r"fifo"),
    "tar: over the size limit": Case(
        lambda ws, tmp: ["release", "upload", "--max-bytes", "200",
                         str(_tarball(tmp / "big.tar.gz", (_info("evil/blob"), os.urandom(4096))))],
        r"(?i)limit|max"),
    "tar: corrupt bytes": Case(
        lambda ws, tmp: ["release", "upload", str(_write(tmp / "junk.tar.gz", b"\x1f\x8b" + os.urandom(300)))],
        r"junk\.tar\.gz"),
    "unknown release": Case(_args("release", "show", "nothere@9"), r"no release nothere@9"),
    "unknown provider": Case(_args("provider", "show", "nothere"), r"no provider 'nothere'"),
    "provider name that is a path": Case(_args("provider", "show", "../../etc/passwd"),
                                         r"'\.\./\.\./etc/passwd' is not a provider name"),
    "family name that is a path": Case(_args("family", "show", "../orch"), r"'\.\./orch' is not a node family name"),
    "a newline in a release name": Case(_args("job", "run", "\n:0", "--input", "0:10", "--detach"),
                                        r"no release \\n is uploaded"),
    "a terminal escape in a name": Case(_args("release", "show", "x\x1b[2J@1"), r"x\\x1b\[2J"),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_there_are_at_least_25_cases() -> None:
    assert len(CASES) >= 25


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_cleanly(name: str, ws: Workspace, tmp_path: Path, orch: Callable[..., Run]) -> None:
    assert orch("release", "upload", ws.releases_src_dir / "primes", cwd=ws.root).code == 0  # real state to protect
    case = CASES[name]
    args = case.setup(ws, tmp_path)
    before = file_digest(ws.state_db)
    result = orch(*args, cwd=ws.root)
    assert result.code == 2, f"{name}: exit {result.code}: {result.err}"
    assert "Traceback" not in result.err + result.out
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1, result.err  # one problem, one line (several get a summary line too)
    assert re.search(case.expect, lines[0]), f"{lines[0]!r} does not match {case.expect!r}"
    assert file_digest(ws.state_db) == before, "bad input changed the state store"
