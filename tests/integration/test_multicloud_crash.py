"""SIGKILL ``orch spawn`` across two providers: nodes on this machine and EC2 (moto).

A private ``local`` provider (3 nodes at most, priority 10) and an EC2 account
(priority 20) host a family of 6, placed in that order.  ``orch spawn`` runs as a
subprocess and is killed at seeded random points spread over a spawn's measured
duration; afterwards ``orch reconcile --apply`` must leave every provider's running,
tagged nodes equal to the store's live nodes, with no instance orphaned, and a final
``orch spawn`` must reach 6 ready.

Both providers run with ``bootstrap: false`` and the workspaces with an RSA fleet key:
EC2 needs the RSA key today (see ``use_rsa_fleet_key`` in conftest_moto), and orch's
SSH layer cannot bootstrap with it.  The local nodes are real sshd processes all the
same; every one is stopped at the end, and the moto server is killed by its pid.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from libcloud.compute.base import Node
from libcloud.compute.types import NodeState as CloudState

from orchestrator import fleet
from orchestrator.config import load_provider
from orchestrator.providers import make_driver
from orchestrator.provision import node_tags
from orchestrator.state import NodeState, Store
from orchestrator.workspace import Workspace
from tests.moto_ec2 import LIBCLOUD_KEY_IMPORT_WARNING, MotoServer, ec2_provider_yaml

pytest_plugins = ["tests.integration.conftest_moto"]
pytestmark = [pytest.mark.slow, pytest.mark.sshd, pytest.mark.filterwarnings(LIBCLOUD_KEY_IMPORT_WARNING)]

REPO = Path(__file__).resolve().parents[2]
ORCH = [sys.executable, "-m", "orchestrator"]
COUNT = 6
KILLS = 10
LOCAL_PROVIDER = "driver: local\nlabels: [private]\npriority: 10\nmax_nodes: 3\nbootstrap: false\n"
FAMILY = f"release: primes\ncount: {COUNT}\nplacement:\n  policy: ordered\n  providers: [local, aws]\n"
Instances = Callable[..., list[dict[str, Any]]]


class Workspaces:
    """Makes workspaces on the shared moto server and stops their local nodes at the end."""

    def __init__(self, root: Path, moto: MotoServer, env: dict[str, str],
                 rsa_fleet_key: Callable[[Workspace], str]) -> None:
        self.root, self.moto, self.env, self.rsa_fleet_key = root, moto, env, rsa_fleet_key
        self.made: list[Workspace] = []

    def new(self, name: str) -> Workspace:
        ws = Workspace.init(self.root / name)
        self.made.append(ws)
        shutil.copytree(REPO / "releases" / "primes", ws.releases_src_dir / "primes",
                        ignore=shutil.ignore_patterns("build", "*.o", "*.so"))
        self.rsa_fleet_key(ws)
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

        Returns the node folders without metadata it found (and removed) on the way:
        orch cannot see those (see HALF_WRITTEN).
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
    marker = str(root).encode()
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
def workspaces(tmp_path: Path, moto_server: MotoServer, ec2_env: dict[str, str],
               rsa_fleet_key: Callable[[Workspace], str]) -> Iterator[Workspaces]:
    made = Workspaces(tmp_path, moto_server, ec2_env, rsa_fleet_key)
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


HALF_WRITTEN = (
    "product: drivers/local.py create_node killed between node_dir.mkdir() (and _reserve of its address) and "
    "the first meta.json write leaves a folder without meta.json: list_nodes never shows it, so no reconcile "
    "or stop removes it, and its loopback address stays reserved while the folder exists"
)
HALF_MADE = (
    "product: a local create killed after the driver wrote meta.json (pid null) but before it spawned sshd "
    "leaves a node that is listed 'pending', then 'stopped', forever; provision.recover adopts it "
    "(record -> booting) whatever its state and never settles a booting/bootstrapping record whose node is "
    "not running, and fleet._Spawner._roll marks it ready without asking the provider (bootstrap: false)"
)


def assert_providers_agree_with_the_store(ws: Workspace, ec2_instances: Instances, *,
                                          known_bugs_xfail: bool = True) -> None:
    """Running, tagged nodes at each provider == the store's live nodes; no orphan at EC2.

    ``known_bugs_xfail``: a disagreement that is exactly the known half-made-node bug
    (live records whose local node is listed but not running) ends the test as xfail,
    naming the bug, instead of failing it: kills hit that window only now and then.
    """
    with Store.open(ws.state_db) as store:
        wid = store.workspace_id
        live = store.list_nodes(states=[s for s in NodeState if s.live])
    for provider in ("local", "aws"):
        driver = make_driver(ws, load_provider(ws, provider))
        listed = driver.list_nodes()
        at_provider = {str(n.id) for n in listed
                       if n.state == CloudState.RUNNING and node_tags(n).get("orch-workspace") == wid}
        in_store = {n.provider_node_id for n in live if n.provider == provider}
        not_running = {str(n.id) for n in listed if n.state != CloudState.RUNNING}
        if known_bugs_xfail and provider == "local" and at_provider < in_store <= at_provider | not_running:
            pytest.xfail(f"{HALF_MADE}: {sorted(map(str, in_store - at_provider))} in {ws.root.name}")
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
    assert len(report["ready"]) == COUNT, report  # failures: the key-import race (see test_ec2.py)
    nodes = json.loads(workspaces.orch(ws, "nodes", "--json").stdout)
    assert sorted(n["provider"] for n in nodes) == ["aws"] * 3 + ["local"] * 3
    assert_providers_agree_with_the_store(ws, ec2_instances)
    assert workspaces.stop_local(ws) == []
    return took


def test_sigkill_of_spawn_across_local_and_ec2_leaves_no_orphans(workspaces: Workspaces,
                                                                  ec2_instances: Instances) -> None:
    # Each kill hits a fresh workspace, so every point of a spawn from nothing is tried
    # (no scale-down between kills: see the xfail below).
    duration = measure_spawn(workspaces, ec2_instances)
    rng = random.Random(20)
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
        half_written = workspaces.stop_local(ws)
        if half_written:
            pytest.xfail(f"{HALF_WRITTEN}: {half_written} in {ws.root.name}")
    print(f"spawn takes {duration:.2f} s; kills (delay, outcome, rerun, reconcile):", *outcomes, sep="\n  ")
    assert sum(1 for _, outcome, _, _ in outcomes if outcome == "killed") >= KILLS // 2, outcomes


@pytest.mark.xfail(strict=True, reason=(
    "product: EC2 lists terminated instances, and provision.find_node / ProviderHandle.tagged_nodes count them "
    "as present: `orch stop` and scaling EC2 nodes down fail ('still lists node ... after destroy') and leave "
    "records in 'stopping'; reconcile destroys the terminated instances again as orphans on every run"))
def test_sigkill_with_scale_downs_in_one_workspace_converges(workspaces: Workspaces,
                                                             ec2_instances: Instances) -> None:
    duration = measure_spawn(workspaces, ec2_instances)
    ws = workspaces.new("shrinking")
    rng = random.Random(21)
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


def local_metas(ws: Workspace) -> list[dict[str, Any]]:
    root = ws.runtime_dir / "drivers" / "local" / "local"
    found = []
    for path in root.glob("*/meta.json") if root.is_dir() else []:
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, ValueError):  # being written
            continue
    return found


@pytest.mark.xfail(strict=True, reason=HALF_MADE)
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
        if any(m.get("pid") is None for m in local_metas(ws)):
            break
    else:
        pytest.skip("no kill landed between the local driver's meta.json and its sshd")
    # Past its start timeout the half-made node is listed stopped: it will never run.
    driver = make_driver(ws, load_provider(ws, "local"))
    deadline = time.monotonic() + 30
    while any(n.state == CloudState.PENDING for n in driver.list_nodes()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert CloudState.STOPPED in {n.state for n in driver.list_nodes()}
    settled = workspaces.orch(ws, "reconcile", "--apply")
    assert settled.returncode == 0, settled.stderr
    assert_providers_agree_with_the_store(ws, ec2_instances, known_bugs_xfail=False)
    final = workspaces.orch(ws, "spawn", "workers", "--json")
    assert final.returncode == 0, final.stderr
    assert_providers_agree_with_the_store(ws, ec2_instances, known_bugs_xfail=False)
