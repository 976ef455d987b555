"""The fleet on real local nodes: spawn, bootstrap, exec, stop, failures and crashes.

Every node is a real sshd on 127.0.0.N; every test stops what it started, even when
it fails, and checks that nothing of its nodes is left.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from libcloud.compute.base import NodeAuthSSHKey

from orchestrator import fleet
from orchestrator.config import load_provider
from orchestrator.errors import NotFoundError
from orchestrator.provision.drivers.local import LocalNodeDriver
from orchestrator.provision.registry import make_driver
from orchestrator.state import NodeState, Store
from orchestrator.workspace import Workspace
from tests.helpers.cli import Run
from tests.helpers.netns import free_subnet, netns_usable
from tests.helpers.netns import leftovers as netns_leftovers
from tests.helpers.processes import processes_of
from tests.helpers.workspace import file_digest, stop_everything

pytestmark = pytest.mark.sshd
ORCH = [sys.executable, "-m", "orchestrator"]

LOCAL_PROVIDER = "driver: local\nlabels: [private]\nmax_nodes: 24\n"


def family_yaml(count: int, **bootstrap: object) -> str:
    lines = ["release: primes", f"count: {count}", "placement:", "  providers: [local]"]
    if bootstrap:
        lines.append("bootstrap:")
        lines += [f"  {k}: {json.dumps(v)}" for k, v in bootstrap.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture
def fleet_ws(ws: Workspace) -> Iterator[Workspace]:
    """A workspace with the local provider; every node is gone afterwards."""
    (ws.providers_dir / "local.yaml").write_text(LOCAL_PROVIDER)
    (ws.families_dir / "workers.yaml").write_text(family_yaml(4))
    try:
        yield ws
    finally:
        stop_everything(ws)


def provider_nodes(ws: Workspace) -> dict[str, object]:
    driver = make_driver(ws, load_provider(ws, "local"))
    return {str(n.id): n for n in driver.list_nodes()}


def store_nodes(ws: Workspace, *states: NodeState) -> list[object]:
    with Store.open(ws.state_db) as store:
        return store.list_nodes(states=states or None)


def assert_store_agrees_with_provider(ws: Workspace) -> None:
    at_provider: dict[str, object] = {}
    for path in ws.providers_dir.glob("*.yaml"):
        driver = make_driver(ws, load_provider(ws, path.stem))
        at_provider.update({str(n.id): n for n in driver.list_nodes()})
    with Store.open(ws.state_db) as store:
        live = {n.provider_node_id for n in store.list_nodes(states=[s for s in NodeState if s.live])}
    assert live == set(at_provider), f"store {sorted(map(str, live))} vs provider {sorted(at_provider)}"


@pytest.mark.parametrize("driver", ["local", pytest.param("netns", marks=pytest.mark.root)])
def test_spawn_exec_stop_leaves_nothing_behind(driver: str, fleet_ws: Workspace, orch: Callable[..., Run]) -> None:
    if driver == "netns":
        if not netns_usable():
            pytest.skip("netns nodes need root, `ip netns` and sshd")
        (fleet_ws.providers_dir / "netns.yaml").write_text(
            f"driver: netns\noptions: {{subnet: '{free_subnet()}', bridge: orchbrt{secrets.token_hex(3)}}}\n")
        (fleet_ws.families_dir / "workers.yaml").write_text(
            "release: primes\ncount: 4\nplacement:\n  providers: [netns]\n")
    spawned = orch("spawn", "workers", "--json", cwd=fleet_ws.root)
    assert spawned.code == 0, spawned.err
    report = json.loads(spawned.out)
    assert report["ok"] and len(report["ready"]) == 4

    nodes = json.loads(orch("nodes", "--json").out)
    assert len({n["address"] for n in nodes}) == 4
    assert all(n["state"] == "ready" and n["path"] == f"/{driver}/{driver}/workers/{n['id']}" for n in nodes)
    cloud = make_driver(fleet_ws, load_provider(fleet_ws, driver))
    dirs = {n.id: n.extra["node_dir"] for n in cloud.list_nodes()}
    assert len(dirs) == 4 and all(processes_of(pid, d) for pid, d in dirs.items())

    read_id = "python3 -c 'import json; print(json.load(open(\"orch/node.json\"))[\"node\"])'"
    ran = orch("exec", "workers", "--json", "--", read_id)
    assert ran.code == 0, ran.err
    outputs = json.loads(ran.out)
    assert {k: v["stdout"].strip() for k, v in outputs.items()} == {n["id"]: n["id"] for n in nodes}

    stopped = orch("stop", "workers")
    assert stopped.code == 0, stopped.err
    assert cloud.list_nodes() == []
    for node_id, node_dir in dirs.items():
        assert processes_of(node_id, node_dir) == [], f"processes of {node_id} survived"
        assert not Path(node_dir).exists()
    if driver == "netns":
        assert netns_leftovers(cloud, dirs, processes_of) == []
    assert [n.state for n in store_nodes(fleet_ws)] == [NodeState.STOPPED] * 4  # type: ignore[attr-defined]


def test_spawn_is_idempotent_grows_and_rolls_out_a_new_release(fleet_ws: Workspace, orch: Callable[..., Run]) -> None:
    (fleet_ws.families_dir / "workers.yaml").write_text(family_yaml(2))
    first = json.loads(orch("spawn", "workers", "--json", cwd=fleet_ws.root).out)
    assert len(first["created"]) == 2
    again = json.loads(orch("spawn", "workers", "--json").out)
    assert again["created"] == [] and again["rolled"] == [] and sorted(again["ready"]) == sorted(first["ready"])

    grown = json.loads(orch("spawn", "workers", "--count", "3", "--json").out)
    assert len(grown["created"]) == 1 and len(grown["ready"]) == 3

    src = fleet_ws.releases_src_dir / "primes"
    manifest = (src / "release.yaml").read_text().replace("version: 1.1.0", "version: 1.1.1")
    (src / "release.yaml").write_text(manifest)
    rolled = json.loads(orch("spawn", "workers", "--count", "3", "--json").out)
    assert rolled["created"] == [] and sorted(rolled["rolled"]) == sorted(grown["ready"])
    versions = json.loads(orch("exec", "workers", "--json", "--", "readlink orch/current").out)
    assert {v["stdout"].strip() for v in versions.values()} == {"releases/primes-1.1.1"}

    shrunk = json.loads(orch("spawn", "workers", "--count", "1", "--json").out)
    assert len(shrunk["removed"]) == 2 and len(shrunk["ready"]) == 1
    assert_store_agrees_with_provider(fleet_ws)


def test_two_spawns_of_one_family_at_once_make_its_count_not_twice_it(fleet_ws: Workspace) -> None:
    """Health's replacement, the autoscaler, the API and `orch spawn` may all spawn one
    family at the same moment: each plans and creates under the family's lock."""
    (fleet_ws.families_dir / "workers.yaml").write_text(family_yaml(2))
    notes: list[str] = []
    gate = threading.Barrier(2)

    def spawn_once() -> fleet.SpawnReport:
        with Store.open(fleet_ws.state_db) as store:
            gate.wait(timeout=10)
            return fleet.spawn(fleet_ws, store, "workers", events=fleet.FleetEvents(note=notes.append))

    with ThreadPoolExecutor(2) as pool:
        reports = list(pool.map(lambda _: spawn_once(), range(2)))
    assert sorted(len(r.created) for r in reports) == [0, 2], [r.created for r in reports]
    assert all(r.ok and sorted(r.ready) == sorted(reports[0].ready) for r in reports)
    assert len(provider_nodes(fleet_ws)) == 2
    # the holder's pid, or "unknown" when the waiter looked before the holder wrote it
    assert notes and re.fullmatch(rf"waiting for another change of family workers \((pid {os.getpid()}|unknown)\)",
                                  notes[0]), notes
    assert_store_agrees_with_provider(fleet_ws)


