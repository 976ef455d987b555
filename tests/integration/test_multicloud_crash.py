"""SIGKILL ``orch spawn`` across two providers: nodes on this machine and EC2 (moto).

A private ``local`` provider (3 nodes at most, priority 10) and an EC2 account
(priority 20) host a family of 6, placed in that order.  ``orch spawn`` runs as a
subprocess and is killed at seeded random points spread over a spawn's measured
duration; afterwards ``orch reconcile --apply`` must leave every provider's running,
tagged nodes equal to the store's live nodes, with no instance orphaned, and a final
``orch spawn`` must reach 6 ready.

Both providers run with ``bootstrap: false`` (provisioning is what is killed here; a
bootstrap of the sample release on every node would only make each spawn longer), with
the workspace's own ed25519 fleet key.  The local nodes are real sshd processes all the
same; every one is stopped at the end, and the moto server is killed by its pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from libcloud.compute.base import Node
from libcloud.compute.types import NodeState as CloudState

from orchestrator import fleet
from orchestrator.config import load_provider
from orchestrator.provision.registry import make_driver
from orchestrator.provision.tags import node_tags
from orchestrator.state import NodeState, Store
from orchestrator.workspace import Workspace
from tests.helpers.moto_ec2 import MotoServer, ec2_provider_yaml

pytestmark = [pytest.mark.slow, pytest.mark.sshd]

REPO = Path(__file__).resolve().parents[2]
ORCH = [sys.executable, "-m", "orchestrator"]
COUNT = 6
# More kills, or other points, for a soak run: ORCH_TEST_KILLS=50 ORCH_TEST_SEED=3 pytest ...
KILLS = int(os.environ.get("ORCH_TEST_KILLS", "10"))
SEED = int(os.environ.get("ORCH_TEST_SEED", "0"))
LOCAL_PROVIDER = "driver: local\nlabels: [private]\npriority: 10\nmax_nodes: 3\nbootstrap: false\n"
FAMILY = f"release: primes\ncount: {COUNT}\nplacement:\n  policy: ordered\n  providers: [local, aws]\n"
Instances = Callable[..., list[dict[str, Any]]]


class Workspaces:
    """Makes workspaces on the shared moto server and stops their local nodes at the end."""

    def __init__(self, root: Path, moto: MotoServer, env: dict[str, str]) -> None:
        self.root, self.moto, self.env = root, moto, env
        self.made: list[Workspace] = []

    def new(self, name: str) -> Workspace:
        ws = Workspace.init(self.root / name)
        self.made.append(ws)
        shutil.copytree(REPO / "releases" / "primes", ws.releases_src_dir / "primes",
                        ignore=shutil.ignore_patterns("build", "*.o", "*.so"))
        (ws.providers_dir / "local.yaml").write_text(LOCAL_PROVIDER)
        (ws.providers_dir / "aws.yaml").write_text(ec2_provider_yaml(self.moto.port, priority=20))
        (ws.families_dir / "workers.yaml").write_text(FAMILY)
        return ws

    def env_for(self, ws: Workspace) -> dict[str, str]:
        return {**self.env, "ORCH_WORKSPACE": str(ws.root)}

    def orch(self, ws: Workspace, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*ORCH, *args], env=self.env_for(ws), capture_output=True, text=True, timeout=timeout)

    def stop_local(self, ws: Workspace) -> list[str]:
        """Stop the workspace's local nodes (real processes) and prove none of them is left.

        Returns the folders the driver left behind after destroying every node it lists
        (a create killed half-way must leave none: the driver sweeps them itself); they
        are removed all the same.
        """
        if ws.state_db.exists():
            with Store.open(ws.state_db) as store:
                local = [n for n in fleet.select_nodes(store, all_nodes=True) if n.provider == "local"]
                if local:
                    fleet.stop(ws, store, local)
        driver = make_driver(ws, load_provider(ws, "local"))
        for node in driver.list_nodes():
            driver.destroy_node(node)
        assert driver.list_nodes() == []
        half_written = [d.name for d in driver.root.iterdir() if d.is_dir()] if driver.root.is_dir() else []
        for name in half_written:
            driver.destroy_node(Node(name, name, CloudState.UNKNOWN, [], [], driver))
        assert processes_under(ws.root) == [], "processes of the workspace's nodes survived"
        return half_written


def processes_under(root: Path) -> list[str]:
    """Command lines of live processes that name a path under ``root`` (sshd -f .../sshd_config)."""
    marker = f"{root}/".encode()  # kill3/ is not kill30/
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if marker in cmdline and state not in "ZX":
            found.append(cmdline.replace(b"\0", b" ").decode(errors="replace"))
    return found


@pytest.fixture
def workspaces(tmp_path: Path, moto_server: MotoServer, ec2_env: dict[str, str]) -> Iterator[Workspaces]:
    made = Workspaces(tmp_path, moto_server, ec2_env)
    try:
        yield made
    finally:
        errors = []
        for ws in made.made:
            try:
                made.stop_local(ws)
            except Exception as exc:  # stop every workspace's nodes, then report
                errors.append(f"{ws.root.name}: {exc!r}")
        assert not errors, errors


def assert_providers_agree_with_the_store(ws: Workspace, ec2_instances: Instances) -> None:
    """Running, tagged nodes at each provider == the store's live nodes; no orphan at EC2."""
    with Store.open(ws.state_db) as store:
        wid = store.workspace_id
        live = store.list_nodes(states=[s for s in NodeState if s.live])
    for provider in ("local", "aws"):
        driver = make_driver(ws, load_provider(ws, provider))
        listed = driver.list_nodes()
        at_provider = {str(n.id) for n in listed
                       if n.state == CloudState.RUNNING and node_tags(n).get("orch-workspace") == wid}
        in_store = {n.provider_node_id for n in live if n.provider == provider}
        assert at_provider == in_store, (
            f"{provider}: running at the provider {sorted(at_provider)} vs live in the store "
            f"{sorted(f'{n.provider_node_id} ({n.state.value}: {n.reason})' for n in live if n.provider == provider)}; "
            f"listed: {sorted(f'{n.id} ({n.state})' for n in listed)}")
    live_ids = {n.id for n in live if n.provider == "aws"}
    running = ec2_instances(workspace_id=wid, states=("pending", "running"))
    orphans = [i["InstanceId"] for i in running if i["TagMap"].get("orch-node") not in live_ids]
    assert orphans == [], f"instances without a live record: {orphans}"


