"""orch on Google Compute Engine: libcloud's stock ``gce`` driver (a service account's
signed JWT exchanged for a bearer token, the Compute Engine v1 API, zonal operations)
against our own peer (``tests/peers/gce.py``) on 127.0.0.1, whose instances are real
sshd nodes on 127.0.0.N.

The stock driver reaches the peer through its own ``proxy_url`` and ``secure=False``
options (it takes no host or port: see the peer's docstring); nothing else differs
from a registration for Google's cloud.  One peer for the module (started and stopped
by its pid; on stop it stops every node); every test has its own workspace and leaves
the peer with no instance, no fault and no node, whatever its outcome.  Registrations
are made with the same ``orch provider add`` line docs/clouds/gce.md gives; the
service account's key file is 0600.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from libcloud.common.google import GoogleBaseError, InvalidRequestError, QuotaExceededError

from orchestrator.config import load_provider
from orchestrator.errors import (
    ProviderAuthError,
    ProviderCapacityError,
    ProviderError,
    ProviderQuotaError,
    ProviderTransientError,
)
from orchestrator.provision.cloud_errors import map_libcloud_errors
from orchestrator.provision.drivers.features import STOCK
from orchestrator.provision.handle import ProviderHandle
from orchestrator.provision.nodes import destroy_node, wait_running
from orchestrator.provision.registry import make_driver
from orchestrator.state import NodeState, Store
from orchestrator.workspace import Workspace
from tests.helpers.cli import Run, run_primes_job
from tests.helpers.peers import stop_peer
from tests.helpers.processes import processes_of
from tests.helpers.provision import create_as_spawn
from tests.helpers.workspace import family_yaml, fleet_key, records, stop_everything, workspace_id
from tests.peers.gce import IMAGE, IMAGE_FAMILY, IMAGE_PROJECT, GCEPeer, ServiceAccount, start_peer

pytestmark = [pytest.mark.slow]

PROVIDER = "gce"
PROJECT = "orch-test-4711"
IMAGE_LINK = f"https://www.googleapis.com/compute/v1/projects/{IMAGE_PROJECT}/global/images/{IMAGE}"
ACCOUNT = ServiceAccount.generate(PROJECT)


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GCEPeer]:
    started = start_peer(tmp_path_factory.mktemp("gce-peer"), ACCOUNT)
    try:
        yield started
    finally:
        stop_peer(started, started.root / "nodes")


def add_lines(peer: GCEPeer, ws: Workspace, name: str = PROVIDER) -> list[str]:
    """``orch provider add`` as docs/clouds/gce.md gives it (the proxy this peer's)."""
    return ["provider", "add", name, "--driver", "gce",
            "--option", f"project={PROJECT}",
            "--option", f"user_id={ACCOUNT.email}",
            "--option", "auth_type=SA",
            "--option", f"proxy_url={peer.proxy_url}",
            "--option", "secure=false",
            "--credential", "key=file:secrets/gce-sa.json",
            "--label", "public", "--priority", "10"]


def set_registration(ws: Workspace, **fields: Any) -> None:
    """providers/gce.yaml with these top-level fields changed (image, bootstrap...)."""
    config = load_provider(ws, PROVIDER).model_dump(mode="json", exclude={"name"}, exclude_defaults=True)
    (ws.providers_dir / f"{PROVIDER}.yaml").write_text(json.dumps({**config, **fields}))


@pytest.fixture
def gce_ws(ws: Workspace, peer: GCEPeer, orch: Callable[..., Run]) -> Iterator[Workspace]:
    """A workspace with provider ``gce`` registered on the peer (the image as a link);
    afterwards every node stopped, the peer without instances or faults, its nodes gone."""
    ACCOUNT.key_file(ws.root / "secrets" / "gce-sa.json")
    added = orch(*add_lines(peer, ws), cwd=ws.root)
    assert added.code == 0, added.err
    set_registration(ws, image=IMAGE_LINK)
    ws.settings_file.write_text(ws.settings_file.read_text() + "scheduler_address: 127.0.0.1\n")
    try:
        yield ws
    finally:
        peer.clear_faults()
        ACCOUNT.key_file(ws.root / "secrets" / "gce-sa.json")  # whatever a test put there
        try:
            stop_everything(ws)
        finally:
            deadline = time.monotonic() + 15
            while instances := peer.state()["instances"]:
                if time.monotonic() > deadline:
                    _delete_all(ws)  # never leave one for the next test
                    raise AssertionError(f"the peer still holds {instances}")
                time.sleep(0.2)


def _delete_all(ws: Workspace) -> None:
    driver = make_driver(ws, load_provider(ws, PROVIDER))
    for node in driver.list_nodes():
        driver.destroy_node(node)


def family(count: int, providers: str = PROVIDER, extra: str = "") -> str:
    return family_yaml(count, providers=providers) + extra


def mine(peer: GCEPeer, ws: Workspace) -> list[dict[str, Any]]:
    wid = workspace_id(ws)
    return [i for i in peer.state()["instances"] if i["labels"].get("orch-workspace") == wid]


def local_second(ws: Workspace) -> None:
    (ws.providers_dir / "local.yaml").write_text("driver: local\npriority: 20\nmax_nodes: 2\nbootstrap: false\n")


# -- end to end ----------------------------------------------------------------------------


@pytest.mark.sshd
def test_gce_end_to_end(gce_ws: Workspace, peer: GCEPeer, orch: Callable[..., Run]) -> None:
    """Register, check, plan, spawn two instances in one zone that bootstrap over SSH at
    their real addresses pinned to orch's host keys, run the primes job exactly, stop."""
    ws = gce_ws
    config = load_provider(ws, PROVIDER)
    assert config.credentials == {"key": "file:secrets/gce-sa.json"}
    assert oct((ws.root / "secrets" / "gce-sa.json").stat().st_mode & 0o777) == "0o600"
    check = orch("provider", "check", PROVIDER, "--json", cwd=ws.root)
    assert check.code == 0, check.err
    checked = json.loads(check.out)
    sizes = {s["id"]: s for s in checked["sizes"]}
    assert sorted(sizes) == ["f1-micro", "g1-small", "n1-highcpu-2", "n1-standard-1", "n1-standard-2"], \
        "machine types by name, once each (GCE lists them per zone under one id)"
    assert (sizes["n1-standard-2"]["cpus"], sizes["n1-standard-2"]["ram_mb"]) == (2, 7680), "guestCpus, memoryMb"
    assert checked["locations"] == ["europe-west1-b", "us-central1-a", "us-central1-b"], "zones by name"

    (ws.families_dir / "workers.yaml").write_text(
        family(2, extra="demands:\n  cpus: 2\n  locations: ['us-central1-b']\n"))
    plan = orch("plan", "workers", "--json")
    assert plan.code == 0, plan.err
    planned = json.loads(plan.out)
    assert [(r["provider"], r["location"]) for r in planned["requests"]] == [(PROVIDER, "us-central1-b")] * 2
    assert {r["size"] for r in planned["requests"]} <= {"n1-standard-2", "n1-highcpu-2"}

    spawned = orch("spawn", "workers", "--json")
    assert spawned.code == 0, spawned.err
    report = json.loads(spawned.out)
    assert len(report["ready"]) == 2 and report["failures"] == [], report

    wid = workspace_id(ws)
    instances = {i["labels"]["orch-node"]: i for i in mine(peer, ws)}
    assert sorted(instances) == sorted(report["ready"])
    nodes = {n["id"]: n for n in json.loads(orch("nodes", "--json").out)}
    for record in records(ws, NodeState.READY):
        instance = instances[record.id]
        assert instance["status"] == "RUNNING" and instance["zone"] == "us-central1-b"
        assert instance["name"] == record.id and instance["machineType"] == record.size, "the zone's machine type"
        assert instance["labels"] == {"orch-workspace": wid, "orch-family": "workers", "orch-node": record.id}
        assert instance["metadata"]["ssh-keys"] == f"root:{fleet_key(ws)}", "the fleet key as GCE's ssh-keys"
        assert instance["metadata"]["user-data"].startswith("#cloud-config"), "the host key in the user data"
        assert record.provider_node_id == instance["id"] and record.address == instance["address"]
        assert record.address.startswith("127.0.0.") and record.ssh_user == "root"
        offered = subprocess.run(["ssh-keyscan", "-t", "ed25519", record.address], capture_output=True,
                                 text=True, timeout=30).stdout.split()
        assert record.host_key.split()[:2] == offered[1:3], "the node offers the host key orch pinned"
        assert nodes[record.id]["path"] == f"/{PROVIDER}/us-central1-b/workers/{record.id}"
    handle = ProviderHandle(ws, load_provider(ws, PROVIDER))
    listed = {n.name: n for n in handle.driver.list_nodes()}
    assert {name: n.extra["labels"]["orch-family"] for name, n in listed.items()} == dict.fromkeys(instances, "workers")

    run_primes_job(orch)

    backing = peer.state()["backing_nodes"]
    assert sorted(backing) == sorted(instances) and all(processes_of(n["id"], n["dir"]) for n in backing.values())
    stopped = orch("stop", "workers")
    assert stopped.code == 0, stopped.err
    assert peer.state()["instances"] == [], "nothing left at the peer"
    assert [pid for n in backing.values() for pid in processes_of(n["id"], n["dir"])] == [], "no process behind"
    assert not [p for p in (peer.root / "nodes").iterdir() if not p.name.startswith(".")], "no node left"
    assert {r.state for r in records(ws)} == {NodeState.STOPPED}
    assert "agrees" in orch("reconcile").out
    assert peer.state()["tokens_issued"] >= 1, "a bearer token for the service account's signed JWT"


# -- faults ------------------------------------------------------------------------------


def _cli(ws: Workspace, *args: str) -> subprocess.CompletedProcess[str]:
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "COLUMNS": "200",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=ws.root, env=env,
                          capture_output=True, text=True, timeout=120)


