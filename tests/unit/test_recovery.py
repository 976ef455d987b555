"""Recovery (orchestrator/provision/recovery.py, ``recover``): settling the store against
the providers' ``list_nodes`` after a killed ``orch``, a vanished machine, or a node
destroyed behind orch's back.

The providers are real: libcloud's stock EC2 driver (the moto adapter of
``tests/helpers/moto_ec2.py``) talking to one local moto server for the module, stopped by
its pid at the end.  Provider ``b`` is its us-west-2 and provider ``a`` another region,
a new one for each test while they last (moto keeps each region's instances apart, as EC2
does, and lists terminated ones for good: short listings keep the module fast).  Every
test has its own workspace, so it sees the other tests' instances only as another
workspace's.  Instances are made,
stopped and terminated through the driver, carrying orch's tags as ``create_node`` tags
them; moto's addresses are made up and nothing connects to them (recovery does not).

Each test states the exact outcome: the ``Recovery`` lists in order, the ``on_change``
messages, the store's node states and the events (with reasons) that got them there,
and which instances were terminated.  ``settle`` runs ``recover`` dry first, proving the
dry run changes nothing (store and provider) and announces, with "would be ", what the
real run then does.  Written to kill the mutants of docs/mutation.md's recovery group.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from libcloud.compute.base import Node

from orchestrator.config import load_provider
from orchestrator.errors import ProviderError
from orchestrator.provision.handle import ProviderHandle
from orchestrator.provision.recovery import Recovery, recover
from orchestrator.provision.tags import TAG_FAMILY, TAG_NODE, TAG_WORKSPACE, tag_arguments
from orchestrator.state import NodeRecord, NodeState, Store
from orchestrator.workspace import Workspace
from tests.helpers.ec2_faults import FaultProxy
from tests.helpers.moto_ec2 import (
    FAKE_CREDENTIALS,
    PLUGIN,
    UBUNTU_AMI,
    MotoServer,
    ec2_provider_yaml,
    start_moto,
)

S = NodeState
PROVIDERS = ("a", "b")
B_REGION = "us-west-2"
A_REGIONS = itertools.cycle(("us-east-1", "us-east-2", "us-west-1", "eu-west-1", "eu-west-2", "eu-west-3",
                             "eu-central-1", "eu-north-1", "ap-northeast-1", "ap-northeast-2", "ap-southeast-1",
                             "ap-southeast-2", "ap-south-1", "ca-central-1", "sa-east-1"))
"""Provider ``a``'s region, the next for each test's workspace."""
SIZE = "t3.nano"
# The moves that bring a new (requested) record to each state.
PATHS: dict[NodeState, tuple[NodeState, ...]] = {
    S.REQUESTED: (),
    S.CREATING: (S.CREATING,),
    S.BOOTING: (S.CREATING, S.BOOTING),
    S.BOOTSTRAPPING: (S.CREATING, S.BOOTING, S.BOOTSTRAPPING),
    S.READY: (S.CREATING, S.BOOTING, S.READY),
    S.STOPPING: (S.CREATING, S.BOOTING, S.READY, S.STOPPING),
    S.FAILED: (S.CREATING, S.BOOTING, S.FAILED),
    S.LOST: (S.CREATING, S.BOOTING, S.READY, S.LOST),
    S.STOPPED: (S.CREATING, S.BOOTING, S.READY, S.STOPPING, S.STOPPED),
}
Event = tuple[str | None, str, str]
"""An event as the tests compare them: (node, kind, reason)."""


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """One moto server for the module, with the environment its providers need (the
    ``ec2moto`` plugin, fake credentials); stopped by its pid afterwards."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ORCH_DRIVER_PLUGINS", PLUGIN)
        for key, value in FAKE_CREDENTIALS.items():
            patch.setenv(key, value)
        patch.delenv("AWS_SESSION_TOKEN", raising=False)
        server = start_moto(folder=tmp_path_factory.mktemp("moto"))
        try:
            yield server
        finally:
            server.stop()
            assert server.process.poll() is not None, "moto_server survived its stop"


def provider_yaml(port: int, region: str) -> str:
    data = json.loads(ec2_provider_yaml(port))
    data["options"]["region"] = region
    return json.dumps(data) + "\n"


