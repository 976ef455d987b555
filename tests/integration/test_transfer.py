"""``orch push`` and ``orch pull`` on a real fleet: 8 local nodes (sshd on 127.0.0.N, each
with its own home), spawned once for the module and stopped at its end whatever happens.

Each test works under remote paths of its own, so none depends on another's files; what
they copy locally lives under pytest's tmp_path.
"""

from __future__ import annotations

import hashlib
import json
import os
import pty
import select
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from orchestrator import fleet
from orchestrator.config import load_provider
from orchestrator.provision.registry import make_driver
from orchestrator.state import NodeRecord, NodeState, Store
from orchestrator.workspace import Workspace
from tests.helpers.cli import ORCH, Run
from tests.helpers.workspace import primes_workspace, stop_everything

pytestmark = pytest.mark.sshd
NODES = 8
MiB = 2**20


@pytest.fixture(scope="module")
def fleet_ws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    """A workspace with 8 ready local nodes of the family ``workers``; all stopped afterwards."""
    ws = primes_workspace(tmp_path_factory.mktemp("transfer") / "ws", count=NODES, max_nodes=NODES)
    try:
        with Store.open(ws.state_db) as store:
            report = fleet.spawn(ws, store, "workers")
        assert report.ok and len(report.ready) == NODES, [str(f) for f in report.failures]
        yield ws
    finally:
        stop_everything(ws)


@pytest.fixture
def run(fleet_ws: Workspace, orch: Callable[..., Run]) -> Callable[..., Run]:
    """``orch -w WS ARGS`` in-process."""
    return lambda *args: orch("-w", fleet_ws.root, *args)


def ready_nodes(ws: Workspace) -> list[NodeRecord]:
    with Store.open(ws.state_db) as store:
        return store.list_nodes(states=[NodeState.READY])


def tree_digest(root: Path) -> dict[str, tuple[str, str]]:
    """Every file and folder under ``root``: relative path -> (mode in octal, sha256 or 'dir')."""
    found = {".": (oct(stat.S_IMODE(root.stat().st_mode)), "dir")}
    for path in sorted(root.rglob("*")):
        mode = oct(stat.S_IMODE(path.stat().st_mode))
        digest = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
        found[str(path.relative_to(root))] = (mode, digest)
    return found


# On a node: the same listing as tree_digest, by find, stat and sha256sum.
REMOTE_DIGEST = ("cd {path} && find . -mindepth 1 -printf '%P\\n' | sort | while read -r p; do "
                 "if [ -d \"$p\" ]; then echo \"$p 0o$(stat -c %a \"$p\") dir\"; "
                 "else echo \"$p 0o$(stat -c %a \"$p\") $(sha256sum < \"$p\" | cut -d' ' -f1)\"; fi; done; "
                 "echo \". 0o$(stat -c %a .) dir\"")


def remote_digests(run: Callable[..., Run], path: str) -> dict[str, dict[str, tuple[str, str]]]:
    done = run("exec", "workers", "--json", "--", REMOTE_DIGEST.format(path=path))
    assert done.code == 0, done.err
    digests = {}
    for node, answer in json.loads(done.out).items():
        assert answer["exit"] == 0, (node, answer)
        lines = [line.rsplit(" ", 2) for line in answer["stdout"].splitlines()]
        digests[node] = {p: (oct(int(m[2:], 8)), d) for p, m, d in lines}
    return digests


def make_folder(root: Path) -> Path:
    """A 100 MiB folder: big and small files, nested folders, an executable, an empty file,
    a read-only file and a folder of mode 0750."""
    data = root / "payload"
    (data / "nested" / "deeper").mkdir(parents=True)
    (data / "private").mkdir()
    (data / "big.bin").write_bytes(os.urandom(60 * MiB))
    (data / "nested" / "middle.bin").write_bytes(os.urandom(25 * MiB))
    (data / "nested" / "deeper" / "small.bin").write_bytes(os.urandom(15 * MiB - 4096))
    (data / "nested" / "deeper" / "notes.txt").write_text("hello\n" * 600)
    (data / "private" / "empty").write_bytes(b"")
    tool = data / "nested" / "tool.sh"
    tool.write_text("#!/bin/sh\necho tool-ran\n")
    tool.chmod(0o755)
    (data / "readonly.cfg").write_text("x = 1\n")
    (data / "readonly.cfg").chmod(0o444)
    (data / "private").chmod(0o750)
    return data


