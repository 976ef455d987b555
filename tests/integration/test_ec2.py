"""orch against the EC2 API: libcloud's stock EC2 driver talking to a local moto server.

Every test starts its own moto server (and, for faults, a proxy in front of it) and
stops it by pid afterwards.  moto's instances have fake addresses, and nothing connects
to them: their registrations say ``bootstrap: false``; except behind tests/peers/ec2.py,
which backs each instance with a real node at a real address (section f).  Workspaces
keep their default ed25519 fleet key, which orch imports as one key pair per workspace.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from libcloud.common.exceptions import BaseHTTPError
from libcloud.common.types import InvalidCredsError, LibcloudError
from libcloud.compute.types import NodeState as CloudState

from orchestrator import fleet
from orchestrator.config import load_provider
from orchestrator.errors import (
    ProviderAuthError,
    ProviderCapacityError,
    ProviderError,
    ProviderQuotaError,
    ProviderTransientError,
)
from orchestrator.provision.cloud_errors import api_error_code, map_libcloud_errors
from orchestrator.provision.handle import ProviderHandle, key_pair_name
from orchestrator.provision.registry import make_driver
from orchestrator.state import NodeState, Store
from orchestrator.workspace import Workspace
from tests.helpers.cli import Run, run_primes_job
from tests.helpers.ec2_faults import FaultProxy
from tests.helpers.moto_ec2 import PRICES, MotoServer, start_moto
from tests.helpers.moto_ec2 import ec2_provider_yaml as ec2_provider
from tests.helpers.workspace import destroy_local_nodes, fleet_key, records, workspace_id
from tests.peers.ec2 import BackedEC2

pytestmark = [pytest.mark.slow]

LIVE = ("pending", "running")
Instances = Callable[..., list[dict[str, Any]]]



def family_yaml(count: int, providers: list[str]) -> str:
    return f"release: primes\ncount: {count}\nplacement:\n  providers: [{', '.join(providers)}]\n"


def stop_local_nodes(ws: Workspace) -> None:
    """Stop every node that is a real process here (EC2's die with their moto server)."""
    if ws.state_db.exists():
        with Store.open(ws.state_db) as store:
            local = [n for n in fleet.select_nodes(store, all_nodes=True) if n.provider != "aws"]
            if local:
                fleet.stop(ws, store, local)
    destroy_local_nodes(ws)


@pytest.fixture
def ec2_ws(ws: Workspace, moto_server: MotoServer) -> Iterator[Workspace]:
    """A workspace whose provider ``aws`` is the moto server; family ``workers`` (3) on it."""
    (ws.providers_dir / "aws.yaml").write_text(ec2_provider(moto_server.port))
    (ws.families_dir / "workers.yaml").write_text(family_yaml(3, ["aws"]))
    try:
        yield ws
    finally:
        stop_local_nodes(ws)


def assert_one_key_pair_is_the_fleet_key(ws: Workspace, ec2: Any) -> None:
    """moto holds exactly one key pair: the workspace's ed25519 fleet key, under orch's name."""
    pairs = ec2.describe_key_pairs(IncludePublicKey=True)["KeyPairs"]
    assert [(p["KeyName"], p["KeyType"]) for p in pairs] == \
        [(key_pair_name(workspace_id(ws), fleet_key(ws)), "ed25519")], "the fleet key is imported once"
    assert pairs[0]["PublicKey"].split()[:2] == fleet_key(ws).split()[:2]


def through_proxy(ws: Workspace, proxy: FaultProxy, **provider: Any) -> None:
    (ws.providers_dir / "aws.yaml").write_text(ec2_provider(proxy.port, **provider))


# -- (a) provider check ------------------------------------------------------------------


def test_provider_check_lists_sizes_and_locations(ec2_ws: Workspace, orch: Callable[..., Run]) -> None:
    result = orch("provider", "check", "aws", "--json", cwd=ec2_ws.root)
    assert result.code == 0, result.err
    check = json.loads(result.out)
    assert check["driver"] == "ec2moto"
    sizes = {s["id"]: s for s in check["sizes"]}
    assert {"t3.nano", "t3.micro", "m5.large", "c5.xlarge"} <= set(sizes)
    assert sizes["t3.micro"]["price"] == PRICES["t3.micro"], "the registration's price wins"
    assert sizes["m5.large"]["cpus"] == 2 and sizes["m5.large"]["ram_mb"] == 8192
    assert check["locations"] == [f"us-east-1{z}" for z in "abcdef"], "zones by name, not list positions"

    text = orch("provider", "check", "aws")
    assert text.code == 0 and "provider aws OK" in text.out and "t3.micro" in text.out


def test_rejected_credentials_exit_3_naming_the_provider(ws: Workspace, tmp_path: Path,
                                                       ec2_env: dict[str, str]) -> None:
    # A moto that checks credentials against its IAM, which knows no keys at all.
    server = start_moto(folder=tmp_path / "moto-auth", enforce_auth=True)
    try:
        (ws.providers_dir / "aws.yaml").write_text(ec2_provider(server.port))
        result = subprocess.run([sys.executable, "-m", "orchestrator", "provider", "check", "aws"], cwd=ws.root,
                                env=ec2_env, capture_output=True, text=True, timeout=120)
    finally:
        server.stop()
    assert result.returncode == 3, result.stderr
    assert "provider 'aws' rejected the credentials" in result.stderr
    assert "AuthFailure" in result.stderr and "providers/aws.yaml" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert "internal error" not in result.stderr


def test_sizes_have_their_vcpus_and_arch_and_zones_are_named(ec2_ws: Workspace, orch: Callable[..., Run],
                                                              ec2_instances: Instances) -> None:
    # The registered image (Ubuntu, x86_64) cannot boot on t4g.nano (Graviton), although
    # the registration makes it the cheapest: placement never sees it.
    with Store.open(ec2_ws.state_db) as store:
        caps = ProviderHandle(ec2_ws, load_provider(ec2_ws, "aws")).capabilities(store)
    sizes = {s.id: s for s in caps.sizes}
    assert "t4g.nano" not in sizes and "m6g.large" not in sizes, "Graviton sizes do not fit an x86_64 image"
    assert {s.arch for s in sizes.values()} == {"x86_64", None}, "None: EC2 names no processor (t1.micro)"
    assert (sizes["m5.large"].cpus, sizes["t3.nano"].cpus, sizes["t2.nano"].cpus) == (2, 2, 1), "EC2's vCPUs"
    assert (sizes["c5.xlarge"].cpus, sizes["c5.xlarge"].ram_mb) == (4, 8192)
    planned = json.loads(orch("plan", "workers", "--json", cwd=ec2_ws.root).out)
    assert len(planned["requests"]) == 3 and all(r["size"] in sizes for r in planned["requests"])
    assert {r["location"] for r in planned["requests"]} <= {f"us-east-1{z}" for z in "abcdef"}

    # Demands on vCPUs and a location glob, matched against EC2's own catalogue.
    (ec2_ws.families_dir / "workers.yaml").write_text(
        "release: primes\ncount: 2\nplacement:\n  providers: [aws]\n"
        "demands:\n  cpus: 4\n  locations: ['*-1c']\n")
    spawned = orch("spawn", "workers", "--json")
    assert spawned.code == 0, spawned.err
    nodes = json.loads(orch("nodes", "--json").out)
    assert len(nodes) == 2
    for node in nodes:
        assert node["location"] == "us-east-1c" and node["path"] == f"/aws/us-east-1c/workers/{node['id']}"
        assert sizes[node["size"]].cpus >= 4
    running = ec2_instances(workspace_id=workspace_id(ec2_ws), states=LIVE)
    assert {i["Placement"]["AvailabilityZone"] for i in running} == {"us-east-1c"}, "create_node got the zone"
    assert {i["InstanceType"] for i in running} == {n["size"] for n in nodes}
    with Store.open(ec2_ws.state_db) as store:  # targeting by resource path
        assert sorted(n.id for n in fleet.select_nodes(store, node_ids=["/aws/us-east-1c/"])) == \
            sorted(n["id"] for n in nodes)


@pytest.mark.parametrize(("error", "expected", "retried"), [
    (BaseHTTPError(500, "InsufficientInstanceCapacity: We currently do not have sufficient t3.nano capacity"),
     ProviderCapacityError, False),
    (BaseHTTPError(400, "InstanceLimitExceeded: You have requested more instances (1) than your limit"),
     ProviderQuotaError, False),
    (BaseHTTPError(503, "RequestLimitExceeded: Request limit exceeded."), ProviderTransientError, True),
    (BaseHTTPError(400, "Throttling: Rate exceeded"), ProviderTransientError, True),
    (BaseHTTPError(500, "InternalError: An internal error has occurred"), ProviderTransientError, True),
    (BaseHTTPError(502, "<html>Bad Gateway</html>"), ProviderTransientError, True),
    (BaseHTTPError(400, "InvalidParameterValue: Value (x) for parameter instanceType is invalid"),
     ProviderError, False),
    (BaseHTTPError(400, "InvalidKeyPair.Duplicate: The keypair 'k' already exists."), ProviderError, False),
    (LibcloudError("InsufficientInstanceCapacity: none left"), ProviderCapacityError, False),
    (InvalidCredsError("AuthFailure: AWS was not able to validate the provided access credentials"),
     ProviderAuthError, False),
])
def test_ec2_error_codes_are_read(error: Exception, expected: type[ProviderError], retried: bool) -> None:
    with pytest.raises(ProviderError) as caught, map_libcloud_errors("aws"):
        raise error
    assert type(caught.value) is expected
    assert isinstance(caught.value, ProviderTransientError) is retried
    text = str(caught.value)
    assert text.startswith("provider 'aws'") and "\n" not in text
    code = api_error_code(error)
    assert code is None or code in text


def test_an_orphan_past_the_hundredth_instance_is_found(ec2_ws: Workspace, orch: Callable[..., Run], ec2: Any,
                                                       ec2_instances: Instances) -> None:
    # moto pages DescribeInstances at 100 reservations where AWS answers in full; the
    # adapter asks for every result, or orch would not see this orphan at all.
    assert orch("provider", "check", "aws", cwd=ec2_ws.root).code == 0  # makes the store
    for _ in range(100):
        ec2.run_instances(ImageId=load_provider(ec2_ws, "aws").image, MinCount=1, MaxCount=1, InstanceType="t3.nano")
    wid = workspace_id(ec2_ws)
    tags = [{"Key": "orch-workspace", "Value": wid}, {"Key": "orch-family", "Value": "workers"},
            {"Key": "orch-node", "Value": "workers-ghost"}]
    ec2.run_instances(ImageId=load_provider(ec2_ws, "aws").image, MinCount=1, MaxCount=1, InstanceType="t3.nano",
                      TagSpecifications=[{"ResourceType": "instance", "Tags": tags}])
    dry = json.loads(orch("reconcile", "--json").out)
    assert dry["orphans"] == ["workers-ghost"]
    applied = json.loads(orch("reconcile", "--apply", "--json").out)
    assert applied["orphans"] == ["workers-ghost"]
    assert [i["State"]["Name"] for i in ec2_instances(workspace_id=wid)] == ["terminated"]
    assert "agrees" in orch("reconcile").out


# -- (b) spawn and stop ------------------------------------------------------------------


def test_spawn_creates_tagged_instances_with_the_fleet_key(ec2_ws: Workspace, orch: Callable[..., Run],
                                                           ec2: Any, ec2_instances: Instances) -> None:
    spawned = orch("spawn", "workers", "--json", cwd=ec2_ws.root)
    assert spawned.code == 0, spawned.err
    report = json.loads(spawned.out)
    assert report["ok"] and len(report["ready"]) == 3

    wid = workspace_id(ec2_ws)
    running = ec2_instances(workspace_id=wid, states=LIVE)
    by_node = {i["TagMap"]["orch-node"]: i for i in running}
    assert sorted(by_node) == sorted(report["ready"])
    for node_id, instance in by_node.items():
        assert instance["TagMap"] == {"Name": node_id, "orch-workspace": wid, "orch-family": "workers",
                                     "orch-node": node_id}
        assert instance["ImageId"] == load_provider(ec2_ws, "aws").image

    assert_one_key_pair_is_the_fleet_key(ec2_ws, ec2)
    assert {i["KeyName"] for i in running} == {key_pair_name(wid, fleet_key(ec2_ws))}
    assert "Warning" not in spawned.err

    nodes = json.loads(orch("nodes", "--json").out)
    assert sorted(n["id"] for n in nodes) == sorted(report["ready"])
    assert all(n["state"] == "ready" and n["provider"] == "aws" for n in nodes)
    assert {r.provider_node_id for r in records(ec2_ws, NodeState.READY)} == {i["InstanceId"] for i in running}
    assert "agrees" in orch("reconcile").out


def test_parallel_creates_import_the_fleet_key_without_failed_attempts(
        ec2_ws: Workspace, fault_proxy: FaultProxy, orch: Callable[..., Run], ec2: Any) -> None:
    through_proxy(ec2_ws, fault_proxy)
    with fault_proxy.faults.lock:  # a slow key import and slow creates: the three creates surely overlap
        fault_proxy.faults.latency.update({"DescribeKeyPairs": 0.3, "ImportKeyPair": 0.3, "RunInstances": 0.2})
    spawned = orch("spawn", "workers", "--json", cwd=ec2_ws.root)
    assert spawned.code == 0, spawned.err
    report = json.loads(spawned.out)
    assert report["failures"] == [] and len(report["created"]) == 3
    assert fault_proxy.calls.count("ImportKeyPair") == 1 and fault_proxy.calls.count("RunInstances") == 3
    assert_one_key_pair_is_the_fleet_key(ec2_ws, ec2)

    # Another command imports under the same name: "already exists" is ours, not a failure.
    (ec2_ws.families_dir / "workers.yaml").write_text(family_yaml(4, ["aws"]))
    grown = orch("spawn", "workers", "--json")
    assert grown.code == 0, grown.err
    assert json.loads(grown.out)["failures"] == [] and len(json.loads(grown.out)["ready"]) == 4
    assert fault_proxy.calls.count("ImportKeyPair") == 2
    assert_one_key_pair_is_the_fleet_key(ec2_ws, ec2)


def test_stop_terminates_the_instances(ec2_ws: Workspace, orch: Callable[..., Run], ec2_instances: Instances) -> None:
    (ec2_ws.families_dir / "workers.yaml").write_text(family_yaml(2, ["aws"]))
    assert orch("spawn", "workers", "-q", cwd=ec2_ws.root).code == 0
    wid = workspace_id(ec2_ws)
    made = {i["InstanceId"] for i in ec2_instances(workspace_id=wid)}
    assert len(made) == 2

    stopped = orch("stop", "workers")
    assert stopped.code == 0, stopped.err
    assert {i["InstanceId"]: i["State"]["Name"] for i in ec2_instances(workspace_id=wid)} == \
        dict.fromkeys(made, "terminated")
    driver = make_driver(ec2_ws, load_provider(ec2_ws, "aws"))
    assert [n for n in driver.list_nodes() if n.state == CloudState.RUNNING] == []
    assert {r.state for r in records(ec2_ws)} == {NodeState.STOPPED}
    assert "agrees" in orch("reconcile").out, "terminated instances are gone, not orphans"
    assert {i["State"]["Name"] for i in ec2_instances(workspace_id=wid)} == {"terminated"}


def test_the_default_ed25519_fleet_key_works_for_more_than_one_node(ws: Workspace, moto_server: MotoServer,
                                                                    orch: Callable[..., Run], ec2: Any,
                                                                    ec2_instances: Instances) -> None:
    (ws.providers_dir / "aws.yaml").write_text(ec2_provider(moto_server.port))
    (ws.families_dir / "workers.yaml").write_text(
        "release: primes\ncount: 2\nplacement:\n  providers: [aws]\nbootstrap:\n  strategy: rolling\n"
        "  batch_size: 1\n  retries: 1\n")
    assert fleet_key(ws).startswith("ssh-ed25519 ")
    spawned = orch("spawn", "workers", "--json", cwd=ws.root)
    assert spawned.code == 0, spawned.err
    report = json.loads(spawned.out)
    assert report["failures"] == [] and len(report["ready"]) == 2 and len(report["created"]) == 2
    assert_one_key_pair_is_the_fleet_key(ws, ec2)
    running = ec2_instances(workspace_id=workspace_id(ws), states=LIVE)
    assert {i["KeyName"] for i in running} == {key_pair_name(workspace_id(ws), fleet_key(ws))}
    assert len(running) == 2


# -- (c, d, e) faults through the proxy --------------------------------------------------


def test_a_capacity_error_cools_the_size_down_and_lands_on_the_next_size(
        ec2_ws: Workspace, fault_proxy: FaultProxy, orch: Callable[..., Run], ec2_instances: Instances) -> None:
    through_proxy(ec2_ws, fault_proxy)
    (ec2_ws.families_dir / "workers.yaml").write_text(family_yaml(2, ["aws"]))
    planned = json.loads(orch("plan", "workers", "--json", cwd=ec2_ws.root).out)
    first = planned["requests"][0]
    cheapest, location = first["size"], first["location"]
    with fault_proxy.faults.lock:  # that size is out of capacity; the failing call still makes an instance
        fault_proxy.faults.capacity_types = {cheapest}
        fault_proxy.faults.partial = True

    spawned = orch("spawn", "workers", "--json")
    assert spawned.code == 0, spawned.err
    report = json.loads(spawned.out)
    assert len(report["ready"]) == 2
    assert any("out of capacity" in f and "InsufficientInstanceCapacity" in f for f in report["failures"])
    assert "InsufficientInstanceCapacity" in fault_proxy.injected_codes()
    nodes = json.loads(orch("nodes", "--json").out)
    assert len(nodes) == 2 and all(n["provider"] == "aws" and n["size"] != cheapest for n in nodes)

    wid = workspace_id(ec2_ws)
    partial = [i for i in ec2_instances(workspace_id=wid) if i["InstanceType"] == cheapest]
    assert partial, "the failing calls made instances (partial=True)"
    assert {i["State"]["Name"] for i in partial} == {"terminated"}, "partial creates are torn down"
    running = ec2_instances(workspace_id=wid, states=LIVE)
    assert sorted(i["TagMap"]["orch-node"] for i in running) == sorted(n["id"] for n in nodes)

    providers = {p["name"]: p for p in json.loads(orch("provider", "list", "--json").out)}
    assert f"{location}/{cheapest}" in providers["aws"]["cooldowns"]
    again = json.loads(orch("plan", "workers", "--count", "3", "--json").out)
    assert [r["size"] for r in again["requests"]] != [cheapest]
    assert f"aws/{location}/{cheapest}: unavailable (cooling down after a capacity error)" in again["rejected"]
    text = orch("plan", "workers", "--count", "3")
    assert "cooling down" in text.out


def test_throttled_creates_are_retried_and_recorded(ec2_ws: Workspace, fault_proxy: FaultProxy,
                                                    orch: Callable[..., Run], ec2_instances: Instances) -> None:
    through_proxy(ec2_ws, fault_proxy)
    (ec2_ws.families_dir / "workers.yaml").write_text(family_yaml(1, ["aws"]))
    with fault_proxy.faults.lock:
        fault_proxy.faults.throttle_next = 2  # the next two RunInstances calls

    spawned = orch("spawn", "workers", "--json", cwd=ec2_ws.root)
    assert spawned.code == 0, spawned.err
    report = json.loads(spawned.out)
    assert len(report["ready"]) == 1 and report["failures"] == []
    assert fault_proxy.injected_codes() == ["RequestLimitExceeded"] * 2
    with Store.open(ec2_ws.state_db) as store:
        retries = store.events(kind="provider.retry")
    assert [(e.provider, e.node) for e in retries] == [("aws", report["ready"][0])] * 2
    assert all("RequestLimitExceeded" in e.reason for e in retries)
    running = ec2_instances(workspace_id=workspace_id(ec2_ws), states=LIVE)
    assert [i["TagMap"]["orch-node"] for i in running] == report["ready"], "one instance, not one per try"


def test_a_quota_error_cools_the_provider_down_and_the_rest_goes_to_the_next(
        ec2_ws: Workspace, fault_proxy: FaultProxy, orch: Callable[..., Run], ec2_instances: Instances) -> None:
    through_proxy(ec2_ws, fault_proxy, priority=10)
    # The next provider: nodes on this machine (provisioned only, to keep the test short).
    (ec2_ws.providers_dir / "local.yaml").write_text(
        "driver: local\nlabels: [private]\npriority: 20\nmax_nodes: 3\nbootstrap: false\n")
    (ec2_ws.families_dir / "workers.yaml").write_text(family_yaml(4, ["aws", "local"]))
    with fault_proxy.faults.lock:
        fault_proxy.faults.instance_limit = 2  # the account's instance quota

    spawned = orch("spawn", "workers", "--json", cwd=ec2_ws.root)
    assert spawned.code == 0, spawned.err
    report = json.loads(spawned.out)
    assert len(report["ready"]) == 4
    assert any("quota is used up" in f and "InstanceLimitExceeded" in f for f in report["failures"])
    assert "InstanceLimitExceeded" in fault_proxy.injected_codes()
    nodes = json.loads(orch("nodes", "--json").out)
    assert sorted(n["provider"] for n in nodes) == ["aws", "aws", "local", "local"]
    running = ec2_instances(workspace_id=workspace_id(ec2_ws), states=LIVE)
    assert sorted(i["TagMap"]["orch-node"] for i in running) == sorted(n["id"] for n in nodes if n["provider"] == "aws")

    providers = {p["name"]: p for p in json.loads(orch("provider", "list", "--json").out)}
    assert list(providers["aws"]["cooldowns"]) == ["*/*"]
    planned = json.loads(orch("plan", "workers", "--count", "5", "--json").out)
    assert [r["provider"] for r in planned["requests"]] == ["local"]
    assert "aws: quota used up at the provider (cooling down)" in planned["rejected"]


# -- (f) real nodes: bootstrapped, pinned to orch's host key, running C work ---------------


@pytest.mark.sshd
def test_instances_are_real_nodes_that_bootstrap_and_run_a_job(
        ws: Workspace, backed_ec2: BackedEC2, orch: Callable[..., Run], ec2_instances: Instances) -> None:
    """EC2 end to end: each instance boots with the host key orch made (its record holds it
    before the create, and the node offers exactly it), is bootstrapped over SSH at its
    real address, and runs the primes job with the exact result; stop terminates them all."""
    (ws.providers_dir / "aws.yaml").write_text(ec2_provider(backed_ec2.port, backed=True))
    (ws.families_dir / "workers.yaml").write_text(family_yaml(2, ["aws"]))
    ws.settings_file.write_text(ws.settings_file.read_text() + "scheduler_address: 127.0.0.1\n")
    spawned = orch("spawn", "workers", "--json", cwd=ws.root)
    assert spawned.code == 0, spawned.err
    assert len(json.loads(spawned.out)["ready"]) == 2

    ready = records(ws, NodeState.READY)
    assert sorted(r.provider_node_id for r in ready) == sorted(backed_ec2.addresses)
    for record in ready:
        node = backed_ec2.backing.node(record.provider_node_id)
        assert node is not None
        assert record.address == node.public_ips[0] == backed_ec2.addresses[record.provider_node_id]
        assert record.host_key == node.extra["host_key"], "the node offers another host key than orch pinned"
        assert record.ssh_user == "root"
    run_primes_job(orch, cwd=ws.root)

    stopped = orch("stop", "workers", cwd=ws.root)
    assert stopped.code == 0, stopped.err
    assert ec2_instances(workspace_id=workspace_id(ws), states=LIVE) == []
    assert backed_ec2.backing.driver.list_nodes() == [] and backed_ec2.addresses == {}