def test_spawn_of_a_name_that_is_no_family_makes_no_file(fleet_ws: Workspace) -> None:
    with Store.open(fleet_ws.state_db) as store, pytest.raises(NotFoundError, match="no node family"):
        fleet.spawn(fleet_ws, store, "../../escape")
    assert not list(fleet_ws.root.parent.rglob("*escape*"))


def test_a_changed_host_key_is_refused_naming_the_node(fleet_ws: Workspace, orch: Callable[..., Run]) -> None:
    (fleet_ws.families_dir / "workers.yaml").write_text(family_yaml(2))
    assert orch("spawn", "workers", "-q", cwd=fleet_ws.root).code == 0
    driver = make_driver(fleet_ws, load_provider(fleet_ws, "local"))
    victim = driver.list_nodes()[0]
    with Store.open(fleet_ws.state_db) as store:
        name = next(n.id for n in store.list_nodes() if n.provider_node_id == victim.id)
    # The machine behind the address changes its key: a new host key, sshd restarted.
    key_file = Path(victim.extra["node_dir"]) / "host_key"
    key_file.write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    driver.stop_node(victim)
    driver.start_node(victim)

    result = orch("exec", name, "--", "true")
    assert result.code == 5
    assert name in result.err and "host key" in result.err.lower()
    others = orch("exec", "workers", "--", "true")
    assert others.code == 5 and f"1 of 2 node(s) failed: {name}" in others.err