def test_a_100_mib_folder_to_8_nodes_and_back(fleet_ws: Workspace, run: Callable[..., Run], tmp_path: Path) -> None:
    data = make_folder(tmp_path)
    expected = tree_digest(data)
    assert sum(p.stat().st_size for p in data.rglob("*") if p.is_file()) >= 100 * MiB - 4096
    nodes = ready_nodes(fleet_ws)
    assert len(nodes) == NODES

    started = time.monotonic()
    pushed = run("push", "workers", data, "deploy/")
    push_s = time.monotonic() - started
    assert pushed.code == 0, pushed.err
    assert pushed.out.count(" ok ") == NODES, pushed.out
    assert "to 8 node(s)" not in pushed.out + pushed.err, "a progress bar outside a terminal"
    on_nodes = remote_digests(run, "deploy/payload")
    assert set(on_nodes) == {n.id for n in nodes}
    for node, digest in on_nodes.items():
        assert digest == expected, f"{node} differs from the local folder"
    ran = run("exec", "workers", "--json", "--", "deploy/payload/nested/tool.sh")
    assert {a["stdout"] for a in json.loads(ran.out).values()} == {"tool-ran\n"}
    leftovers = run("exec", "workers", "--json", "--", "find deploy -name '.*orch-*'")
    assert {a["stdout"] for a in json.loads(leftovers.out).values()} == {""}, "hidden names left behind"

    back = tmp_path / "back"
    started = time.monotonic()
    pulled = run("pull", "workers", "deploy/payload", back)
    pull_s = time.monotonic() - started
    assert pulled.code == 0, pulled.err
    assert sorted(p.name for p in back.iterdir()) == sorted(n.id for n in nodes)
    for node in nodes:
        assert tree_digest(back / node.id / "payload") == expected, f"the copy pulled from {node.id} differs"
    assert not list(back.rglob(".*orch-*"))
    print(f"push {NODES} x 100 MiB: {push_s:.1f} s; pull: {pull_s:.1f} s")


def test_a_single_file_keeps_its_mode_and_replaces_the_old_one(fleet_ws: Workspace, run: Callable[..., Run],
                                                                   tmp_path: Path) -> None:
    conf = tmp_path / "app.conf"
    conf.write_text("version = 1\n")
    conf.chmod(0o640)
    node = ready_nodes(fleet_ws)[0].id

    first = run("push", node, conf, "single/etc/app.conf")  # missing parents are made
    assert first.code == 0, first.err
    conf.write_text("version = 2\n")
    again = run("push", node, conf, "single/etc/app.conf")
    assert again.code == 0, again.err
    into = run("push", node, conf, "single/")  # an existing folder: the file goes into it
    assert into.code == 0, into.err
    shown = run("exec", node, "--", "stat -c '%a %n' single/etc/app.conf single/app.conf && cat single/etc/app.conf "
                "&& ls -A single/etc")
    assert shown.code == 0, shown.err
    assert shown.out.splitlines()[1:] == ["640 single/etc/app.conf", "640 single/app.conf", "version = 2",
                                          "app.conf"], shown.out

    pulled = run("pull", node, "~/single/etc/app.conf", tmp_path / "got")
    assert pulled.code == 0, pulled.err
    got = tmp_path / "got" / node / "app.conf"
    assert got.read_text() == "version = 2\n" and stat.S_IMODE(got.stat().st_mode) == 0o640
    conf.write_text("version = 3\n")
    assert run("push", node, conf, "single/etc/app.conf").code == 0
    assert run("pull", node, "single/etc/app.conf", tmp_path / "got").code == 0  # replaces the last copy
    assert got.read_text() == "version = 3\n" and os.listdir(got.parent) == ["app.conf"]


