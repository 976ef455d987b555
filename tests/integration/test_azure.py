"""orch on Azure Resource Manager: libcloud's stock ``azure_arm`` driver against the Azure
peer (``tests/peers/azure.py``), an HTTPS server on a loopback address of its own,
port 443, whose virtual machines are real local sshd nodes.

The provider is registered with the lines ``docs/clouds/azure.md`` gives, plus the
``cloud_environment`` option that points the driver at the peer (as one points it at
Azure Stack); the peer's self-signed certificate reaches libcloud through
``SSL_CERT_FILE`` (subprocesses) and ``libcloud.security.CA_CERTS_PATH`` (in-process).
One peer serves the module; every test leaves it with no virtual machine of its
workspace, and the module's teardown stops it by pid and proves no node survived.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import libcloud.security
import pytest

from orchestrator import fleet
from orchestrator.config import load_provider
from orchestrator.errors import ProviderError
from orchestrator.provision.handle import ProviderHandle
from orchestrator.provision.nodes import destroy_node, wait_running
from orchestrator.provision.registry import sync_registrations
from orchestrator.state import NodeState, Store
from orchestrator.workspace import Workspace
from tests.helpers.cli import Run, run_primes_job
from tests.helpers.peers import stop_peer
from tests.helpers.processes import processes_of
from tests.helpers.provision import create_as_spawn
from tests.helpers.workspace import destroy_local_nodes
from tests.peers.azure import IMAGE, AzurePeer, start_azure, unavailable

pytestmark = [pytest.mark.slow, pytest.mark.sshd]

CLIENT_ID_ENV = "ORCH_TEST_AZURE_CLIENT_ID"


@pytest.fixture(scope="module")
def azure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AzurePeer]:
    """One peer for the module, trusted by libcloud here and in orch subprocesses."""
    if (reason := unavailable()) is not None:
        pytest.skip(reason)
    peer = start_azure(tmp_path_factory.mktemp("azure-peer"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(libcloud.security, "CA_CERTS_PATH", str(peer.ca_file))
        mp.setenv("SSL_CERT_FILE", str(peer.ca_file))
        mp.setenv(CLIENT_ID_ENV, peer.client_id)
        try:
            yield peer
        finally:
            stop_peer(peer, peer.root)


def add_lines(peer: AzurePeer, secret_file: Path, *, name: str = "azure", priority: int = 10) -> list[str]:
    """``orch provider add`` as docs/clouds/azure.md gives it, pointed at the peer."""
    return ["provider", "add", name, "--driver", "azure_arm", "--priority", str(priority),
            "--option", f"tenant_id={peer.tenant}", "--option", f"subscription_id={peer.subscription}",
            "--option", "region=eastus", "--option", "ex_resource_group=orch",
            "--option", "ex_network=orch-vnet", "--option", "ex_subnet=default",
            "--option", "ex_use_managed_disks=true",
            "--option", f"cloud_environment={json.dumps(peer.cloud_environment())}",
            "--credential", f"key=env:{CLIENT_ID_ENV}", "--credential", f"secret=file:{secret_file}"]


def register(ws: Workspace, peer: AzurePeer, orch: Callable[..., Run], *, secret: str | None = None,
             name: str = "azure") -> None:
    secret_file = ws.root / "azure-secret"
    secret_file.write_text(secret if secret is not None else peer.secret_file.read_text())
    secret_file.chmod(0o600)
    added = orch(*add_lines(peer, secret_file, name=name), cwd=ws.root)
    assert added.code == 0, added.err
    path = ws.providers_dir / f"{name}.yaml"  # the image and its login user (the peer's nodes: this user)
    path.write_text(path.read_text() + f"image: {IMAGE}\nssh_user: root\n")


def family(count: int, providers: str) -> str:
    return f"release: primes\ncount: {count}\nplacement:\n  providers: [{providers}]\n"


def vms_of(peer: AzurePeer, ws: Workspace) -> list[dict[str, Any]]:
    with Store.open(ws.state_db) as store:
        wid = store.workspace_id
    return [vm for vm in peer.state()["vms"] if vm["tags"].get("orch-workspace") == wid]


@pytest.fixture
def azure_ws(ws: Workspace, azure: AzurePeer, orch: Callable[..., Run]) -> Iterator[Workspace]:
    """A workspace with provider ``azure`` (the peer) registered; afterwards every node of
    it stopped, none left at the peer, no process of its nodes behind."""
    register(ws, azure, orch)
    try:
        yield ws
    finally:
        azure.clear_faults()
        if ws.state_db.exists():
            with Store.open(ws.state_db) as store:
                live = fleet.select_nodes(store, all_nodes=True)
                if live:
                    fleet.stop(ws, store, live)
        destroy_local_nodes(ws)
        assert vms_of(azure, ws) == [], "a virtual machine of the test outlived it"


def test_provider_check_lists_azure_sizes_and_locations(azure_ws: Workspace, orch: Callable[..., Run]) -> None:
    data = load_provider(azure_ws, "azure")
    assert data.credentials["secret"].startswith("file:") and data.options["ex_resource_group"] == "orch"
    checked = orch("provider", "check", "azure", "--json", cwd=azure_ws.root)
    assert checked.code == 0, checked.err
    check = json.loads(checked.out)
    sizes = {s["id"]: s for s in check["sizes"]}
    assert {"Standard_A0", "Standard_A1", "Standard_A2", "Standard_B1s", "Standard_F4s_v2"} <= set(sizes)
    assert (sizes["Standard_A2"]["cpus"], sizes["Standard_A2"]["ram_mb"]) == (2, 3584), "numberOfCores, memoryInMB"
    assert (sizes["Standard_F4s_v2"]["cpus"], sizes["Standard_F4s_v2"]["ram_mb"]) == (4, 8192)
    assert check["locations"] == ["eastus", "westus2"]
    (azure_ws.families_dir / "workers.yaml").write_text(family(2, "azure"))
    planned = json.loads(orch("plan", "workers", "--json", cwd=azure_ws.root).out)
    assert [r["provider"] for r in planned["requests"]] == ["azure", "azure"]
    assert {r["location"] for r in planned["requests"]} <= {"eastus", "westus2"}


def test_two_vms_bootstrap_with_the_pinned_host_key_and_run_primes(
        azure_ws: Workspace, azure: AzurePeer, orch: Callable[..., Run]) -> None:
    """Azure end to end: two VMs, each a real node offering the host key orch made and
    pinned before the create (through customData), bootstrapped over SSH at its NIC's
    address; one create throttled (429, retried) and one VM slow to boot; the primes
    job's exact result; tags read back; stop leaves nothing at the peer."""
    ws = azure_ws
    (ws.families_dir / "workers.yaml").write_text(family(2, "azure"))
    ws.settings_file.write_text(ws.settings_file.read_text() + "scheduler_address: 127.0.0.1\n")
    azure.fault("throttle", on="PUT /subscriptions/")  # the first create is throttled...
    azure.fault("pending", seconds=1.5)  # ...and the first VM made boots slowly
    spawned = orch("spawn", "workers", "--json", cwd=ws.root)
    assert spawned.code == 0, spawned.err
    report = json.loads(spawned.out)
    assert len(report["ready"]) == 2 and report["failures"] == []
    with Store.open(ws.state_db) as store:
        retries = store.events(kind="provider.retry")
        ready = store.list_nodes(states=[NodeState.READY])
        wid = store.workspace_id
    assert len(retries) == 1 and "throttling us: 429" in retries[0].reason

    state = azure.state()
    vms = {vm["name"]: vm for vm in state["vms"] if vm["tags"].get("orch-workspace") == wid}
    assert sorted(vms) == sorted(r.id for r in ready)
    nics = {nic["id"]: nic for nic in state["nics"]}
    for record in ready:
        vm = vms[record.id]
        assert record.provider_node_id == vm["id"]
        assert vm["tags"] == {"orch-workspace": wid, "orch-family": "workers", "orch-node": record.id}
        assert vm["properties"]["osProfile"]["adminUsername"] == "root"
        assert vm["properties"]["storageProfile"]["osDisk"]["managedDisk"]["id"].endswith(f"/disks/{record.id}")
        nic = nics[vm["properties"]["networkProfile"]["networkInterfaces"][0]["id"]]
        address = nic["properties"]["ipConfigurations"][0]["properties"]["privateIPAddress"]
        assert record.address == address == state["nodes"][f"orch-{record.id}"]
        assert record.address.startswith("127.0.0.") and record.port == 22
        offered = subprocess.run(["ssh-keyscan", "-t", "ed25519", "-p", "22", record.address],
                                 capture_output=True, text=True, timeout=30).stdout.split()
        assert record.host_key is not None and offered[1:3] == record.host_key.split()[:2], \
            "the node offers another host key than orch pinned"

    run_primes_job(orch, cwd=ws.root)

    azure.fault("slow_destroy", seconds=2.5)  # the first VM deleted stays Deleting a while
    stopped = orch("stop", "workers", cwd=ws.root)
    assert stopped.code == 0, stopped.err
    after = azure.state()
    for record in ready:  # what destroy_node calls, in order: the VM (polled until gone), its NIC, its disk
        calls = [c for c in after["requests"] if record.id in c and not c.endswith("/InstanceView")]
        deletes = [c.split("/")[-2] for c in calls if c.startswith("DELETE ")]
        assert deletes == ["virtualMachines", "networkInterfaces", "disks"], calls
        polls = calls.index(next(c for c in calls if c.startswith("DELETE ") and "/networkInterfaces/" in c)) - \
            calls.index(next(c for c in calls if c.startswith("DELETE ") and "/virtualMachines/" in c))
        assert polls >= 2, calls  # at least one GET of the VM between its delete and its NIC's
    assert [vm for vm in after["vms"] if vm["tags"].get("orch-workspace") == wid] == []
    mine = [f"/{r.id}" for r in ready]
    assert not [n["id"] for n in after["nics"] if any(n["id"].endswith(f"{m}-nic") for m in mine)], "NICs deleted"
    assert not [d["id"] for d in after["disks"] if any(d["id"].endswith(m) for m in mine)], "OS disks deleted"
    for record in ready:
        assert processes_of(f"orch-{record.id}", azure.root / f"orch-{record.id}") == []