class World:
    """A workspace whose providers ``a`` and ``b`` are EC2 regions on the moto server
    (or, for ``a``, a fault proxy in front of it), with helpers that make instances and
    records the way an interrupted ``orch`` leaves them."""

    def __init__(self, root: Path, moto_port: int, *, ports: dict[str, int] | None = None) -> None:
        self.ws = Workspace.init(root)
        for name, region in (("a", next(A_REGIONS)), ("b", B_REGION)):
            port = (ports or {}).get(name, moto_port)
            (self.ws.providers_dir / f"{name}.yaml").write_text(provider_yaml(port, region))
        self.store = Store.open(self.ws.state_db)
        self.handles = {name: ProviderHandle(self.ws, load_provider(self.ws, name)) for name in PROVIDERS}
        self.launched: dict[str, list[str]] = {name: [] for name in PROVIDERS}

    def close(self) -> None:
        self.store.close()

    # -- the provider ---------------------------------------------------------------------

    def launch(self, provider: str, node_id: str | None, *, state: str = "running",
               workspace: str | None = None) -> str:
        """An instance tagged as orch tags its nodes (``node_id`` None: no orch-node tag),
        then stopped or terminated when ``state`` says; returns its instance id."""
        handle = self.handles[provider]
        cat = handle.catalogue()
        tags = {TAG_WORKSPACE: workspace or self.store.workspace_id, TAG_FAMILY: "w"}
        if node_id is not None:
            tags[TAG_NODE] = node_id
        node = handle.driver.create_node(name=node_id or "untagged", size=cat["sizes"][SIZE],
                                         image=cat["images"][UBUNTU_AMI], **tag_arguments(handle.features, tags))
        if state == "stopped":
            assert handle.driver.ex_stop_node(node)
        elif state == "terminated":
            assert handle.driver.destroy_node(node)
        else:
            assert state == "running", state
        self.launched[provider].append(str(node.id))
        return str(node.id)

    def listed(self, provider: str, instance: str) -> Node:
        node: Node = next(n for n in self.handles[provider].driver.list_nodes() if str(n.id) == instance)
        return node

    def statuses(self) -> dict[str, str]:
        """Every instance this world launched: its EC2 state as the provider lists it."""
        found = {}
        for provider, instances in self.launched.items():
            for node in self.handles[provider].driver.list_nodes() if instances else []:
                if str(node.id) in instances:
                    found[str(node.id)] = str(node.extra["status"])
        assert sorted(found) == sorted(i for ids in self.launched.values() for i in ids)
        return found

    # -- the store ------------------------------------------------------------------------

    def record(self, node_id: str, state: NodeState, *, provider: str = "a",
               instance: str | None = None) -> NodeRecord:
        """A record in ``state`` (reached along legal moves), naming ``instance`` as its
        provider node id when given."""
        fields: dict[str, Any] = {"provider_node_id": instance} if instance is not None else {}
        record = self.store.add_node(node_id, family="w", provider=provider, **fields)
        for step in PATHS[state]:
            record = self.store.set_node_state(node_id, step, reason=f"test: {step}")
        return record

    def last_event(self) -> int:
        return max((e.id for e in self.store.events(limit=1_000_000)), default=0)

    def events_since(self, mark: int) -> list[Event]:
        return [(e.node, e.kind, e.reason) for e in self.store.events(after=mark)]

    def states(self) -> dict[str, tuple[NodeState, str]]:
        return {r.id: (r.state, r.reason) for r in self.store.list_nodes()}

    def snapshot(self) -> tuple[object, ...]:
        """Everything recovery could change: the records, the events, the instances."""
        return self.store.list_nodes(), self.store.events(limit=1_000_000), self.statuses()

    # -- recovery -------------------------------------------------------------------------

    def run(self, *, apply: bool = True) -> tuple[Recovery, list[str]]:
        messages: list[str] = []
        outcome = recover(self.store, self.handles, self.store.list_nodes(), apply=apply,
                          on_change=messages.append)
        return outcome, messages

    def settle(self) -> tuple[Recovery, list[str]]:
        """``recover`` dry (it must change nothing and announce, with "would be ", what
        follows), then applied: the applied outcome and messages."""
        before = self.snapshot()
        dry, dry_messages = self.run(apply=False)
        assert self.snapshot() == before, "a dry run changed the store or the provider"
        outcome, messages = self.run()
        assert dry == outcome, "the dry run's outcome differs from the applied one"
        assert all("would be " in m for m in dry_messages)
        assert [m.replace("would be ", "") for m in dry_messages] == messages
        return outcome, messages