def test_pull_of_a_path_missing_on_one_node_fails_that_node_only(fleet_ws: Workspace, run: Callable[..., Run],
                                                                 tmp_path: Path) -> None:
    nodes = [n.id for n in ready_nodes(fleet_ws)]
    missing = nodes[3]
    assert run("exec", "workers", "--", "mkdir -p partial && echo node-data > partial/file").code == 0
    assert run("exec", missing, "--", "rm -r partial").code == 0

    pulled = run("pull", "workers", "partial", tmp_path / "out")
    assert pulled.code == 5, pulled.out + pulled.err  # as `orch exec`: a node failed
    assert f"1 of {NODES} node(s) failed: {missing}" in pulled.err
    assert f"{missing}: node {missing}: REMOTE partial does not exist" in pulled.err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(set(nodes) - {missing})
    for node in set(nodes) - {missing}:
        assert (tmp_path / "out" / node / "partial" / "file").read_text() == "node-data\n"

    alone = run("pull", missing, "partial", tmp_path / "alone")
    assert alone.code == 5 and alone.err.count("\n") == 1 and "REMOTE partial does not exist" in alone.err


def test_json_gives_each_node_its_result(fleet_ws: Workspace, run: Callable[..., Run], tmp_path: Path) -> None:
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "a").write_bytes(b"abc")
    (tmp_path / "tiny" / "sub").mkdir()
    (tmp_path / "tiny" / "sub" / "b").write_bytes(b"defg")
    pushed = run("push", "workers", tmp_path / "tiny", "jsoncase", "--json")
    assert pushed.code == 0, pushed.err
    results = json.loads(pushed.out)
    assert set(results) == {n.id for n in ready_nodes(fleet_ws)}
    for result in results.values():
        assert set(result) == {"ok", "source", "destination", "files", "folders", "bytes", "seconds", "error"}
        assert result["ok"] is True and result["error"] is None
        assert (result["files"], result["folders"], result["bytes"]) == (2, 2, 7)
        assert result["destination"] == "jsoncase" and result["source"] == str(tmp_path / "tiny")
        assert isinstance(result["seconds"], float)

    pulled = run("pull", "workers", "jsoncase/nope", tmp_path / "j", "--json")
    assert pulled.code == 5
    failed = json.loads(pulled.out)
    assert {r["ok"] for r in failed.values()} == {False}
    assert all("does not exist" in r["error"] and r["files"] == 0 for r in failed.values())


def test_bad_input_is_one_line_exit_2_and_writes_nothing(fleet_ws: Workspace, run: Callable[..., Run],
                                                         tmp_path: Path) -> None:
    node = ready_nodes(fleet_ws)[0].id
    missing = run("push", "workers", tmp_path / "no-such", "x")
    assert missing.code == 2 and missing.err.count("\n") == 1 and "does not exist" in missing.err

    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "f").write_text("f\n")
    assert run("exec", node, "--", "mkdir -p bad && echo x > bad/afile").code == 0
    into_file = run("push", "workers", tmp_path / "dir", "bad/afile")
    assert into_file.code == 2 and into_file.err.count("\n") == 1, into_file.err
    assert f"node {node}: REMOTE bad/afile is a file; a folder is needed" in into_file.err
    under_file = run("push", node, tmp_path / "dir" / "f", "bad/afile/deeper/f")
    assert under_file.code == 2 and "bad/afile is a file; a folder is needed there" in under_file.err
    listed = run("exec", "workers", "--json", "--", "ls -A bad 2>/dev/null; ls -A ~ | grep -c orch- || true")
    outputs = {name: a["stdout"] for name, a in json.loads(listed.out).items()}
    assert outputs.pop(node) == "afile\n0\n"
    assert set(outputs.values()) == {"0\n"}, "the command wrote on other nodes"

    local_file = tmp_path / "plain"
    local_file.write_text("")
    not_a_dir = run("pull", "workers", "bad", local_file)
    assert not_a_dir.code == 2 and "is a file; a folder is needed" in not_a_dir.err
    too_few = run("push", "workers", tmp_path / "dir")
    assert too_few.code == 2 and "at least one target and two paths" in too_few.err
    no_node = run("push", "nosuchfamily", tmp_path / "dir", "x")
    assert no_node.code == 2 and no_node.err.count("\n") == 1


