"""Ansible drives the fleet through ``orch inventory``, host keys still pinned.

Four real local nodes (sshd on 127.0.0.N) are spawned once for the module through the
engine and stopped in teardown whatever happens.  Each test runs the real ``ansible``
with its own config, home, temp and ControlPath folders under tmp_path, so nothing
lands in ~/.ansible and no ssh connection is shared between tests (a multiplexed
connection would skip the host key check that the negative tests are about).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from orchestrator import fleet
from orchestrator.provision.drivers.processes import SSHD
from orchestrator.state import NodeRecord, NodeState, Store
from orchestrator.workspace import Workspace
from tests.helpers.ansible import ANSIBLE, ansible_env, close_control_masters
from tests.helpers.cli import Run
from tests.helpers.workspace import sample_workspace, stop_everything

NODES = 4

pytestmark = [
    pytest.mark.sshd,
    pytest.mark.skipif(not Path(SSHD).exists(), reason=f"OpenSSH's sshd is not installed at {SSHD}"),
    pytest.mark.skipif(not ANSIBLE.exists(), reason=f"ansible-core is missing ({ANSIBLE}): pip install -e .[dev]"),
    pytest.mark.skipif(shutil.which("ssh") is None, reason="Ansible needs OpenSSH's ssh client"),
]

Orch = Callable[..., Run]
AnsibleRun = Callable[..., dict[str, dict[str, Any]]]


@pytest.fixture(scope="module")
def fleet_ws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    """A workspace with four ready local nodes of family ``workers``."""
    ws = sample_workspace(tmp_path_factory.mktemp("ansible") / "ws")
    try:
        with Store.open(ws.state_db) as store:
            report = fleet.spawn(ws, store, "workers", count=NODES)
        assert report.ok, [str(f) for f in report.failures]
        yield ws
    finally:
        stop_everything(ws)


def ready_nodes(ws: Workspace) -> list[NodeRecord]:
    with Store.open(ws.state_db) as store:
        return store.list_nodes(family="workers", states=[NodeState.READY])


# A stdout callback that writes each host's result as one JSON line to a file: ansible-core
# itself has no JSON callback (it lives in ansible.posix), and its text output is for people.
RESULTS_CALLBACK = """\
from __future__ import annotations

import json
import os

from ansible.plugins.callback import CallbackBase


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "stdout"
    CALLBACK_NAME = "orch_results"

    def _keep(self, result, **flags):
        with open(os.environ["ORCH_ANSIBLE_RESULTS"], "a") as out:
            out.write(json.dumps({"host": result.host.get_name(), **result.result, **flags}, default=str) + "\\n")

    def v2_runner_on_ok(self, result):
        self._keep(result)

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._keep(result, failed=True)

    def v2_runner_on_unreachable(self, result):
        self._keep(result, unreachable=True)
