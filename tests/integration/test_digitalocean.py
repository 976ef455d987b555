"""orch on DigitalOcean: libcloud's stock ``DigitalOcean_v2_NodeDriver`` against a
protocol peer (tests/peers/digitalocean.py) over HTTP on 127.0.0.1, whose droplets are
real sshd nodes at 127.0.0.N port 22.

One peer serves the module (one account); each test has its own workspace (its own
workspace tag and fleet key) and leaves no droplet, node or process behind, whatever
its outcome.  The driver reaches the peer through the endpoint adapter ``dopeer`` (the
stock driver takes no endpoint); everything else, every request and response, is the
stock driver's.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator import fleet
from orchestrator.config import load_provider
from orchestrator.errors import ProviderError
from orchestrator.provision.handle import ProviderHandle, key_pair_name
from orchestrator.provision.nodes import destroy_node, find_node, wait_running
from orchestrator.provision.registry import sync_registrations
from orchestrator.provision.tags import node_tags
from orchestrator.state import NodeState, Store
from orchestrator.workspace import Workspace
from tests.helpers.cli import Run
from tests.helpers.primes import primes_below
from tests.helpers.processes import commands_with
from tests.helpers.provision import create_as_spawn
from tests.helpers.workspace import REPO, destroy_local_nodes, fleet_key, workspace_id
from tests.peers.digitalocean import PLUGIN, REGIONS, SIZES, Peer, start_peer

pytestmark = [pytest.mark.sshd, pytest.mark.slow]

REGISTER = ("provider", "add", "do", "--driver", "dopeer", "--credential", "key=env:DO_TOKEN",
            "--label", "public", "--priority", "10")
IMAGE = "ubuntu-24-04-x64"
PRIMES_BELOW = 200_000


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peer]:
    """The module's DigitalOcean account; stopped by its pid at the end, every node gone."""
    root = tmp_path_factory.mktemp("do-peer")
    started = start_peer(root)
    try:
        yield started
    finally:
        started.stop()
        log = (root / "peer.log").read_text()[-2000:]
        assert commands_with(str(root)) == [], "a droplet's node outlived the peer"
        shutil.rmtree(root)
        assert started.process.returncode == 0, log


@pytest.fixture
def do_env(monkeypatch: pytest.MonkeyPatch, peer: Peer) -> None:
    """The adapter as a plugin (for orch subprocesses too) and the token as DO_TOKEN."""
    monkeypatch.setenv("ORCH_DRIVER_PLUGINS", PLUGIN)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("DO_TOKEN", peer.token)


@pytest.fixture
def do_ws(ws: Workspace, do_env: None, peer: Peer, orch: Callable[..., Run]) -> Iterator[Workspace]:
    """A workspace with provider ``do`` registered as docs/clouds/digitalocean.md says
    (plus the peer's endpoint), agents dialling 127.0.0.1, and family ``workers`` (2) on it."""
    added = orch(*REGISTER, "--option", "host=127.0.0.1", "--option", f"port={peer.port}",
                 "--option", "secure=false", cwd=ws.root)
    assert added.code == 0, added.err
    with (ws.providers_dir / "do.yaml").open("a") as out:
        out.write(f"image: {IMAGE}\n")
    ws.settings_file.write_text("scheduler_address: 127.0.0.1\n")
    (ws.families_dir / "workers.yaml").write_text(family_yaml(2, ["do"]))
    try:
        yield ws
    finally:
        peer.clear_faults()
        _stop_all(ws, peer)