@pytest.fixture
def world(tmp_path: Path, moto: MotoServer) -> Iterator[World]:
    made = World(tmp_path / "ws", moto.port)
    try:
        yield made
    finally:
        made.close()


def lists(outcome: Recovery) -> tuple[list[str], list[str], list[str], list[str]]:
    return outcome.adopted, outcome.vanished, outcome.orphans, outcome.down


# -- orphans ---------------------------------------------------------------------------------


def test_tagged_nodes_no_live_record_wants_are_destroyed_as_orphans(world: World) -> None:
    """A node with no record, one whose record is stopped, and one whose live record is
    on the other provider are orphans at ``a`` and destroyed; the record on ``b`` is then
    not at ``b``, and settled (it never got ready)."""
    none = world.launch("a", "o1-no-record")
    stopped = world.launch("a", "o2-stopped-record")
    world.record("o2-stopped-record", S.STOPPED, instance=stopped)
    elsewhere = world.launch("a", "o3-record-on-b")
    world.record("o3-record-on-b", S.BOOTING, provider="b", instance=elsewhere)
    mark = world.last_event()

    outcome, messages = world.settle()

    assert lists(outcome) == ([], ["o3-record-on-b"], ["o1-no-record", "o2-stopped-record", "o3-record-on-b"], [])
    assert outcome.changes == 4
    assert messages == [
        "o1-no-record: orphan on a destroyed",
        "o2-stopped-record: orphan on a destroyed",
        "o3-record-on-b: orphan on a destroyed",
        "o3-record-on-b: not at b; settled",
    ]
    assert world.statuses() == {none: "terminated", stopped: "terminated", elsewhere: "terminated"}
    assert world.events_since(mark) == [
        ("o3-record-on-b", "node.failed", "never got ready; b no longer lists it"),
        ("o3-record-on-b", "node.stopped", "not at the provider"),
    ]
    assert world.states()["o2-stopped-record"] == (S.STOPPED, "test: stopped")


# -- interrupted stops -----------------------------------------------------------------------


def test_an_interrupted_stop_destroys_the_listed_node_whatever_id_the_record_holds(world: World) -> None:
    """A stopping record's tagged node is destroyed even when the record never learnt
    its id or holds another one (recovery gives it the listed node's id), and the record
    ends stopped with the reason that says recovery finished it."""
    unknown = world.launch("a", "s1-no-id")
    world.record("s1-no-id", S.STOPPING)
    stale = world.launch("a", "s2-stale-id", state="stopped")
    world.record("s2-stale-id", S.STOPPING, instance="i-0123456789abcdef0")
    known = world.launch("a", "s3-its-id")
    world.record("s3-its-id", S.STOPPING, instance=known)
    mark = world.last_event()

    outcome, messages = world.settle()

    assert lists(outcome) == ([], [], ["s1-no-id", "s2-stale-id", "s3-its-id"], [])
    assert messages == [
        "s1-no-id: was stopping on a; destroyed",
        "s2-stale-id: was stopping on a; destroyed",
        "s3-its-id: was stopping on a; destroyed",
    ]
    assert world.statuses() == {unknown: "terminated", stale: "terminated", known: "terminated"}
    reason = "stop interrupted; finished by recovery"
    assert world.events_since(mark) == [
        ("s1-no-id", "node.stopped", reason),
        ("s2-stale-id", "node.stopped", reason),
        ("s3-its-id", "node.stopped", reason),
    ]
    assert world.states() == {n: (S.STOPPED, reason) for n in ("s1-no-id", "s2-stale-id", "s3-its-id")}


# -- half-made nodes -------------------------------------------------------------------------