"""


@pytest.fixture
def run_ansible(tmp_path: Path) -> Iterator[AnsibleRun]:
    """``run_ansible(inventory, module, *args)``: the real ``ansible all``; host -> its result.

    Its ControlPersist masters are closed afterwards."""
    home = tmp_path / "ansible"
    callbacks = home / "callbacks"
    callbacks.mkdir(parents=True)
    (callbacks / "orch_results.py").write_text(RESULTS_CALLBACK)
    results_file = home / "results.jsonl"
    env = ansible_env(
        home,
        ANSIBLE_CALLBACK_PLUGINS=str(callbacks),
        ANSIBLE_STDOUT_CALLBACK="orch_results",
        ANSIBLE_LOAD_CALLBACK_PLUGINS="1",
        ORCH_ANSIBLE_RESULTS=str(results_file),
    )

    def run(inventory: Path, module: str, *args: str) -> dict[str, dict[str, Any]]:
        results_file.unlink(missing_ok=True)
        done = subprocess.run([str(ANSIBLE), "all", "-i", str(inventory), "-m", module, *args],
                              env=env, capture_output=True, text=True, timeout=120, check=False)
        lines = results_file.read_text().splitlines() if results_file.exists() else []
        if not lines:
            pytest.fail(f"ansible reported no host (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
        return {entry["host"]: entry for entry in map(json.loads, lines)}

    try:
        yield run
    finally:
        close_control_masters(home / "cp")


def write_inventory(orch: Orch, ws: Workspace, path: Path, *args: str) -> dict[str, Any]:
    written = orch("--workspace", ws.root, "inventory", "--output", path, *args)
    assert written.code == 0, written.err
    loaded: dict[str, Any] = yaml.safe_load(path.read_text())
    return loaded


def test_inventory_lists_ready_nodes_with_their_pinned_keys(fleet_ws: Workspace, orch: Orch, tmp_path: Path) -> None:
    nodes = {n.id: n for n in ready_nodes(fleet_ws)}
    known_hosts = fleet_ws.runtime_dir / "known_hosts"
    known_hosts.unlink(missing_ok=True)

    printed = orch("--workspace", fleet_ws.root, "inventory", "--family", "workers")
    assert printed.code == 0, printed.err
    assert known_hosts.exists(), "orch inventory writes .orch/known_hosts every time"
    inventory = yaml.safe_load(printed.out)
    assert write_inventory(orch, fleet_ws, tmp_path / "inv.yml") == inventory

    common = inventory["all"]["vars"]["ansible_ssh_common_args"]
    assert f"-o UserKnownHostsFile={known_hosts}" in common
    assert "-o StrictHostKeyChecking=yes" in common and "-o GlobalKnownHostsFile=/dev/null" in common
    hosts = inventory["all"]["children"]["workers"]["hosts"]
    assert set(hosts) == set(nodes) and len(hosts) == NODES
    for node_id, host in hosts.items():
        node = nodes[node_id]
        assert host == {
            "ansible_host": node.address, "ansible_port": node.port, "ansible_user": node.ssh_user,
            "ansible_ssh_private_key_file": str(fleet_ws.ssh_key),
            "ansible_python_interpreter": "/usr/bin/python3", "orch_path": node.path, "orch_family": "workers",
        }
    pins = {line.split()[0]: line.split(maxsplit=1)[1] for line in known_hosts.read_text().splitlines()}
    assert pins == {f"[{n.address}]:{n.port}": n.host_key for n in nodes.values()}

    other = orch("--workspace", fleet_ws.root, "inventory", "--family", "nosuch")
    assert other.code == 0 and yaml.safe_load(other.out)["all"]["children"] == {}
    assert "no ready node" in other.err


def test_ansible_pings_every_node(fleet_ws: Workspace, orch: Orch, run_ansible: AnsibleRun, tmp_path: Path) -> None:
    inventory = tmp_path / "inv.yml"
    write_inventory(orch, fleet_ws, inventory)

    results = run_ansible(inventory, "ping")

    assert set(results) == {n.id for n in ready_nodes(fleet_ws)}
    assert {name: r.get("ping") for name, r in results.items()} == dict.fromkeys(results, "pong"), results
    # each module ran under its own node's sshd, which marks its sessions with the node's id
    facts = run_ansible(inventory, "command", "-a", "printenv ORCH_NODE_ID")
    assert {name: r.get("stdout") for name, r in facts.items()} == {
        n.id: n.provider_node_id for n in ready_nodes(fleet_ws)
    }


def _other_key() -> str:
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


@pytest.mark.parametrize("tamper", ["changed in known_hosts", "missing from known_hosts", "changed in the store"])
def test_ansible_refuses_a_node_whose_key_is_not_the_pinned_one(
    fleet_ws: Workspace, orch: Orch, run_ansible: AnsibleRun, tmp_path: Path, tamper: str
) -> None:
    inventory = tmp_path / "inv.yml"
    write_inventory(orch, fleet_ws, inventory)
    known_hosts = fleet_ws.runtime_dir / "known_hosts"
    victim = ready_nodes(fleet_ws)[0]
    entry = f"[{victim.address}]:{victim.port} "
    lines = known_hosts.read_text().splitlines()
    assert sum(line.startswith(entry) for line in lines) == 1
    original_key = victim.host_key
    try:
        if tamper == "changed in known_hosts":
            known_hosts.write_text("".join(
                (entry + _other_key() if line.startswith(entry) else line) + "\n" for line in lines))
        elif tamper == "missing from known_hosts":
            known_hosts.write_text("".join(line + "\n" for line in lines if not line.startswith(entry)))
        else:
            with Store.open(fleet_ws.state_db) as store:
                store.set_node_state(victim.id, NodeState.READY, reason="test: wrong pin", host_key=_other_key())
            write_inventory(orch, fleet_ws, inventory)  # known_hosts now carries the wrong pin

        results = run_ansible(inventory, "ping")

        refused = results[victim.id]
        assert refused.get("unreachable") is True and "ping" not in refused, refused
        assert "Host key verification failed" in refused.get("msg", ""), refused
        others = {name: r.get("ping") for name, r in results.items() if name != victim.id}
        assert others == dict.fromkeys(others, "pong") and len(others) == NODES - 1, results
    finally:
        if tamper == "changed in the store":
            with Store.open(fleet_ws.state_db) as store:
                store.set_node_state(victim.id, NodeState.READY, reason="test: pin restored", host_key=original_key)

    write_inventory(orch, fleet_ws, inventory)  # known_hosts is rebuilt from the store's pins
    again = run_ansible(inventory, "ping")
    assert {name: r.get("ping") for name, r in again.items()} == dict.fromkeys(again, "pong"), again