def test_capacity_fails_over_to_the_next_provider(azure_ws: Workspace, azure: AzurePeer,
                                                  orch: Callable[..., Run]) -> None:
    ws = azure_ws
    (ws.providers_dir / "local.yaml").write_text("driver: local\npriority: 20\nmax_nodes: 2\nbootstrap: false\n")
    (ws.families_dir / "workers.yaml").write_text(family(1, "azure, local"))
    azure.fault("capacity", count=100)  # every size in every location: SkuNotAvailable
    spawned = orch("spawn", "workers", "--json", cwd=ws.root)
    assert spawned.code == 0, spawned.err
    report = json.loads(spawned.out)
    assert len(report["ready"]) == 1
    assert any("out of capacity" in f and "SkuNotAvailable" in f for f in report["failures"])
    nodes = json.loads(orch("nodes", "--json", cwd=ws.root).out)
    assert [n["provider"] for n in nodes] == ["local"]
    assert vms_of(azure, ws) == []
    providers = {p["name"]: p for p in json.loads(orch("provider", "list", "--json", cwd=ws.root).out)}
    cooling = providers["azure"]["cooldowns"]
    assert "eastus/Standard_A0" in cooling and "westus2/Standard_F4s_v2" in cooling, "each full size cools down"
    assert "*/*" not in cooling, "capacity cools a size down, not the provider"


