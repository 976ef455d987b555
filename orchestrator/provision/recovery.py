"""Recovery: settling the store against the providers' ``list_nodes`` after a killed
``orch``, a vanished machine, or a node destroyed behind our back (``orch reconcile``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from libcloud.compute.base import Node
from libcloud.compute.types import NodeState as CloudState

from orchestrator.errors import ProviderError
from orchestrator.provision.handle import ProviderHandle
from orchestrator.provision.nodes import (
    adopt,
    destroy_node,
    destroy_orphan,
    find_node,
    is_dead,
    state_text,
    tagged_nodes,
)
from orchestrator.provision.tags import TAG_NODE, node_tags
from orchestrator.state import NodeRecord, NodeState, Store


@dataclass
class Recovery:
    """What settling the store against the providers did (or, dry, would do)."""

    adopted: list[str] = field(default_factory=list)   # created before a crash, alive: kept
    vanished: list[str] = field(default_factory=list)  # never created, or gone: settled
    orphans: list[str] = field(default_factory=list)   # tagged, but no live record wants it: destroyed
    down: list[str] = field(default_factory=list)      # listed, not running: lost, or destroyed if never ready

    @property
    def changes(self) -> int:
        return len(self.adopted) + len(self.vanished) + len(self.orphans) + len(self.down)


HALF_MADE = (NodeState.REQUESTED, NodeState.CREATING, NodeState.BOOTING, NodeState.BOOTSTRAPPING)


def recover(
    store: Store,
    handles: dict[str, ProviderHandle],
    records: Iterable[NodeRecord],
    *,
    apply: bool = True,
    on_change: Callable[[str], None] = lambda _msg: None,
) -> Recovery:
    """Settle the store against the providers' ``list_nodes`` (after a killed ``orch``,
    a vanished machine, or a node destroyed behind our back).

    Terminated nodes count as gone.  A record that was being created is adopted when
    the provider has a live node tagged with its id (``booting``: the next ``spawn``
    waits for it to run), and settled as stopped when it has none.  A node that never
    got ready and is stopped or failed at the provider (a create killed half-way) is
    destroyed and its record settled.  A tagged node the store does not know as live,
    or whose record is ``stopping``, is destroyed; a ready record whose node is gone,
    or no longer running, is marked lost (one that never got ready is settled).  With
    ``apply=False`` nothing changes: the outcome says what would.
    """
    outcome = Recovery()
    live = {r.id: r for r in records if r.state.live}
    wid = store.workspace_id
    verb = "" if apply else "would be "
    for name, handle in handles.items():
        tagged = {node_tags(n)[TAG_NODE]: n for n in tagged_nodes(handle, wid) if TAG_NODE in node_tags(n)}
        for node_id, node in tagged.items():
            record = live.get(node_id)
            if record is None or record.provider != name:
                if apply:
                    destroy_orphan(handle, node)
                outcome.orphans.append(node_id)
                on_change(f"{node_id}: orphan on {name} {verb}destroyed")
            elif record.state == NodeState.STOPPING:
                if apply:  # the node it was stopping is this one, whether or not the record knew its id
                    destroy_node(handle, store, dataclasses.replace(record, provider_node_id=str(node.id)),
                                 reason="stop interrupted; finished by recovery")
                outcome.orphans.append(node_id)
                on_change(f"{node_id}: was stopping on {name}; {verb}destroyed")
            elif record.state in HALF_MADE and is_dead(node):
                if apply:
                    _discard_half_made(handle, store, record, node)
                outcome.down.append(node_id)
                on_change(f"{node_id}: never got ready and {name} reports it {state_text(node)}; "
                          f"{verb}destroyed")
            elif record.state in (NodeState.REQUESTED, NodeState.CREATING) or not record.provider_node_id:
                if apply:
                    adopt(store, node_id, node, handle)
                outcome.adopted.append(node_id)
                on_change(f"{node_id}: {verb}adopted from {name}")
            elif record.state == NodeState.READY and node.state != CloudState.RUNNING:
                if apply:
                    store.set_node_state(node_id, NodeState.LOST, reason=f"{name} reports it {node.state}")
                outcome.down.append(node_id)
                on_change(f"{node_id}: {name} reports it {node.state}; {verb}marked lost")
        for record in [r for r in live.values() if r.provider == name and r.id not in tagged]:
            if record.state == NodeState.LOST:
                continue  # already settled; `orch stop` retires it
            if apply:
                if record.state in (NodeState.REQUESTED, NodeState.CREATING):
                    store.set_node_state(record.id, NodeState.FAILED, reason="never created (interrupted)")
                    store.set_node_state(record.id, NodeState.STOPPED, reason="not at the provider")
                elif record.state in (NodeState.STOPPING, NodeState.FAILED):
                    store.set_node_state(record.id, NodeState.STOPPED, reason="not at the provider")
                elif record.state in HALF_MADE:  # booting or bootstrapping: it never got ready
                    store.set_node_state(record.id, NodeState.FAILED, reason=f"never got ready; {name} "
                                         "no longer lists it")
                    store.set_node_state(record.id, NodeState.STOPPED, reason="not at the provider")
                else:
                    store.set_node_state(record.id, NodeState.LOST, reason=f"{name} no longer lists it")
            outcome.vanished.append(record.id)
            on_change(f"{record.id}: not at {name}; {verb}settled")
    return outcome


def _discard_half_made(handle: ProviderHandle, store: Store, record: NodeRecord, node: Node) -> None:
    """Destroy a node that never got ready and will not run; its record ends stopped."""
    reason = f"never got ready; {handle.name} reports it {state_text(node)}"
    destroy_orphan(handle, node)
    if find_node(handle, str(node.id)) is not None:
        raise ProviderError(f"provider {handle.name!r} still lists node {record.id} after destroy",
                            hint="run `orch reconcile --apply` again")
    store.set_node_state(record.id, NodeState.FAILED, reason=reason)
    store.set_node_state(record.id, NodeState.STOPPED, reason="destroyed by recovery")