def test_a_node_that_never_got_ready_and_is_stopped_is_destroyed(world: World) -> None:
    """Records requested, creating, booting or bootstrapping whose node the provider
    lists stopped (a create killed half-way): the node is destroyed and the record goes
    failed (saying what the provider reported), then stopped."""
    instances = {}
    for node_id, state in (("h1-requested", S.REQUESTED), ("h2-creating", S.CREATING),
                           ("h3-booting", S.BOOTING), ("h4-bootstrapping", S.BOOTSTRAPPING)):
        instances[node_id] = world.launch("a", node_id, state="stopped")
        world.record(node_id, state, instance=instances[node_id] if state in (S.BOOTING, S.BOOTSTRAPPING) else None)
    mark = world.last_event()

    outcome, messages = world.settle()

    assert lists(outcome) == ([], [], [], list(instances))
    assert messages == [f"{n}: never got ready and a reports it stopped; destroyed" for n in instances]
    assert world.statuses() == {i: "terminated" for i in instances.values()}
    assert world.events_since(mark) == [event for n in instances for event in (
        (n, "node.failed", "never got ready; a reports it stopped"),
        (n, "node.stopped", "destroyed by recovery"),
    )]
    assert world.states() == {n: (S.STOPPED, "destroyed by recovery") for n in instances}


def test_a_half_made_node_still_listed_after_its_destroy_is_an_error(tmp_path: Path, moto: MotoServer) -> None:
    """When the provider acknowledges the destroy but still lists the node (a fault proxy
    that answers TerminateInstances without passing it on), recovery stops with a
    ProviderError naming the provider and the node, and the record is left as it was."""
    with FaultProxy(moto.port) as proxy:
        world = World(tmp_path / "ws", moto.port, ports={"a": proxy.port})
        try:
            instance = world.launch("a", "h1-booting", state="stopped")
            world.record("h1-booting", S.BOOTING, instance=instance)
            mark = world.last_event()
            proxy.faults.unheeded_terminations = True
            messages: list[str] = []
            with pytest.raises(ProviderError) as caught:
                recover(world.store, world.handles, world.store.list_nodes(), on_change=messages.append)
            assert (caught.value.message, caught.value.hint) == (
                "provider 'a' still lists node h1-booting after destroy", "run `orch reconcile --apply` again")
            assert proxy.injected_codes() == ["unheeded"], "the destroy was asked for, once"
            assert messages == []
            assert world.events_since(mark) == []
            assert world.states() == {"h1-booting": (S.BOOTING, "test: booting")}
            assert world.statuses() == {instance: "stopped"}
        finally:
            world.close()


# -- adoption --------------------------------------------------------------------------------


def test_live_nodes_of_records_being_created_or_without_an_id_are_adopted(world: World) -> None:
    """A record requested or creating (whatever id it holds) whose node runs is adopted
    booting, with the listed node's id and address; a booting or ready record that never
    learnt its node's id is adopted in its state."""
    made = {
        "a1-requested": (S.REQUESTED, None),
        "a2-creating-stale-id": (S.CREATING, "i-0123456789abcdef0"),
        "a3-booting-no-id": (S.BOOTING, None),
        "a4-ready-no-id": (S.READY, None),
    }
    instances = {}
    for node_id, (state, held) in made.items():
        instances[node_id] = world.launch("a", node_id)
        world.record(node_id, state, instance=held)
    mark = world.last_event()

    outcome, messages = world.settle()

    assert lists(outcome) == (list(made), [], [], [])
    assert messages == [f"{n}: adopted from a" for n in made]
    assert world.statuses() == {i: "running" for i in instances.values()}
    assert world.events_since(mark) == [
        ("a1-requested", "node.creating", "created on a; found by its tag"),
        ("a1-requested", "node.booting", f"a node {instances['a1-requested']}"),
        ("a2-creating-stale-id", "node.booting", f"a node {instances['a2-creating-stale-id']}"),
    ]
    expected_states = {"a1-requested": S.BOOTING, "a2-creating-stale-id": S.BOOTING,
                       "a3-booting-no-id": S.BOOTING, "a4-ready-no-id": S.READY}
    for node_id, instance in instances.items():
        record = world.store.get_node(node_id)
        listed = world.listed("a", instance)
        assert (record.state, record.reason, record.provider_node_id) == (
            expected_states[node_id], f"a node {instance}", instance)
        assert record.address == listed.public_ips[0]


# -- lost, and left alone --------------------------------------------------------------------