def test_a_failing_setup_is_replaced_until_the_family_has_its_count(fleet_ws: Workspace, orch: Callable[..., Run],
                                                                      tmp_path: Path) -> None:
    flag = tmp_path / "failed-once"
    src = fleet_ws.releases_src_dir / "primes"
    manifest = (src / "release.yaml").read_text()
    # The first node to run setup fails (mkdir is atomic across the nodes, which share this disk).
    (src / "release.yaml").write_text(manifest.replace("setup: []", f"setup:\n  - \"! mkdir {flag}\"")
                                      if "setup: []" in manifest else manifest + f"setup:\n  - \"! mkdir {flag}\"\n")
    (fleet_ws.families_dir / "workers.yaml").write_text(family_yaml(3, retries=2))
    result = orch("spawn", "workers", "--json", cwd=fleet_ws.root)
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert len(report["ready"]) == 3 and len(report["created"]) == 4 and len(report["removed"]) == 1
    assert len(report["failures"]) == 1 and "'setup' failed" in report["failures"][0]
    failed = report["removed"][0]
    log = (fleet_ws.logs_dir / f"{failed}.log").read_text()
    assert f"! mkdir {flag}" in log and "[exit 1]" in log
    assert_store_agrees_with_provider(fleet_ws)


def test_exhausted_retries_exit_non_zero_with_the_log_tail(fleet_ws: Workspace, orch: Callable[..., Run]) -> None:
    src = fleet_ws.releases_src_dir / "primes"
    manifest = (src / "release.yaml").read_text()
    (src / "release.yaml").write_text(manifest.replace("setup: []", "setup:\n  - echo cannot-set-up >&2 && false")
                                      if "setup: []" in manifest
                                      else manifest + "setup:\n  - echo cannot-set-up >&2 && false\n")
    (fleet_ws.families_dir / "workers.yaml").write_text(family_yaml(2, retries=1))
    result = orch("spawn", "workers", "-q", cwd=fleet_ws.root)
    assert result.code == 1
    assert "cannot-set-up" in result.err and "has 0 of 2 nodes ready" in result.err
    assert provider_nodes(fleet_ws) == {}, "failed nodes must be destroyed"
    assert len(store_nodes(fleet_ws)) == 4  # 2 slots x (1 try + 1 retry), all stopped


