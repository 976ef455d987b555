"""Nodes through libcloud: create, wait, find, destroy; what a listed node's state means.

Every provider, ours and libcloud's stock drivers alike, is driven through the same
``NodeDriver`` calls.  The store records intent before each create call, and every
node carries tags (workspace, family, node id), so a crash at any point leaves either
a record to settle or a tagged node to find.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from libcloud.compute.base import Node
from libcloud.compute.types import NodeState as CloudState

from orchestrator.errors import ProviderCapacityError, ProviderError, ProviderQuotaError, ProviderTransientError
from orchestrator.provision.cloud_errors import map_libcloud_errors
from orchestrator.provision.handle import RETRY_DELAYS, ProviderHandle, retrying
from orchestrator.provision.placement import NodeRequest
from orchestrator.provision.tags import TAG_FAMILY, TAG_NODE, TAG_WORKSPACE, node_tags, tag_arguments
from orchestrator.provision.userdata import HostKey, cloud_config, merged, user_data_arguments
from orchestrator.state import NodeRecord, NodeState, Store

# What a node is doing, in the words of drivers that say more than libcloud's NodeState:
# EC2 lists an instance "shutting-down", then "terminated", for a while after it is gone.
GONE_STATUSES = frozenset({"shutting-down", "terminating", "terminated", "deleting", "deleted"})
# States a node does not leave by itself: one that never got ready is no use.
DEAD_STATES = frozenset({CloudState.STOPPED, CloudState.ERROR})


def _status(node: Node) -> str:
    return str((node.extra or {}).get("status") or "").lower()


def is_gone(node: Node) -> bool:
    """Terminated, or on its way there: as good as not listed (Nova lists a deleted
    server ACTIVE with the task state ``deleting`` for a while)."""
    task = str((node.extra or {}).get("task_state") or "").lower()
    return bool(node.state == CloudState.TERMINATED or _status(node) in GONE_STATUSES or task in GONE_STATUSES)


def is_dead(node: Node) -> bool:
    """Listed, but stopped or failed: it will not run unless someone starts it."""
    return bool(node.state in DEAD_STATES or _status(node) in ("stopped", "stopping"))


def tagged_nodes(handle: ProviderHandle, workspace_id: str) -> list[Node]:
    """Every node at the provider that carries this workspace's tag and is not gone
    (EC2 lists terminated instances for a while)."""
    nodes = retrying(lambda: list(handle.driver.list_nodes()), handle)
    return [n for n in nodes if node_tags(n).get(TAG_WORKSPACE) == workspace_id and not is_gone(n)]


def create_node(handle: ProviderHandle, store: Store, record: NodeRecord, request: NodeRequest,
                *, delays: Sequence[float] = RETRY_DELAYS) -> NodeRecord:
    """Create the node a ``requested`` record stands for; returns it ``booting``.

    A transient failure is retried with backoff, but first the provider is asked for a
    node carrying this record's tag (the failed call may have made one).  Any other
    failure tears down what the call may have left, marks the record failed and raises;
    ``ProviderCapacityError`` tells the caller to fail over.
    """
    cat = handle.catalogue()
    store.set_node_state(record.id, NodeState.CREATING, reason=f"creating on {handle.name}")
    tags = {TAG_WORKSPACE: store.workspace_id, TAG_FAMILY: record.family, TAG_NODE: record.id}
    features = handle.features
    try:
        arguments = merged(handle.key_arguments(store), tag_arguments(features, tags), handle.create_options())
    except ProviderError as exc:
        store.set_node_state(record.id, NodeState.FAILED, reason=str(exc))
        raise
    if features.user_data is not None:  # the host key is orch's, pinned before the node exists
        host_key = HostKey.generate()
        arguments = merged(arguments, user_data_arguments(features, cloud_config(host_key)))
        store.set_node_state(record.id, NodeState.CREATING, reason=f"host key pinned; creating on {handle.name}",
                             host_key=host_key.public, ssh_user=handle.config.ssh_user)
    for delay in (*delays, None):
        try:
            with map_libcloud_errors(handle.name, features.errors):
                where = {features.location_argument: cat["locations"].get(request.location)} \
                    if features.location_argument else {}
                node = handle.driver.create_node(
                    name=record.id,
                    size=cat.get("sizes_at", {}).get(f"{request.location}/{request.size}")  # (GCE: zonal)
                    or cat["sizes"][request.size],
                    image=cat["images"][request.image],
                    **where,
                    **arguments,
                )
            return adopt(store, record.id, node, handle)
        except ProviderTransientError as exc:
            made = _tagged_node(handle, store, record.id)
            if made is not None:
                return adopt(store, record.id, made, handle)
            if delay is None:
                store.set_node_state(record.id, NodeState.FAILED, reason=str(exc))
                raise
            store.record_event("provider.retry", provider=handle.name, node=record.id,
                               reason=f"{exc}; retrying in {delay:.1f} s")
            time.sleep(delay)
        except ProviderError as exc:
            partial = _tagged_node(handle, store, record.id)
            if partial is not None:
                destroy_orphan(handle, partial)
            store.set_node_state(record.id, NodeState.FAILED, reason=str(exc))
            raise
    raise AssertionError("unreachable")


def _tagged_node(handle: ProviderHandle, store: Store, node_id: str) -> Node | None:
    try:
        nodes = tagged_nodes(handle, store.workspace_id)
    except ProviderError:
        return None  # we cannot look; recover() will find it on the next run
    return next((n for n in nodes if node_tags(n).get(TAG_NODE) == node_id), None)


def adopt(store: Store, node_id: str, node: Node, handle: ProviderHandle) -> NodeRecord:
    """Record what the provider says of a node we created (after create or a crash)."""
    extra = node.extra or {}
    addresses = list(node.public_ips or node.private_ips or [])
    address = str(addresses[0]) if addresses else None
    current = store.get_node(node_id)
    if current.state == NodeState.REQUESTED:  # found by recovery: its create was made, 'creating' never written
        current = store.set_node_state(node_id, NodeState.CREATING,
                                       reason=f"created on {handle.name}; found by its tag")
    state = NodeState.BOOTING if current.state == NodeState.CREATING else current.state
    return store.set_node_state(
        node_id, state, reason=f"{handle.name} node {node.id}",
        provider_node_id=str(node.id), address=address, port=int(extra.get("port", 22)),
        ssh_user=extra.get("ssh_user") or current.ssh_user, host_key=extra.get("host_key") or current.host_key,
        extra={k: v for k, v in extra.items() if isinstance(v, (str, int, float, bool))},
    )


def wait_running(handle: ProviderHandle, provider_node_id: str, *, timeout: float = 300.0,
                 interval: float = 0.05) -> Node:
    """Poll ``list_nodes`` until the node runs (our drivers return running nodes).

    A node that is stopped, failed or gone (after it was listed) will not run: that
    fails at once, naming its state, rather than at the timeout.
    """
    deadline = time.monotonic() + timeout
    delay = interval
    seen = False
    while True:
        found = listed_node(handle, provider_node_id)
        if found is not None and found.state == CloudState.RUNNING and not is_gone(found):
            return found
        if found is not None and (is_gone(found) or is_dead(found)):
            failed_for_capacity(handle, found)
            raise ProviderError(f"provider {handle.name!r}: node {provider_node_id} is {state_text(found)}, "
                                "not running")
        if found is None and seen:
            raise ProviderError(f"provider {handle.name!r}: node {provider_node_id} vanished while booting")
        seen = seen or found is not None
        if time.monotonic() > deadline:
            state = state_text(found) if found is not None else "not listed"
            raise ProviderError(f"provider {handle.name!r}: node {provider_node_id} not running after "
                                f"{timeout:.0f} s (state {state})")
        time.sleep(delay)
        delay = min(delay * 2, 2.0)


def await_running(handle: ProviderHandle, store: Store, record: NodeRecord, *, timeout: float = 300.0) -> NodeRecord:
    """:func:`wait_running`, then the record takes what the provider says of the running
    node (a cloud gives a node its address only once it runs: Nova's BUILD, EC2's
    pending, a droplet ``new``)."""
    if not record.provider_node_id:
        raise ProviderError(f"provider {handle.name!r}: node {record.id} has no provider node id")
    return adopt(store, record.id, wait_running(handle, record.provider_node_id, timeout=timeout), handle)


def failed_for_capacity(handle: ProviderHandle, node: Node) -> None:
    """Raise ProviderCapacityError (or its quota kind) for a node the cloud accepted and
    then failed for want of room, as its driver's declared fault messages say (Nova:
    ``No valid host was found``): the caller fails over as if the create had been
    refused."""
    fault = (node.extra or {}).get("fault")
    message = str(fault.get("message") or "") if isinstance(fault, dict) else ""
    meaning = next((m for prefix, m in handle.features.errors.faults.items() if message.startswith(prefix)), None)
    text = f"provider {handle.name!r}: node {node.id} failed: {' '.join(message.split())[:300]}"
    if meaning == "quota":
        raise ProviderQuotaError(text)
    if meaning == "capacity":
        raise ProviderCapacityError(f"{text} (out of capacity)")


def state_text(node: Node) -> str:
    status = _status(node)
    return f"{node.state} ({status})" if status and status != str(node.state) else str(node.state)


def listed_node(handle: ProviderHandle, provider_node_id: str) -> Node | None:
    """The node as the provider lists it, terminated ones included."""
    nodes = retrying(lambda: list(handle.driver.list_nodes()), handle)
    return next((n for n in nodes if str(n.id) == provider_node_id), None)


def find_node(handle: ProviderHandle, provider_node_id: str) -> Node | None:
    """The node, unless the provider no longer has it (not listed, or terminated)."""
    node = listed_node(handle, provider_node_id)
    return None if node is None or is_gone(node) else node


def destroy_node(handle: ProviderHandle, store: Store, record: NodeRecord, *, reason: str) -> NodeRecord:
    """Destroy at the provider, confirm with ``list_nodes``, and mark the node stopped."""
    if record.state != NodeState.STOPPING:
        record = store.set_node_state(record.id, NodeState.STOPPING, reason=reason)
    if record.provider_node_id:
        node = find_node(handle, record.provider_node_id)
        if node is not None:
            destroy_orphan(handle, node)
            if find_node(handle, record.provider_node_id) is not None:
                raise ProviderError(f"provider {handle.name!r} still lists node {record.id} after destroy",
                                    hint="run `orch stop` again")
    return store.set_node_state(record.id, NodeState.STOPPED, reason=reason)


def destroy_orphan(handle: ProviderHandle, node: Node) -> None:
    """Destroy a listed node.  One that is gone by the time the provider is asked is no
    error (Nova answers 404 for a server already deleted; EC2 terminates it again)."""
    try:
        with map_libcloud_errors(handle.name, handle.features.errors):
            handle.driver.destroy_node(node, **handle.features.destroy_options)
    except ProviderError:
        if find_node(handle, str(node.id)) is not None:
            raise