def test_a_ready_node_not_running_is_marked_lost_and_live_pairs_are_left_alone(world: World) -> None:
    """A ready record whose node is stopped is marked lost, naming the state (the node
    is kept: someone may start it); records whose node is as they say (ready and
    running, booting or failed with their node's id, lost with a stopped node) are left
    alone, and so are their nodes."""
    stopped = world.launch("a", "l1-ready-stopped", state="stopped")
    world.record("l1-ready-stopped", S.READY, instance=stopped)
    kept = {}
    for node_id, state, status in (("l2-ready-running", S.READY, "running"),
                                   ("l3-booting-running", S.BOOTING, "running"),
                                   ("l4-bootstrapping-running", S.BOOTSTRAPPING, "running"),
                                   ("l5-failed-running", S.FAILED, "running"),
                                   ("l6-lost-stopped", S.LOST, "stopped")):
        kept[node_id] = world.launch("a", node_id, state=status)
        world.record(node_id, state, instance=kept[node_id])
    before = world.states()
    mark = world.last_event()

    outcome, messages = world.settle()

    assert lists(outcome) == ([], [], [], ["l1-ready-stopped"])
    assert outcome.changes == 1
    assert messages == ["l1-ready-stopped: a reports it stopped; marked lost"]
    assert world.events_since(mark) == [("l1-ready-stopped", "node.lost", "a reports it stopped")]
    assert world.states() == {**before, "l1-ready-stopped": (S.LOST, "a reports it stopped")}
    assert world.statuses() == {stopped: "stopped", **{
        i: ("stopped" if n == "l6-lost-stopped" else "running") for n, i in kept.items()}}


# -- records the provider does not list ------------------------------------------------------


def test_records_the_provider_does_not_list_are_settled_by_state(world: World) -> None:
    """Records at ``a`` with no node there: never created ones (requested, creating)
    and those that never got ready (booting, bootstrapping) go failed then stopped,
    stopping and failed ones stopped, a ready one lost; a lost one is skipped (and the
    records after it still settled)."""
    for node_id, state in (("v1-requested", S.REQUESTED), ("v2-creating", S.CREATING),
                           ("v3-lost", S.LOST), ("v4-stopping", S.STOPPING), ("v5-failed", S.FAILED),
                           ("v6-booting", S.BOOTING), ("v7-bootstrapping", S.BOOTSTRAPPING),
                           ("v8-ready", S.READY)):
        world.record(node_id, state, instance=None if state in (S.REQUESTED, S.CREATING) else f"i-gone{node_id[1]}")
    mark = world.last_event()

    outcome, messages = world.settle()

    settled = ["v1-requested", "v2-creating", "v4-stopping", "v5-failed", "v6-booting", "v7-bootstrapping",
               "v8-ready"]
    assert lists(outcome) == ([], settled, [], [])
    assert messages == [f"{n}: not at a; settled" for n in settled]
    never_ready = "never got ready; a no longer lists it"
    assert world.events_since(mark) == [
        ("v1-requested", "node.failed", "never created (interrupted)"),
        ("v1-requested", "node.stopped", "not at the provider"),
        ("v2-creating", "node.failed", "never created (interrupted)"),
        ("v2-creating", "node.stopped", "not at the provider"),
        ("v4-stopping", "node.stopped", "not at the provider"),
        ("v5-failed", "node.stopped", "not at the provider"),
        ("v6-booting", "node.failed", never_ready),
        ("v6-booting", "node.stopped", "not at the provider"),
        ("v7-bootstrapping", "node.failed", never_ready),
        ("v7-bootstrapping", "node.stopped", "not at the provider"),
        ("v8-ready", "node.lost", "a no longer lists it"),
    ]
    states = world.states()
    assert states.pop("v3-lost") == (S.LOST, "test: lost")
    assert states.pop("v8-ready") == (S.LOST, "a no longer lists it")
    assert set(states.values()) == {(S.STOPPED, "not at the provider")}