def test_sigkill_of_spawn_at_any_point_then_rerun_converges(fleet_ws: Workspace) -> None:
    env = {**os.environ, "ORCH_WORKSPACE": str(fleet_ws.root)}
    rng = random.Random(7)
    for delay in sorted(rng.uniform(0.3, 1.6) for _ in range(4)):
        proc = subprocess.Popen([*ORCH, "spawn", "workers", "-q"], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if rng.random() < 0.5:  # sometimes shrink, so the rerun must also scale down
            subprocess.run([*ORCH, "spawn", "workers", "-q", "--count", "2"], env=env, check=True,
                           capture_output=True, timeout=120)
    final = subprocess.run([*ORCH, "spawn", "workers", "--json"], env=env, capture_output=True, text=True,
                           timeout=120)
    assert final.returncode == 0, final.stderr
    assert len(json.loads(final.stdout)["ready"]) == 4
    assert len(provider_nodes(fleet_ws)) == 4
    assert_store_agrees_with_provider(fleet_ws)


def test_rolling_stops_at_the_first_failed_batch(fleet_ws: Workspace, orch: Callable[..., Run]) -> None:
    src = fleet_ws.releases_src_dir / "primes"
    manifest = (src / "release.yaml").read_text()
    (src / "release.yaml").write_text(manifest.replace("setup: []", "setup:\n  - \"false\"")
                                      if "setup: []" in manifest else manifest + "setup:\n  - \"false\"\n")
    (fleet_ws.families_dir / "workers.yaml").write_text(family_yaml(6, strategy="rolling", batch_size=2, retries=0))
    result = orch("spawn", "workers", "--json", cwd=fleet_ws.root)
    assert result.code == 1
    assert len(json.loads(result.out)["created"]) == 2, "only the first batch may be tried"


def test_seed_first_and_depends_on(fleet_ws: Workspace, orch: Callable[..., Run]) -> None:
    (fleet_ws.families_dir / "db.yaml").write_text(family_yaml(2, strategy="seed_first"))
    (fleet_ws.families_dir / "workers.yaml").write_text(family_yaml(2, depends_on=["db"]))
    refused = orch("spawn", "workers", cwd=fleet_ws.root)
    assert refused.code == 2 and "depends on 'db', which has 0 of 2 nodes ready" in refused.err
    assert orch("spawn", "db", "-q").code == 0
    configs = json.loads(orch("exec", "db", "--json", "--", "cat orch/node.json").out)
    db = {name: json.loads(out["stdout"]) for name, out in configs.items()}
    seeds = {c["seed"] for c in db.values()}
    addresses = {c["address"] for c in db.values()}
    assert len(seeds - {None}) == 1 and seeds - {None} <= addresses, "the later node learns the seed's address"

    assert orch("spawn", "workers", "-q").code == 0
    configs = json.loads(orch("exec", "workers", "--json", "--", "cat orch/node.json").out)
    for out in configs.values():
        assert sorted(json.loads(out["stdout"])["dependencies"]["db"]) == sorted(addresses)


def test_pre_and_post_hooks_run_around_the_release(fleet_ws: Workspace, orch: Callable[..., Run]) -> None:
    (fleet_ws.families_dir / "workers.yaml").write_text(family_yaml(
        1, pre=["date +%s%N > pre-ran && test ! -e orch/current"],
        post=["test -f orch/current/build/libprimes.so && date +%s%N > post-ran"]))
    assert orch("spawn", "workers", "-q", cwd=fleet_ws.root).code == 0
    out = json.loads(orch("exec", "workers", "--json", "--", "cat pre-ran post-ran").out)
    pre, post = next(iter(out.values()))["stdout"].split()
    assert int(pre) < int(post)


def test_reconcile_reports_then_settles_every_difference(fleet_ws: Workspace, orch: Callable[..., Run]) -> None:
    (fleet_ws.families_dir / "workers.yaml").write_text(family_yaml(3))
    assert orch("spawn", "workers", "-q", cwd=fleet_ws.root).code == 0
    driver = make_driver(fleet_ws, load_provider(fleet_ws, "local"))
    with Store.open(fleet_ws.state_db) as store:
        wid = store.workspace_id
        by_provider_id = {n.provider_node_id: n.id for n in store.list_nodes()}
    killed, destroyed, _ = sorted(driver.list_nodes(), key=lambda n: n.id)
    driver.ex_kill_node(killed)       # the machine dies: the provider lists it stopped
    driver.destroy_node(destroyed)    # someone deletes it in the console
    orphan = driver.create_node(      # an orch killed right after create, before recording
        "ghost", driver.list_sizes()[0], driver.list_images()[0],
        auth=NodeAuthSSHKey(fleet_ws.ssh_key.with_suffix(".pub").read_text().strip()),
        ex_tags={"orch-workspace": wid, "orch-family": "workers", "orch-node": "workers-ghost"})

    before = file_digest(fleet_ws.state_db)
    dry = json.loads(orch("reconcile", "--json").out)
    assert dry == {"applied": False, "adopted": [], "orphans": ["workers-ghost"],
                   "vanished": [by_provider_id[destroyed.id]], "down": [by_provider_id[killed.id]]}
    assert file_digest(fleet_ws.state_db) == before, "a dry reconcile changes nothing"
    assert orphan.id in {n.id for n in driver.list_nodes()}

    applied = json.loads(orch("reconcile", "--apply", "--json").out)
    assert applied["orphans"] == ["workers-ghost"] and applied["applied"]
    assert orphan.id not in {n.id for n in driver.list_nodes()}
    states = {n["id"]: n["state"] for n in json.loads(orch("nodes", "--all", "--json").out)}
    assert states[by_provider_id[killed.id]] == "lost" and states[by_provider_id[destroyed.id]] == "lost"
    assert "agrees" in orch("reconcile").out


def test_capacity_errors_fail_over_to_the_next_provider(fleet_ws: Workspace, orch: Callable[..., Run]) -> None:
    # The private cloud's real capacity (2) is lower than its registration admits, so the
    # third create fails at the provider: that size cools down and the rest go public.
    (fleet_ws.providers_dir / "local.yaml").write_text("driver: local\nlabels: [private]\noptions: {max_nodes: 2}\n")
    (fleet_ws.providers_dir / "public.yaml").write_text(
        "driver: local\nlabels: [public]\npriority: 200\noptions: {first_address: 100}\nprices: {local-1: 0.05}\n")
    (fleet_ws.families_dir / "workers.yaml").write_text(
        "release: primes\ncount: 4\nplacement:\n  providers: [local, public]\n")
    try:
        result = orch("spawn", "workers", "--json", cwd=fleet_ws.root)
        assert result.code == 0, result.err
        report = json.loads(result.out)
        assert len(report["ready"]) == 4
        assert any("quota is used up" in f for f in report["failures"])
        nodes = json.loads(orch("nodes", "--json").out)
        assert sorted(n["provider"] for n in nodes) == ["local", "local", "public", "public"]

        providers = {p["name"]: p for p in json.loads(orch("provider", "list", "--json").out)}
        assert list(providers["local"]["cooldowns"]) == ["*/*"]  # a quota: the whole provider
        planned = json.loads(orch("plan", "workers", "--count", "5", "--json").out)
        assert [r["provider"] for r in planned["requests"]] == ["public"]
        assert any("cooling down" in r for r in planned["rejected"])
        assert_store_agrees_with_provider(fleet_ws)
    finally:
        with Store.open(fleet_ws.state_db) as store:
            fleet.stop(fleet_ws, store, fleet.select_nodes(store, all_nodes=True))


def test_hosts_pool_is_used_then_spawn_fails_over_and_stop_cleans_the_machines(
        fleet_ws: Workspace, orch: Callable[..., Run], tmp_path: Path) -> None:
    # Two "existing machines" (sshd nodes made outside the workspace) that trust the fleet key.
    machines_driver = LocalNodeDriver(root=tmp_path / "machines", first_address=150)
    pubkey = fleet_ws.ssh_key.with_suffix(".pub").read_text().strip()
    machines = [machines_driver.create_node(f"m{i}", machines_driver.list_sizes()[1], machines_driver.list_images()[0],
                                            auth=NodeAuthSSHKey(pubkey)) for i in range(2)]
    try:
        hosts = [{"name": f"m{i}", "address": m.public_ips[0], "port": m.extra["port"], "user": m.extra["ssh_user"],
                  "host_key": m.extra["host_key"], "cpus": 2, "ram_mb": 1024, "disk_gb": 10, "arch": "x86_64"}
                 for i, m in enumerate(machines)]
        (fleet_ws.providers_dir / "metal.yaml").write_text(
            json.dumps({"driver": "hosts", "priority": 1, "labels": ["private"], "options": {"hosts": hosts}}))
        (fleet_ws.families_dir / "workers.yaml").write_text(
            "release: primes\ncount: 3\nplacement:\n  providers: [metal, local]\n")
        result = orch("spawn", "workers", "--json", cwd=fleet_ws.root)
        assert result.code == 0, result.err
        nodes = json.loads(orch("nodes", "--json").out)
        assert sorted(n["provider"] for n in nodes) == ["local", "metal", "metal"]
        on_metal = [n["address"] for n in nodes if n["provider"] == "metal"]
        assert sorted(on_metal) == sorted(m.public_ips[0] for m in machines)

        assert orch("stop", "workers").code == 0
        for machine in machines:  # cleaned (no ~/orch) and released, the machines themselves still up
            home = Path(machine.extra["node_dir"]) / "home"
            assert not (home / "orch").exists()
        assert {n.state for n in machines_driver.list_nodes()} == {machines[0].state}
        again = orch("spawn", "workers", "--count", "2", "--json")
        assert again.code == 0 and len(json.loads(again.out)["ready"]) == 2
    finally:
        stop_everything(fleet_ws)
        for machine in machines:
            machines_driver.destroy_node(machine)


def test_targets_labels_and_an_argument_vector(fleet_ws: Workspace, orch: Callable[..., Run]) -> None:
    """One resolver for exec and stop: globbed paths and label selectors (the family's and
    the provider's); after `--`, several arguments are a vector, each quoted."""
    (fleet_ws.families_dir / "workers.yaml").write_text(family_yaml(2) + "labels: [tier=batch]\n")
    (fleet_ws.families_dir / "db.yaml").write_text(family_yaml(1) + "labels: [tier=store]\n")
    for family in ("workers", "db"):
        assert orch("spawn", family, "-q", cwd=fleet_ws.root).code == 0
    nodes = {n["id"]: n["family"] for n in json.loads(orch("nodes", "--json").out)}
    workers = sorted(i for i, f in nodes.items() if f == "workers")

    def ran_on(*args: str) -> list[str]:
        result = orch("exec", *args, "--json", "--", "true")
        assert result.code == 0, result.err
        return sorted(json.loads(result.out))

    assert ran_on("/local/*/workers/*") == workers
    assert ran_on("all", "-l", "tier=batch") == workers
    assert ran_on("all", "-l", "private,tier!=batch") == sorted(set(nodes) - set(workers))  # private: the provider's
    missing = orch("exec", "/local/*/nobody", "--", "true")
    assert missing.code == 2 and "no node matches target '/local/*/nobody'" in missing.err
    assert "Traceback" not in missing.err
    unlabelled = orch("exec", "db", "-l", "tier=batch", "--", "true")
    assert unlabelled.code == 2 and "matches labels 'tier=batch'" in unlabelled.err

    made = orch("exec", workers[0], "--json", "--", "touch", "a;b", "c d")
    assert made.code == 0, made.err
    listed = json.loads(orch("exec", workers[0], "--json", "--", "ls -1 a* b* c* 2>/dev/null; true").out)
    assert listed[workers[0]]["stdout"].splitlines() == ["a;b", "c d"]  # one file each, no `b` command run
    line = json.loads(orch("exec", workers[0], "--json", "--", "echo one; echo two").out)
    assert line[workers[0]]["stdout"].split() == ["one", "two"]  # one argument: a shell command line

    assert orch("stop", "-l", "tier=store").code == 0
    assert {n.family for n in store_nodes(fleet_ws, NodeState.READY)} == {"workers"}  # type: ignore[attr-defined]