def test_a_key_the_account_does_not_have_exits_3_naming_the_provider(gce_ws: Workspace, peer: GCEPeer) -> None:
    ServiceAccount.generate(PROJECT).key_file(gce_ws.root / "secrets" / "gce-sa.json")  # same email, other key
    (gce_ws.families_dir / "workers.yaml").write_text(family(1))
    for args in (["provider", "check", PROVIDER], ["spawn", "workers"]):
        result = _cli(gce_ws, *args)
        assert result.returncode == 3, (args, result.stderr)
        assert "provider 'gce' rejected the credentials: Invalid JWT Signature." in result.stderr, result.stderr
        assert "check the credential references in providers/gce.yaml" in result.stderr
        assert len([line for line in result.stderr.splitlines() if line.startswith("error")]) <= 1
        assert "Traceback" not in result.stderr + result.stdout and "internal error" not in result.stderr
    assert peer.state()["instances"] == []


def test_revoked_tokens_are_an_auth_error(gce_ws: Workspace, peer: GCEPeer) -> None:
    assert _cli(gce_ws, "provider", "check", PROVIDER).returncode == 0  # a token, cached in .orch/tokens/gce.json
    assert oct((gce_ws.runtime_dir / "tokens" / f"{PROVIDER}.json").stat().st_mode & 0o777) == "0o600"
    peer.faults(revoke_tokens=True)  # GCE answers 401 to it from now on
    result = _cli(gce_ws, "provider", "check", PROVIDER)
    assert result.returncode == 3, result.stderr
    assert "provider 'gce' rejected the credentials" in result.stderr and "providers/gce.yaml" in result.stderr
    assert "Traceback" not in result.stderr
    (gce_ws.runtime_dir / "tokens" / f"{PROVIDER}.json").unlink()  # orch's token cache: a new token then
    assert _cli(gce_ws, "provider", "check", PROVIDER).returncode == 0