def spawn_and_kill(workspaces: Workspaces, ws: Workspace, delay: float) -> int:
    proc = subprocess.Popen([*ORCH, "spawn", "workers", "-q"], env=workspaces.env_for(ws),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(60)
    return proc.returncode


def measure_spawn(workspaces: Workspaces, ec2_instances: Instances) -> float:
    """Seconds a whole ``orch spawn`` takes from a fresh workspace (subprocess start included)."""
    ws = workspaces.new("measure")
    started = time.monotonic()
    result = workspaces.orch(ws, "spawn", "workers", "--json")
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert len(report["ready"]) == COUNT and report["failures"] == [], report
    nodes = json.loads(workspaces.orch(ws, "nodes", "--json").stdout)
    assert sorted(n["provider"] for n in nodes) == ["aws"] * 3 + ["local"] * 3
    assert_providers_agree_with_the_store(ws, ec2_instances)
    assert workspaces.stop_local(ws) == []
    return took


def test_sigkill_of_spawn_across_local_and_ec2_leaves_no_orphans(workspaces: Workspaces,
                                                                  ec2_instances: Instances) -> None:
    # Each kill hits a fresh workspace, so every point of a spawn from nothing is tried
    # (kills between scale-downs in one workspace: the next test).
    duration = measure_spawn(workspaces, ec2_instances)
    rng = random.Random(20 + SEED)
    # From 30% on: the first ~second of a spawn is Python importing orch.
    delays = sorted(rng.uniform(0.3, 1.0) * duration for _ in range(KILLS))
    outcomes = []
    for index, delay in enumerate(delays):
        ws = workspaces.new(f"kill{index}")
        code = spawn_and_kill(workspaces, ws, delay)
        rerun = rng.random() < 0.5
        if rerun:  # another run resumes what the killed one left half-done
            again = workspaces.orch(ws, "spawn", "workers", "-q")
            assert again.returncode == 0, again.stderr
        settled = workspaces.orch(ws, "reconcile", "--apply", "--json")
        assert settled.returncode == 0, settled.stderr
        assert_providers_agree_with_the_store(ws, ec2_instances)
        final = workspaces.orch(ws, "spawn", "workers", "--json")
        assert final.returncode == 0, final.stderr
        assert len(json.loads(final.stdout)["ready"]) == COUNT
        assert_providers_agree_with_the_store(ws, ec2_instances)
        with Store.open(ws.state_db) as store:
            assert fleet.reconcile(ws, store).changes == 0
        outcomes.append((round(delay, 2), "killed" if code == -signal.SIGKILL else f"exit {code}", rerun,
                         json.loads(settled.stdout)))
        assert workspaces.stop_local(ws) == [], "the local driver left folders behind"
    print(f"spawn takes {duration:.2f} s; kills (delay, outcome, rerun, reconcile):", *outcomes, sep="\n  ")
    assert sum(1 for _, outcome, _, _ in outcomes if outcome == "killed") >= KILLS // 2, outcomes


def test_sigkill_with_scale_downs_in_one_workspace_converges(workspaces: Workspaces,
                                                             ec2_instances: Instances) -> None:
    duration = measure_spawn(workspaces, ec2_instances)
    ws = workspaces.new("shrinking")
    rng = random.Random(21 + SEED)
    for delay in sorted(rng.uniform(0.3, 1.0) * duration for _ in range(KILLS)):
        spawn_and_kill(workspaces, ws, delay)
        if rng.random() < 0.5:  # shrink, so the next spawn has nodes to make on both providers
            shrunk = workspaces.orch(ws, "spawn", "workers", "-q", "--count", "2")
            assert shrunk.returncode == 0, shrunk.stderr
    settled = workspaces.orch(ws, "reconcile", "--apply")
    assert settled.returncode == 0, settled.stderr
    assert_providers_agree_with_the_store(ws, ec2_instances)
    final = workspaces.orch(ws, "spawn", "workers", "--json")
    assert final.returncode == 0, final.stderr
    assert len(json.loads(final.stdout)["ready"]) == COUNT
    assert "agrees" in workspaces.orch(ws, "reconcile").stdout
    stopped = workspaces.orch(ws, "stop", "--all")
    assert stopped.returncode == 0, stopped.stderr
    with Store.open(ws.state_db) as store:
        wid = store.workspace_id
    assert ec2_instances(workspace_id=wid, states=("pending", "running")) == []


def local_root(ws: Workspace) -> Path:
    return ws.runtime_dir / "drivers" / "local" / "local"


def local_metas(ws: Workspace) -> list[dict[str, Any]]:
    """The records of the local nodes (not of folders still being made, which are hidden)."""
    root = local_root(ws)
    found = []
    for path in root.glob("[!.]*/meta.json") if root.is_dir() else []:
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, ValueError):  # being written
            continue
    return found