def test_terminated_nodes_count_as_gone(world: World) -> None:
    """EC2 lists terminated instances for a while: a ready record whose node was
    terminated behind orch's back is lost, a terminated tagged node with no record is no
    orphan, and one being created whose node is terminated was never created."""
    ready = world.launch("a", "t1-ready", state="terminated")
    world.record("t1-ready", S.READY, instance=ready)
    lone = world.launch("a", "t2-no-record", state="terminated")
    creating = world.launch("a", "t3-creating", state="terminated")
    world.record("t3-creating", S.CREATING)
    mark = world.last_event()

    outcome, messages = world.settle()

    assert lists(outcome) == ([], ["t1-ready", "t3-creating"], [], [])
    assert messages == ["t1-ready: not at a; settled", "t3-creating: not at a; settled"]
    assert world.events_since(mark) == [
        ("t1-ready", "node.lost", "a no longer lists it"),
        ("t3-creating", "node.failed", "never created (interrupted)"),
        ("t3-creating", "node.stopped", "not at the provider"),
    ]
    assert world.statuses() == {ready: "terminated", lone: "terminated", creating: "terminated"}


def test_nodes_of_another_workspace_and_untagged_ones_are_ignored(world: World) -> None:
    """Another workspace's nodes (even one tagged with a live record's id) and a node of
    this workspace without orch's node tag are neither orphans nor adopted, and stay
    running; the record whose id another workspace's node carries is still not at ``a``."""
    foreign = world.launch("a", "w1-ready", workspace="0123456789ab")
    world.record("w1-ready", S.READY, instance="i-0123456789abcdef0")
    stranger = world.launch("a", "w2-no-record", workspace="0123456789ab")
    untagged = world.launch("a", None)
    mark = world.last_event()

    outcome, messages = world.settle()

    assert lists(outcome) == ([], ["w1-ready"], [], [])
    assert messages == ["w1-ready: not at a; settled"]
    assert world.events_since(mark) == [("w1-ready", "node.lost", "a no longer lists it")]
    assert world.statuses() == {foreign: "running", stranger: "running", untagged: "running"}


# -- several providers, dry runs, nothing to do ----------------------------------------------


def build_every_case(world: World) -> dict[str, str]:
    """Two providers in one call, with every kind of change: at ``a`` an orphan, an
    interrupted stop, an adoption, a half-made node, a lost one, a vanished record; at
    ``b`` an orphan, a half-made node, two lost nodes (one stopped, one vanished), an
    interrupted stop and a vanished record.  Returns the instances by node id."""
    made = {}
    made["x1-orphan"] = world.launch("a", "x1-orphan")
    made["x2-stopping"] = world.launch("a", "x2-stopping")
    world.record("x2-stopping", S.STOPPING)
    made["x3-requested"] = world.launch("a", "x3-requested")
    world.record("x3-requested", S.REQUESTED)
    made["x4-booting"] = world.launch("a", "x4-booting", state="stopped")
    world.record("x4-booting", S.BOOTING, instance=made["x4-booting"])
    made["x5-ready"] = world.launch("a", "x5-ready", state="stopped")
    world.record("x5-ready", S.READY, instance=made["x5-ready"])
    world.record("x6-gone", S.READY, instance="i-0123456789abcdef0")
    made["y1-orphan"] = world.launch("b", "y1-orphan")
    made["y2-creating"] = world.launch("b", "y2-creating", state="stopped")
    world.record("y2-creating", S.CREATING, provider="b")
    made["y3-ready"] = world.launch("b", "y3-ready", state="stopped")
    world.record("y3-ready", S.READY, provider="b", instance=made["y3-ready"])
    made["y4-stopping"] = world.launch("b", "y4-stopping")
    world.record("y4-stopping", S.STOPPING, provider="b", instance=made["y4-stopping"])
    world.record("y5-gone", S.BOOTING, provider="b", instance="i-0123456789abcdef1")
    world.record("y6-gone", S.READY, provider="b", instance="i-0123456789abcdef2")
    return made