def test_no_capacity_in_the_zone_fails_over_to_the_next_provider(gce_ws: Workspace, peer: GCEPeer,
                                                                 orch: Callable[..., Run]) -> None:
    ws = gce_ws
    local_second(ws)
    (ws.families_dir / "workers.yaml").write_text(
        family(1, f"{PROVIDER}, local", "demands:\n  cpus: 2\n  locations: ['us-central1-a', 'local']\n"))
    set_registration(ws, image=IMAGE_LINK, bootstrap=False)
    peer.faults(capacity=["us-central1-a"])
    spawned = orch("spawn", "workers", "--json", cwd=ws.root)
    assert spawned.code == 0, spawned.err
    report = json.loads(spawned.out)
    assert len(report["ready"]) == 1
    assert any("out of capacity" in f and "does not have enough resources" in f for f in report["failures"]), report
    assert [n["provider"] for n in json.loads(orch("nodes", "--json").out)] == ["local"]
    assert mine(peer, ws) == []
    providers = {p["name"]: p for p in json.loads(orch("provider", "list", "--json").out)}
    assert all(c.startswith("us-central1-a/") for c in providers[PROVIDER]["cooldowns"]), providers[PROVIDER]


def test_a_quota_error_cools_the_provider_down(gce_ws: Workspace, peer: GCEPeer, orch: Callable[..., Run]) -> None:
    ws = gce_ws
    local_second(ws)
    (ws.families_dir / "workers.yaml").write_text(family(2, f"{PROVIDER}, local"))
    family_link = f"https://www.googleapis.com/compute/v1/projects/{IMAGE_PROJECT}/global/images/family/{IMAGE_FAMILY}"
    set_registration(ws, image=family_link, bootstrap=False)  # (an image family's link: its latest image)
    peer.faults(quota_instances=1)
    spawned = orch("spawn", "workers", "--json", cwd=ws.root)
    assert spawned.code == 0, spawned.err
    report = json.loads(spawned.out)
    assert len(report["ready"]) == 2
    assert any("quota is used up" in f and "Quota 'INSTANCES' exceeded" in f for f in report["failures"]), report
    assert sorted(n["provider"] for n in json.loads(orch("nodes", "--json").out)) == [PROVIDER, "local"]
    assert len(mine(peer, ws)) == 1
    providers = {p["name"]: p for p in json.loads(orch("provider", "list", "--json").out)}
    assert list(providers[PROVIDER]["cooldowns"]) == ["*/*"]