def test_a_local_node_killed_before_its_sshd_started_is_settled(workspaces: Workspaces,
                                                                ec2_instances: Instances) -> None:
    for attempt in range(10):  # kill orch in the window: meta.json written, sshd not spawned yet
        ws = workspaces.new(f"half-made{attempt}")
        proc = subprocess.Popen([*ORCH, "spawn", "workers", "-q"], env=workspaces.env_for(ws),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                if any(m.get("pid") is None for m in local_metas(ws)):
                    proc.send_signal(signal.SIGKILL)
                    break
        finally:
            proc.kill()
            proc.wait(60)
        driver = make_driver(ws, load_provider(ws, "local"))
        if any(n.state == CloudState.STOPPED for n in driver.list_nodes()):
            break
    else:
        pytest.skip("no kill landed between the local driver's meta.json and its sshd")
    # Its creator is dead: the half-made node is listed stopped at once, never pending.
    assert CloudState.PENDING not in {n.state for n in driver.list_nodes()}
    half_made = {str(n.id) for n in driver.list_nodes() if n.state == CloudState.STOPPED}
    settled = workspaces.orch(ws, "reconcile", "--apply", "--json")
    assert settled.returncode == 0, settled.stderr
    assert not half_made & {str(n.id) for n in driver.list_nodes()}, "the half-made node is destroyed"
    with Store.open(ws.state_db) as store:
        by_provider_id = {n.provider_node_id: n for n in store.list_nodes()}
    for node_id in half_made:  # its record (if the kill left one pointing at it) is settled
        record = by_provider_id.get(node_id)
        assert record is None or record.state == NodeState.STOPPED, record
    assert_providers_agree_with_the_store(ws, ec2_instances)
    final = workspaces.orch(ws, "spawn", "workers", "--json")
    assert final.returncode == 0, final.stderr
    assert len(json.loads(final.stdout)["ready"]) == COUNT
    assert_providers_agree_with_the_store(ws, ec2_instances)
    assert "agrees" in workspaces.orch(ws, "reconcile").stdout


# A child that makes one local node and stalls where its folder is about to appear.
STALLED_CREATE = """
import os, sys, time
from libcloud.compute.base import NodeAuthSSHKey
from orchestrator.provision.drivers import local

def stall(src, dst):
    print("staged", flush=True)
    time.sleep(120)

local.os.rename = stall  # this child's os.rename: the create stops before its folder appears
driver = local.LocalNodeDriver(root=sys.argv[1])
driver.create_node("stalled", driver.list_sizes()[0], driver.list_images()[0], auth=NodeAuthSSHKey(sys.argv[2]))
"""


def reservations_for(root: Path) -> list[str]:
    """Loopback reservations (any root's, this user's) that point at folders under ``root``."""
    folder = Path(tempfile.gettempdir()) / f"orch-local-{os.geteuid()}"
    found = []
    for entry in folder.iterdir() if folder.is_dir() else []:
        with contextlib.suppress(OSError):
            if entry.read_text().startswith(f"{root}/"):
                found.append(entry.name)
    return found


def test_a_local_create_killed_before_its_folder_appeared_leaves_nothing(workspaces: Workspaces) -> None:
    ws = workspaces.new("half-written")
    root = local_root(ws)
    pubkey = ws.ssh_key.with_suffix(".pub").read_text().strip()
    child = subprocess.Popen([sys.executable, "-c", STALLED_CREATE, str(root), pubkey],
                             env=workspaces.env_for(ws), stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "staged"
        staged = [d.name for d in root.iterdir() if d.is_dir()]
        assert len(staged) == 1 and staged[0].startswith("."), "a folder being made is hidden"
        assert len(reservations_for(root)) == 1
    finally:
        child.kill()
        child.wait(60)
        if child.stdout is not None:
            child.stdout.close()
    # An older orch killed between its mkdir and its first meta.json: a folder without one.
    legacy = root / "workers-0ld-0badf00d"
    legacy.mkdir(mode=0o700)
    reservation = Path(tempfile.gettempdir()) / f"orch-local-{os.geteuid()}" / "127.0.0.250:2222"
    reservation.write_text(str(legacy))

    driver = make_driver(ws, load_provider(ws, "local"))
    assert driver.list_nodes() == []
    assert [d.name for d in root.iterdir() if d.is_dir()] == [legacy.name], "the killed create left nothing"
    assert reservations_for(root) == [reservation.name], "and holds no loopback address"
    spawned = workspaces.orch(ws, "spawn", "workers", "--json")
    assert spawned.returncode == 0, spawned.stderr
    assert len(json.loads(spawned.stdout)["ready"]) == COUNT
    assert not legacy.exists(), "a create sweeps folders without a record"
    assert reservation.name not in reservations_for(root), "and releases their addresses"
    assert all((d / "meta.json").is_file() for d in root.iterdir() if d.is_dir())