def test_a_dry_run_changes_nothing_and_says_what_would_be_done(world: World) -> None:
    """With ``apply=False`` every kind of change is announced with "would be " and its
    outcome counted (1 adopted, 3 vanished, 4 orphans, 4 down: 12 changes), and neither
    the store (records, events) nor either provider changes."""
    build_every_case(world)
    before = world.snapshot()
    messages: list[str] = []

    outcome = recover(world.store, world.handles, world.store.list_nodes(), apply=False, on_change=messages.append)

    assert world.snapshot() == before
    assert lists(outcome) == (["x3-requested"], ["x6-gone", "y5-gone", "y6-gone"],
                              ["x1-orphan", "x2-stopping", "y1-orphan", "y4-stopping"],
                              ["x4-booting", "x5-ready", "y2-creating", "y3-ready"])
    assert outcome.changes == 12
    assert messages == [
        "x1-orphan: orphan on a would be destroyed",
        "x2-stopping: was stopping on a; would be destroyed",
        "x3-requested: would be adopted from a",
        "x4-booting: never got ready and a reports it stopped; would be destroyed",
        "x5-ready: a reports it stopped; would be marked lost",
        "x6-gone: not at a; would be settled",
        "y1-orphan: orphan on b would be destroyed",
        "y2-creating: never got ready and b reports it stopped; would be destroyed",
        "y3-ready: b reports it stopped; would be marked lost",
        "y4-stopping: was stopping on b; would be destroyed",
        "y5-gone: not at b; would be settled",
        "y6-gone: not at b; would be settled",
    ]


def test_several_providers_are_settled_each_against_its_own_list(world: World) -> None:
    """One call over ``a`` and ``b``: each provider's nodes and records are settled in
    the provider's order, a record against its own provider only; the instances
    destroyed are exactly the orphans, the interrupted stops and the half-made ones."""
    made = build_every_case(world)
    mark = world.last_event()

    outcome, messages = world.settle()

    assert lists(outcome) == (["x3-requested"], ["x6-gone", "y5-gone", "y6-gone"],
                              ["x1-orphan", "x2-stopping", "y1-orphan", "y4-stopping"],
                              ["x4-booting", "x5-ready", "y2-creating", "y3-ready"])
    assert outcome.changes == 12
    assert messages == [
        "x1-orphan: orphan on a destroyed",
        "x2-stopping: was stopping on a; destroyed",
        "x3-requested: adopted from a",
        "x4-booting: never got ready and a reports it stopped; destroyed",
        "x5-ready: a reports it stopped; marked lost",
        "x6-gone: not at a; settled",
        "y1-orphan: orphan on b destroyed",
        "y2-creating: never got ready and b reports it stopped; destroyed",
        "y3-ready: b reports it stopped; marked lost",
        "y4-stopping: was stopping on b; destroyed",
        "y5-gone: not at b; settled",
        "y6-gone: not at b; settled",
    ]
    destroyed = {"x1-orphan", "x2-stopping", "x4-booting", "y1-orphan", "y2-creating", "y4-stopping"}
    assert world.statuses() == {
        instance: "terminated" if node_id in destroyed else "stopped" if node_id in ("x5-ready", "y3-ready")
        else "running" for node_id, instance in made.items()}
    assert world.events_since(mark) == [
        ("x2-stopping", "node.stopped", "stop interrupted; finished by recovery"),
        ("x3-requested", "node.creating", "created on a; found by its tag"),
        ("x3-requested", "node.booting", f"a node {made['x3-requested']}"),
        ("x4-booting", "node.failed", "never got ready; a reports it stopped"),
        ("x4-booting", "node.stopped", "destroyed by recovery"),
        ("x5-ready", "node.lost", "a reports it stopped"),
        ("x6-gone", "node.lost", "a no longer lists it"),
        ("y2-creating", "node.failed", "never got ready; b reports it stopped"),
        ("y2-creating", "node.stopped", "destroyed by recovery"),
        ("y3-ready", "node.lost", "b reports it stopped"),
        ("y4-stopping", "node.stopped", "stop interrupted; finished by recovery"),
        ("y5-gone", "node.failed", "never got ready; b no longer lists it"),
        ("y5-gone", "node.stopped", "not at the provider"),
        ("y6-gone", "node.lost", "b no longer lists it"),
    ]


def test_nothing_to_settle_changes_nothing(world: World) -> None:
    """Records and nodes that agree (and no ``on_change``): an empty outcome, no events,
    the nodes untouched."""
    instance = world.launch("b", "n1-ready")
    world.record("n1-ready", S.READY, provider="b", instance=instance)
    mark = world.last_event()

    outcome = recover(world.store, world.handles, world.store.list_nodes())

    assert outcome == Recovery() and outcome.changes == 0
    assert world.events_since(mark) == []
    assert world.statuses() == {instance: "running"}
