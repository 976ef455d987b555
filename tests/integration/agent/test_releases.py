"""Releases on the node (orchestrator/agent/releases.py): a RELEASE installed, built and
loaded in order, a corrupt one refused, and safe unpacking."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from orchestrator.agent import releases as agent_releases
from orchestrator.agent.protocol import LOAD_FAILED, LOADED, release_message
from orchestrator.deploy.packing import pack_release
from orchestrator.workspace import Workspace
from tests.helpers.agent import MakeHome, load, session_of, tasks
from tests.helpers.agent_peer import AgentPeer, Received
from tests.helpers.workspace import REPO


def test_release_is_installed_built_and_loaded(ws: Workspace, peer: AgentPeer, make_home: MakeHome,
                                               tmp_path: Path) -> None:
    source = tmp_path / "primes"
    shutil.copytree(REPO / "releases" / "primes", source, ignore=shutil.ignore_patterns("build", "*.o", "*.so"))
    packed = pack_release(source, max_bytes=64 << 20)
    manifest = packed.manifest
    folder = f"{manifest.name}-{manifest.version}"
    home = make_home(ws, peer.address)
    home.start()
    session = session_of(peer, home)
    assert session.hello["releases"] == []

    def load_primes(work: str) -> Received:
        return load(session, work, "count_primes", [0], release=folder, sha=packed.sha256, library=manifest.library)

    first = load_primes("j1")
    assert first.kind == LOAD_FAILED and first.body["missing"] is True
    corrupt = packed.data[:-1] + bytes([packed.data[-1] ^ 1])
    session.send(release_message({"release": folder, "sha256": packed.sha256, "build": manifest.build}, corrupt))
    bad = session.expect(LOAD_FAILED, where=lambda m: m.body.get("work") == "j1")
    assert bad.body["missing"] is False and "sha256" in bad.body["reason"]
    again = load_primes("j1")  # the scheduler's LOAD behind that RELEASE hears why, not "missing"
    assert again.kind == LOAD_FAILED and again.body == {**bad.body, "work": "j1"}
    session.send(release_message({"release": folder, "sha256": packed.sha256, "build": manifest.build},
                                 packed.data))
    assert load_primes("j2").kind == LOADED  # handled after the install: the agent keeps order
    session.tasks(0, tasks((0, b"0 100"), (1, b"100 1000")))
    assert [r.payload.strip() for r in session.wait_results(0, 2)] == [b"25", b"143"]
    built_folder = home.releases / folder
    assert (built_folder / agent_releases.SHA_FILE).read_text().strip() == packed.sha256
    assert not (home.releases / f"{folder}.new").exists()
    session.close()
    assert session_of(peer, home, 1).hello["releases"] == [{"release": folder, "sha256": packed.sha256}]


def _tarball(members: list[tuple[str, bytes | str | None]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            if isinstance(content, bytes):
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
            elif isinstance(content, str):
                info.type, info.linkname = tarfile.SYMTYPE, content
                tar.addfile(info)
            else:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
    return out.getvalue()


@pytest.mark.parametrize(("members", "error"), [
    ([("r/", None), ("r/ok", b"1"), ("r/../../evil", b"x")], "climbs out"),
    ([("r/", None), ("/abs", b"x")], "absolute"),
    ([("r/", None), ("r/link", "/etc"), ("r/link/passwd", b"x")], "absolute"),
    ([("r/", None), ("r/up", "../../.."), ("r/up/x", b"x")], "outside"),
])
def test_unpacking_refuses_what_could_escape(members: list[tuple[str, bytes | str | None]], error: str,
                                            tmp_path: Path) -> None:
    data = _tarball(members)
    dest = tmp_path / "releases" / "r-1"
    dest.parent.mkdir()
    with pytest.raises(ValueError, match=error):
        agent_releases.unpack_release(data, hashlib.sha256(data).hexdigest(), dest)
    assert list(dest.parent.iterdir()) == [] and not (tmp_path / "evil").exists()


def test_unpacking_strips_the_top_folder(tmp_path: Path) -> None:
    data = _tarball([("top/", None), ("top/a.c", b"int x;"), ("top/sub/", None), ("top/sub/b", b"b"),
                     ("top/link", "sub/b")])
    dest = tmp_path / "r-1"
    agent_releases.unpack_release(data, hashlib.sha256(data).hexdigest(), dest)
    assert (dest / "a.c").read_bytes() == b"int x;" and (dest / "sub" / "b").read_bytes() == b"b"
    assert os.readlink(dest / "link") == "sub/b"
    with pytest.raises(ValueError, match="sha256"):
        agent_releases.unpack_release(data, "0" * 64, dest)
    assert (dest / "a.c").exists()  # a refused tarball leaves the installed release alone