def test_a_throttled_create_is_retried(gce_ws: Workspace, peer: GCEPeer, orch: Callable[..., Run]) -> None:
    ws = gce_ws
    set_registration(ws, image=IMAGE_LINK, bootstrap=False)
    (ws.families_dir / "workers.yaml").write_text(family(1))
    peer.faults(throttle=2)  # 429 rateLimitExceeded
    spawned = orch("spawn", "workers", "--json", cwd=ws.root)
    assert spawned.code == 0, spawned.err
    report = json.loads(spawned.out)
    assert len(report["ready"]) == 1 and report["failures"] == []
    with Store.open(ws.state_db) as store:
        retries = store.events(kind="provider.retry")
    assert [(e.provider, e.node) for e in retries] == [(PROVIDER, report["ready"][0])] * 2
    assert all("rateLimitExceeded" in e.reason or "Rate Limit Exceeded" in e.reason for e in retries), retries
    assert [i["labels"]["orch-node"] for i in mine(peer, ws)] == report["ready"], "one instance, not one per try"


def test_an_instance_that_stays_staging_times_out_and_is_destroyed(gce_ws: Workspace, peer: GCEPeer) -> None:
    handle = ProviderHandle(gce_ws, load_provider(gce_ws, PROVIDER))
    peer.faults(pending=1)
    with Store.open(gce_ws.state_db) as store:
        record = create_as_spawn(handle, store, "w-pending")
        assert record.state == NodeState.BOOTING and record.host_key, "the host key pinned before the create"
        with pytest.raises(ProviderError, match=r"not running after 1 s \(state pending"):
            wait_running(handle, record.provider_node_id or "", timeout=1.0)
        [instance] = mine(peer, gce_ws)
        assert instance["status"] == "STAGING"
        destroy_node(handle, store, store.get_node("w-pending"), reason="test")
        assert store.get_node("w-pending").state == NodeState.STOPPED
    assert mine(peer, gce_ws) == []


def test_a_slow_delete_is_waited_for(gce_ws: Workspace, peer: GCEPeer) -> None:
    """A delete's zonal operation stays RUNNING a while: the driver polls it until DONE,
    and orch's stop then finds the instance gone."""
    handle = ProviderHandle(gce_ws, load_provider(gce_ws, PROVIDER))
    with Store.open(gce_ws.state_db) as store:
        record = create_as_spawn(handle, store, "w-slow")
        wait_running(handle, record.provider_node_id or "", timeout=30)
        peer.faults(slow_destroy=1.0)
        started = time.monotonic()
        stopped = destroy_node(handle, store, store.get_node("w-slow"), reason="test")
        assert stopped.state == NodeState.STOPPED and time.monotonic() - started >= 1.0
    assert mine(peer, gce_ws) == []


# -- what the driver's errors mean -------------------------------------------------------------


@pytest.mark.parametrize(("error", "expected"), [
    (GoogleBaseError("The zone 'projects/p/zones/us-central1-a' does not have enough resources", 200,
                     "ZONE_RESOURCE_POOL_EXHAUSTED"), ProviderCapacityError),
    (QuotaExceededError("Quota 'CPUS' exceeded.  Limit: 8.0 in region us-central1.", 200, "QUOTA_EXCEEDED"),
     ProviderQuotaError),
    (GoogleBaseError({"message": "Rate Limit Exceeded", "reason": "rateLimitExceeded"}, 429, "rateLimitExceeded"),
     ProviderTransientError),
    (GoogleBaseError({"message": "Invalid Credentials", "reason": "authError"}, 401, "authError"),
     ProviderAuthError),
    (InvalidRequestError("Invalid value for field 'resource.name'", 400, "invalid"), ProviderError),
    (InvalidRequestError("Invalid JWT Signature.", 400, None), ProviderAuthError),  # the token endpoint's 400
    (GoogleBaseError("Backend Error", 503, "backendError"), ProviderTransientError),
])
def test_gce_errors_are_read(error: Exception, expected: type[ProviderError]) -> None:
    with pytest.raises(ProviderError) as caught, map_libcloud_errors(PROVIDER, STOCK["gce"].errors):
        raise error
    assert type(caught.value) is expected
    assert str(caught.value).startswith("provider 'gce'") and "\n" not in str(caught.value)