def test_quota_cools_the_provider_down(azure_ws: Workspace, azure: AzurePeer, orch: Callable[..., Run]) -> None:
    ws = azure_ws
    (ws.families_dir / "workers.yaml").write_text(family(1, "azure"))
    azure.fault("quota")
    spawned = orch("spawn", "workers", "--json", cwd=ws.root)
    assert spawned.code != 0
    assert "quota is used up" in spawned.out + spawned.err and "OperationNotAllowed" in spawned.out + spawned.err
    providers = {p["name"]: p for p in json.loads(orch("provider", "list", "--json", cwd=ws.root).out)}
    assert list(providers["azure"]["cooldowns"]) == ["*/*"]
    planned = orch("plan", "workers", "--json", cwd=ws.root)
    assert "azure: quota used up at the provider (cooling down)" in planned.out + planned.err
    assert vms_of(azure, ws) == []


@pytest.mark.parametrize("case", ["bad-secret", "expired-token"])
def test_rejected_credentials_exit_3_naming_the_provider(case: str, ws: Workspace, azure: AzurePeer,
                                                         orch: Callable[..., Run]) -> None:
    register(ws, azure, orch, secret="not-the-secret\n" if case == "bad-secret" else None)
    (ws.families_dir / "workers.yaml").write_text(family(1, "azure"))
    if case == "expired-token":
        azure.fault("expired", count=100)
    try:
        result = subprocess.run([sys.executable, "-m", "orchestrator", "spawn", "workers"], cwd=ws.root,
                                capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    finally:
        azure.clear_faults()
    assert result.returncode == 3, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if "rejected the credentials" in line]
    assert lines and "provider 'azure'" in lines[0], result.stderr
    assert ("AADSTS7000215" if case == "bad-secret" else "ExpiredAuthenticationToken") in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert vms_of(azure, ws) == []
    with Store.open(ws.state_db) as store:
        assert [n.state for n in store.list_nodes()] in ([], [NodeState.FAILED])


def test_a_vm_that_stays_creating_is_not_running_after_the_timeout(azure_ws: Workspace, azure: AzurePeer) -> None:
    """A VM whose provisioning never ends: wait_running gives up at its timeout, naming
    the state, and the VM is destroyed with its NIC and disk."""
    azure.fault("pending")  # Creating, for ever
    with Store.open(azure_ws.state_db) as store:
        handle = ProviderHandle(azure_ws, load_provider(azure_ws, "azure"))
        sync_registrations(store, {"azure": handle.config})
        record = create_as_spawn(handle, store, "w-stuck")
        assert record.state == NodeState.BOOTING and record.address
        with pytest.raises(ProviderError, match=r"node .*/w-stuck not running after 1 s \(state pending"):
            wait_running(handle, str(record.provider_node_id), timeout=1.0)
        destroy_node(handle, store, store.get_node("w-stuck"), reason="stuck")
    assert azure.leftovers("w-stuck") == []