def test_a_terminal_gets_a_progress_bar(fleet_ws: Workspace, tmp_path: Path) -> None:
    blob = tmp_path / "blob.bin"
    blob.write_bytes(os.urandom(8 * MiB))
    leader, follower = pty.openpty()
    env = {**os.environ, "COLUMNS": "120", "TERM": "xterm"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen([*ORCH, "-w", str(fleet_ws.root), "push", "workers", str(blob), "tty/"],
                            stdout=follower, stderr=follower, stdin=subprocess.DEVNULL, env=env)
    os.close(follower)
    output = b""
    try:
        while True:
            ready, _, _ = select.select([leader], [], [], 60)
            if not ready:
                break
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(leader)
        proc.wait(timeout=60)
    text = output.decode(errors="replace")
    assert proc.returncode == 0, text
    assert f"push blob.bin to {NODES} node(s)" in text, text  # the bar's title
    assert f"{8 * NODES}.0/{8 * NODES}.0 MiB" in text, text  # its bytes, across the nodes


def node_home(ws: Workspace, node: NodeRecord) -> Path:
    """Where a local node's home is on this machine (the local driver keeps it in its folder)."""
    driver = make_driver(ws, load_provider(ws, "local"))
    found = next(n for n in driver.list_nodes() if n.id == node.provider_node_id)
    return Path(found.extra["node_dir"]) / "home"


def test_an_unreachable_node_fails_alone(fleet_ws: Workspace, run: Callable[..., Run], tmp_path: Path) -> None:
    nodes = ready_nodes(fleet_ws)
    victim = nodes[-1]
    driver = make_driver(fleet_ws, load_provider(fleet_ws, "local"))
    machine = next(n for n in driver.list_nodes() if n.id == victim.provider_node_id)
    (tmp_path / "f").write_text("f\n")
    driver.stop_node(machine)
    try:
        pushed = run("push", "workers", tmp_path / "f", "unreachable/", "--json")
    finally:
        driver.start_node(machine)
    assert pushed.code == 5, pushed.err
    results = json.loads(pushed.out)
    assert not results[victim.id]["ok"] and "cannot reach" in results[victim.id]["error"]
    assert all(results[n.id]["ok"] for n in nodes[:-1])
    assert f"1 of {NODES} node(s) failed: {victim.id}" in pushed.err
    assert not (node_home(fleet_ws, victim) / "unreachable").exists()
    assert all((node_home(fleet_ws, n) / "unreachable" / "f").read_text() == "f\n" for n in nodes[:-1])


def test_ctrl_c_stops_every_node_and_leaves_no_hidden_file(fleet_ws: Workspace, tmp_path: Path) -> None:
    blob = tmp_path / "blob.bin"
    blob.write_bytes(os.urandom(100 * MiB))
    homes = [node_home(fleet_ws, n) for n in ready_nodes(fleet_ws)]
    proc = subprocess.Popen([*ORCH, "-w", str(fleet_ws.root), "push", "workers", str(blob), "interrupted/"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not any(next(h.glob("interrupted/.blob.bin.orch-*"), None) for h in homes):  # under way
            assert proc.poll() is None and time.monotonic() < deadline, "the push ended before it was interrupted"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        _, err = proc.communicate(timeout=20)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert took < 3, f"{took:.1f} s from Ctrl-C to exit: the nodes did not stop at their next MiB"
    assert [p for h in homes for p in h.glob("interrupted/*")] + [p for h in homes for p in h.glob("interrupted/.*")] \
        == [], "a copy or a hidden name was left"