def _stop_all(ws: Workspace, peer: Peer) -> None:
    """Every node of the workspace stopped; whatever droplet still carries its tag
    destroyed at the peer; then none of its droplets and none of their nodes is left."""
    os.environ["DO_TOKEN"] = peer.token  # (a test may have changed it; monkeypatch restores it after)
    wid = workspace_id(ws) if ws.state_db.exists() else None
    if wid is not None:
        with Store.open(ws.state_db) as store:
            live = fleet.select_nodes(store, all_nodes=True)
            if live:
                with contextlib.suppress(Exception):  # the peer's faults may be in the way: destroyed below
                    fleet.stop(ws, store, live)
    handle = ProviderHandle(ws, load_provider(ws, "do"))
    for node in handle.driver.list_nodes():
        if wid is not None and node_tags(node).get("orch-workspace") == wid:
            handle.driver.destroy_node(node)
    destroy_local_nodes(ws)
    deadline = time.monotonic() + 30
    while (left := ours(peer, wid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == [], f"droplets left at the peer: {left}"


def family_yaml(count: int, providers: list[str], extra: str = "") -> str:
    return (f"release: primes\ncount: {count}\nworkers_per_node: 1\n"
            f"placement:\n  providers: [{', '.join(providers)}]\n{extra}")


def ours(peer: Peer, wid: str | None) -> list[dict[str, Any]]:
    """The peer's droplets that carry the workspace's tag (destroyed ones still listed too)."""
    return [d for d in peer.state()["droplets"] if wid is not None and f"orch-workspace:{wid}" in d["tags"]]


def offered_host_key(address: str) -> str:
    """The ed25519 host key the machine at address:22 offers, as ``ssh-ed25519 AAAA...``."""
    scanned = subprocess.run(["ssh-keyscan", "-T", "5", "-t", "ed25519", "-p", "22", address],
                             capture_output=True, text=True, timeout=30)
    lines = [line.split(None, 1)[1] for line in scanned.stdout.splitlines() if line and not line.startswith("#")]
    assert len(lines) == 1, scanned
    return lines[0].strip()


def cooldowns(orch: Callable[..., Run]) -> dict[str, Any]:
    providers = {p["name"]: p for p in json.loads(orch("provider", "list", "--json").out)}
    result: dict[str, Any] = providers["do"]["cooldowns"]
    return result


# -- end to end -------------------------------------------------------------------------------


def test_register_check_plan_spawn_run_and_stop(do_ws: Workspace, orch: Callable[..., Run], peer: Peer) -> None:
    registered = load_provider(do_ws, "do")
    assert registered.credentials == {"key": "env:DO_TOKEN"} and registered.options["secure"] is False

    checked = orch("provider", "check", "do", "--json", cwd=do_ws.root)
    assert checked.code == 0, checked.err
    check = json.loads(checked.out)
    sizes = {s["id"]: s for s in check["sizes"]}
    assert set(sizes) == set(SIZES)
    assert (sizes["s-2vcpu-4gb"]["cpus"], sizes["s-2vcpu-4gb"]["ram_mb"], sizes["s-2vcpu-4gb"]["disk_gb"]) == \
        (2, 4096, 80)
    assert sizes["s-1vcpu-1gb"]["price"] == pytest.approx(6.0 / 672, abs=1e-5), "price_hourly"
    assert check["locations"] == sorted(REGIONS), "regions by slug; ams2 is not available"

    planned = json.loads(orch("plan", "workers", "--json").out)
    assert len(planned["requests"]) == 2
    assert {(r["provider"], r["image"]) for r in planned["requests"]} == {("do", IMAGE)}

    spawned = orch("spawn", "workers", "--json")
    assert spawned.code == 0, spawned.err
    report = json.loads(spawned.out)
    assert report["failures"] == [] and len(report["ready"]) == 2
    assert "Warning" not in spawned.err

    wid = workspace_id(do_ws)
    state = peer.state()
    droplets = {d["name"]: d for d in ours(peer, wid)}
    assert sorted(droplets) == sorted(report["ready"])
    [account_key] = [k for k in state["keys"] if k["name"] == key_pair_name(wid, fleet_key(do_ws))]
    assert account_key["public_key"] == fleet_key(do_ws), "the fleet key, imported once into the account"
    with Store.open(do_ws.state_db) as store:
        records = {r.id: r for r in store.list_nodes(states=[NodeState.READY])}
    for node_id, droplet in droplets.items():
        record = records[node_id]
        assert droplet["status"] == "active" and droplet["size_slug"] == record.size
        assert droplet["region"]["slug"] == record.location and droplet["image"]["slug"] == IMAGE
        assert sorted(droplet["tags"]) == sorted([f"orch-workspace:{wid}", "orch-family:workers",
                                                  f"orch-node:{node_id}"])
        address = state["nodes"][str(droplet["id"])]
        assert record.provider_node_id == str(droplet["id"]) and record.address == address
        assert address.startswith("127.0.0.") and record.port == 22 and record.ssh_user == "root"
        assert record.host_key and record.host_key in droplet["user_data"], "pinned before the create"
        assert offered_host_key(address).split()[:2] == record.host_key.split()[:2]

    handle = ProviderHandle(do_ws, load_provider(do_ws, "do"))  # the tags, read back through the driver
    listed = {n.name: node_tags(n) for n in handle.driver.list_nodes() if n.name in droplets}
    assert listed == {i: {"orch-workspace": wid, "orch-family": "workers", "orch-node": i} for i in droplets}

    ran = orch("job", "run", "primes:count_primes", "--input", f"0:{PRIMES_BELOW}", "--family", "workers",
               "--json")
    assert ran.code == 0, ran.err
    job = json.loads(ran.out)["job"]
    result = orch("job", "result", job)
    assert result.code == 0, result.err
    assert sum(int(x) for x in result.out.split()) == primes_below(PRIMES_BELOW)

    stopped = orch("stop", "workers")
    assert stopped.code == 0, stopped.err
    assert ours(peer, wid) == []
    assert not any(name in droplets for name in peer.state()["nodes"])
    with Store.open(do_ws.state_db) as store:
        assert {r.state for r in store.list_nodes()} == {NodeState.STOPPED}
    assert "agrees" in orch("reconcile").out


# -- faults -----------------------------------------------------------------------------------


def with_local_second(ws: Workspace) -> None:
    """Provider ``local`` after ``do`` (nodes on this machine, provisioned only to keep
    the test short), and the family placed on both."""
    (ws.providers_dir / "local.yaml").write_text(
        "driver: local\nlabels: [private]\npriority: 20\nmax_nodes: 2\nbootstrap: false\n")
    (ws.families_dir / "workers.yaml").write_text(family_yaml(2, ["do", "local"]))


def not_bootstrapped(ws: Workspace) -> None:
    with (ws.providers_dir / "do.yaml").open("a") as out:
        out.write("bootstrap: false\n")


def providers_of(orch: Callable[..., Run]) -> list[str]:
    return sorted(n["provider"] for n in json.loads(orch("nodes", "--json").out))


def test_no_capacity_fails_over_to_the_next_provider(do_ws: Workspace, orch: Callable[..., Run],
                                                     peer: Peer) -> None:
    with_local_second(do_ws)
    peer.faults(capacity=list(SIZES))  # every size, in every region
    before = len(peer.state()["injected"])
    spawned = orch("spawn", "workers", "--json", cwd=do_ws.root)
    assert spawned.code == 0, spawned.err
    report = json.loads(spawned.out)
    assert len(report["ready"]) == 2 and providers_of(orch) == ["local", "local"]
    assert report["failures"] and all("out of capacity" in f and "Size is not available in this region" in f
                                      for f in report["failures"])
    injected = peer.state()["injected"][before:]
    assert injected and {(i["call"], i["status"], i["id"]) for i in injected} == \
        {("POST /v2/droplets", 422, "unprocessable_entity")}
    assert set(cooldowns(orch)) == {f"{r}/{s}" for r in REGIONS for s in SIZES}, "each choice cooled down in turn"
    assert len(injected) <= 2 * len(REGIONS) * len(SIZES)
    assert ours(peer, workspace_id(do_ws)) == [], "a refused create leaves no droplet"


def test_the_droplet_limit_fails_over_too(do_ws: Workspace, orch: Callable[..., Run], peer: Peer) -> None:
    """DigitalOcean answers its droplet limit as it answers a size it has not got (422
    unprocessable_entity): orch cannot tell them apart by code, and fails over from each
    choice in turn (see docs/clouds/digitalocean.md)."""
    with_local_second(do_ws)
    not_bootstrapped(do_ws)
    assert [d for d in peer.state()["droplets"]] == [], "the account is empty between tests"
    peer.faults(droplet_limit=1)
    spawned = orch("spawn", "workers", "--json", cwd=do_ws.root)
    assert spawned.code == 0, spawned.err
    report = json.loads(spawned.out)
    assert len(report["ready"]) == 2 and providers_of(orch) == ["do", "local"]
    assert any("will exceed your droplet limit" in f for f in report["failures"])
    assert all("out of capacity" in f and "(code: 422)" in f for f in report["failures"])
    assert len(ours(peer, workspace_id(do_ws))) == 1


def test_max_nodes_at_the_droplet_limit_sends_the_rest_elsewhere_unasked(
        do_ws: Workspace, orch: Callable[..., Run], peer: Peer) -> None:
    """What docs/clouds/digitalocean.md advises: the registration's max_nodes at the
    account's droplet limit, so orch's own quota places the rest before DigitalOcean
    has to refuse anything."""
    with_local_second(do_ws)
    added = orch(*REGISTER, "--option", "host=127.0.0.1", "--option", f"port={peer.port}", "--option",
                 "secure=false", "--max-nodes", "1", "--replace", cwd=do_ws.root)
    assert added.code == 0, added.err
    with (do_ws.providers_dir / "do.yaml").open("a") as out:
        out.write(f"image: {IMAGE}\nbootstrap: false\n")
    peer.faults(droplet_limit=1)
    before = len(peer.state()["injected"])
    spawned = orch("spawn", "workers", "--json")
    assert spawned.code == 0, spawned.err
    assert json.loads(spawned.out)["failures"] == [] and providers_of(orch) == ["do", "local"]
    assert peer.state()["injected"][before:] == []


def test_throttled_creates_are_retried(do_ws: Workspace, orch: Callable[..., Run], peer: Peer,
                                       tmp_path: Path) -> None:
    token = tmp_path / "do-token"  # the token from a 0600 file this time
    token.write_text(peer.token + "\n")
    token.chmod(0o600)
    added = orch(*REGISTER, "--option", "host=127.0.0.1", "--option", f"port={peer.port}", "--option",
                 "secure=false", "--credential", f"key=file:{token}", "--replace", cwd=do_ws.root)
    assert added.code == 0, added.err
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    with (do_ws.providers_dir / "do.yaml").open("a") as out:
        out.write(f"image: {IMAGE}\nbootstrap: false\n")
    (do_ws.families_dir / "workers.yaml").write_text(family_yaml(1, ["do"]))
    peer.faults(throttle=2)  # the next two creates
    before = len(peer.state()["injected"])

    spawned = orch("spawn", "workers", "--json")
    assert spawned.code == 0, spawned.err
    report = json.loads(spawned.out)
    assert len(report["ready"]) == 1 and report["failures"] == []
    assert [(i["status"], i["id"]) for i in peer.state()["injected"][before:]] == [(429, "too_many_requests")] * 2
    with Store.open(do_ws.state_db) as store:
        retries = store.events(kind="provider.retry")
    assert [(e.provider, e.node) for e in retries] == [("do", report["ready"][0])] * 2
    assert [d["name"] for d in ours(peer, workspace_id(do_ws))] == report["ready"], "one droplet, not one per try"


@pytest.mark.parametrize("how", ["a wrong token", "a revoked token"])
def test_refused_credentials_are_one_line_exit_3_and_nothing_is_made(
        do_ws: Workspace, orch: Callable[..., Run], peer: Peer, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    if how == "a wrong token":
        monkeypatch.setenv("DO_TOKEN", "dop_v1_" + "0" * 64)
    else:
        peer.faults(revoked=True)
    before = len(peer.state()["injected"])
    keys = len(peer.state()["keys"])
    for args in (("provider", "check", "do"), ("spawn", "workers")):
        result = orch(*args, cwd=do_ws.root)
        assert result.code == 3, (args, result)
        errors = [line for line in result.err.splitlines() if line.startswith("error:")]
        assert errors == [result.err.strip().splitlines()[-1]], result.err
        assert "provider 'do' rejected the credentials" in errors[0], result.err
        assert "Traceback" not in result.err + result.out
    injected = peer.state()["injected"][before:]
    assert injected and {(i["status"], i["id"]) for i in injected} == {(401, "unauthorized")}
    assert ours(peer, workspace_id(do_ws)) == [] and len(peer.state()["keys"]) == keys
    with Store.open(do_ws.state_db) as store:
        assert all(not r.state.live for r in store.list_nodes())


def test_a_create_that_stays_pending_is_not_waited_for_forever(do_ws: Workspace, peer: Peer) -> None:
    peer.faults(pending=True)
    with Store.open(do_ws.state_db) as store:
        sync_registrations(store, {"do": load_provider(do_ws, "do")})
        handle = ProviderHandle(do_ws, load_provider(do_ws, "do"))
        record = create_as_spawn(handle, store, "workers-pending", family="workers")
        assert record.state == NodeState.BOOTING and record.address is None, "a new droplet has no address yet"
        with pytest.raises(ProviderError, match=r"not running after 1 s \(state pending\)"):
            wait_running(handle, str(record.provider_node_id), timeout=1)
        stopped = destroy_node(handle, store, record, reason="never booted")
        assert stopped.state == NodeState.STOPPED
        assert find_node(handle, str(record.provider_node_id)) is None
    assert ours(peer, workspace_id(do_ws)) == []


def test_a_slow_destroy_is_reported_and_the_next_stop_finishes(do_ws: Workspace, orch: Callable[..., Run],
                                                               peer: Peer) -> None:
    not_bootstrapped(do_ws)
    (do_ws.families_dir / "workers.yaml").write_text(family_yaml(1, ["do"]))
    assert orch("spawn", "workers", "-q", cwd=do_ws.root).code == 0
    wid = workspace_id(do_ws)
    [droplet] = ours(peer, wid)
    peer.faults(slow_destroy=1.5)

    first = orch("stop", "workers")
    assert first.code == 3, first
    assert "still lists node" in first.err and "run `orch stop` again" in first.err
    assert len(first.err.strip().splitlines()) == 1
    assert [d["destroyed"] for d in ours(peer, wid)] == [True], "destroyed, still listed"
    deadline = time.monotonic() + 10
    while ours(peer, wid) and time.monotonic() < deadline:
        time.sleep(0.1)
    again = orch("stop", "workers")
    assert again.code == 0, again.err
    assert ours(peer, wid) == [] and str(droplet["id"]) not in peer.state()["nodes"]
    with Store.open(do_ws.state_db) as store:
        assert {r.state for r in store.list_nodes()} == {NodeState.STOPPED}
