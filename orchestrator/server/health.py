"""Node health in ``orch serve``: ``HealthMonitor(ws, service)``.

A thread of the server that, every second, compares the store's ready nodes with the
agents the ``SchedulerService`` has connected (node id -> seconds since last heard):

- a node whose agent was connected and has been absent or silent for longer than the
  grace period (``orch serve --health-grace``, default 10 s) is checked with its
  provider (for the reason) and marked ``lost`` (a ``node.lost`` state event and a
  ``node.down`` event naming the reason);
- a ready node whose agent never connected since the server started (or since the
  node got ready) gets the grace period from then; past it, it is marked lost only when
  its provider no longer has it running (a node bootstrapped without an agent, which
  cannot dial back, is left alone and logged once);
- when the family says so (``scaling.replace_lost``, true without ``scaling``), the
  lost node is destroyed at its provider (or settled as stopped when the provider no
  longer has it) and ``fleet.spawn`` brings the family back to the number of nodes it
  had before the loss, which the autoscaler may have moved from its YAML count
  (``node.replaced``; a failed replacement is ``node.replace_failed`` and is tried
  again every ``RETRY_SECONDS``).

The running job's tasks go elsewhere by themselves: the engine loses a silent agent.
Nothing raised in the thread ends it (it is logged).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from orchestrator.scheduler.service import SchedulerService
from orchestrator.state import NodeRecord, NodeState, Store
from orchestrator.workspace import Workspace

log = logging.getLogger("orch.health")

DEFAULT_GRACE = 10.0
INTERVAL = 1.0
RETRY_SECONDS = 30.0


class HealthMonitor:
    """start() / stop(); ``check(store)`` is one round (what the thread does each second)."""

    def __init__(self, ws: Workspace, service: SchedulerService, *, grace: float = DEFAULT_GRACE,
                 interval: float = INTERVAL, clock: Callable[[], float] = time.monotonic) -> None:
        self.ws, self.service, self.grace, self.interval, self.clock = ws, service, grace, interval, clock
        self._started = clock()
        self._heard: dict[str, float] = {}   # node id -> when (clock) its agent was last heard
        self._present: dict[str, float] = {}  # node id -> when (clock) a round last saw it connected
        self._since: dict[str, float] = {}   # node id -> when the monitor first saw it ready
        self._agentless: set[str] = set()    # never connected, provider says running: logged once
        self._pending: dict[str, tuple[float, int]] = {}  # family -> when to try its replacement again, target
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # -- life -----------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._started = self.clock()
        self._stopping.clear()
        self._thread = threading.Thread(target=self._main, name="orch-health", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        thread, self._thread = self._thread, None
        self._stopping.set()
        if thread is not None:
            thread.join(timeout)

    def _main(self) -> None:
        store: Store | None = None
        try:
            while not self._stopping.is_set():
                try:
                    if store is None:
                        self.ws.ensure_runtime()
                        store = Store.open(self.ws.state_db)
                    self.check(store)
                except Exception:
                    log.exception("node health check failed")
                self._stopping.wait(self.interval)
        finally:
            if store is not None:
                store.close()

    # -- one round ------------------------------------------------------------------------

    def check(self, store: Store) -> list[str]:
        """Mark the ready nodes whose agents are gone lost (and replace them); their ids."""
        now = self.clock()
        connected = self.service.connected()
        ready = store.list_nodes(states=[NodeState.READY])
        ids = {n.id for n in ready}
        for table in (self._heard, self._present, self._since):
            for node_id in [k for k in table if k not in ids]:
                del table[node_id]
        self._agentless &= ids
        lost: list[str] = []
        for node in ready:
            since = self._since.setdefault(node.id, now)
            present = node.id in connected
            if present:
                self._heard[node.id] = now - connected[node.id]
                self._present[node.id] = now
                self._agentless.discard(node.id)
            # Connected: silent since it was last heard; gone: since a round last saw it
            # (it went away at some point after that).
            heard = self._heard.get(node.id) if present else self._present.get(node.id)
            if heard is not None:
                if now - heard <= self.grace:
                    continue
                silence = (f"its agent has been silent{'' if present else ' (disconnected)'} for "
                           f"{now - heard:.1f} s (grace {self.grace:g} s)")
            else:
                if now - max(since, self._started) <= self.grace:
                    continue
                silence = f"its agent never connected in {now - max(since, self._started):.1f} s"
            if self._stopping.is_set():
                break
            if self._down(store, node, silence, was_connected=heard is not None):
                lost.append(node.id)
        self._retry(store)
        return lost

    def _down(self, store: Store, node: NodeRecord, silence: str, *, was_connected: bool) -> bool:
        handle, seen, running = self._provider_view(store, node)
        if not was_connected and (running or seen.startswith("provider check failed")):
            if node.id not in self._agentless:
                self._agentless.add(node.id)
                log.warning("node %s is ready but %s; %s, so it is left alone", node.id, silence, seen)
            return False
        reason = f"{silence}; {seen}"
        with store.transaction():
            current = store.get_node(node.id)
            if current.state != NodeState.READY:  # stopped or changed meanwhile
                return False
            target = sum(1 for n in store.list_nodes(family=node.family) if n.state.live)  # this one included
            record = store.set_node_state(node.id, NodeState.LOST, reason=reason)
            store.record_event("node.down", node=node.id, family=node.family, provider=node.provider,
                               reason=reason, data={"connected": was_connected, "provider_state": seen})
        for table in (self._heard, self._present, self._since):
            table.pop(node.id, None)
        log.warning("node %s is lost: %s", node.id, reason)
        if self._replace_wanted(store, node.family):
            self._retire(store, handle, record, present=seen != "its provider no longer has it")
            self._replace(store, node.family, target, lost=node.id)
        return True

    def _provider_view(self, store: Store, node: NodeRecord) -> tuple[Any, str, bool]:
        """(provider handle or None, what the provider says, whether it runs the node)."""
        from libcloud.compute.types import NodeState as CloudState

        from orchestrator.provision.handle import ProviderHandle
        from orchestrator.provision.nodes import find_node

        try:
            cfg = self._config(store)
            config = cfg.providers.get(node.provider)
            if config is None:
                return None, f"provider check failed: provider {node.provider!r} is not in providers/", False
            handle = ProviderHandle(self.ws, config)
            if not node.provider_node_id:
                return handle, "its provider no longer has it", False
            found = find_node(handle, node.provider_node_id)
        except Exception as exc:
            return None, f"provider check failed: {type(exc).__name__}: {exc}", False
        if found is None:
            return handle, "its provider no longer has it", False
        status = (found.extra or {}).get("status") or found.state
        return handle, f"{node.provider} reports it {status}", found.state == CloudState.RUNNING

    def _config(self, store: Store) -> Any:
        from orchestrator.config import load_workspace_config

        cfg = load_workspace_config(self.ws, known_releases={r.name for r in store.list_releases()})
        cfg.raise_first()
        return cfg

    def _replace_wanted(self, store: Store, family_name: str) -> bool:
        try:
            family = self._config(store).families.get(family_name)
        except Exception:
            log.exception("cannot read the config of family %s; not replacing its lost node", family_name)
            return False
        if family is None:
            return False
        return family.scaling is None or family.scaling.replace_lost

    def _retire(self, store: Store, handle: Any, record: NodeRecord, *, present: bool) -> None:
        """Destroy the lost node at its provider (it is unreachable), or settle its record
        as stopped when the provider no longer has it."""
        from orchestrator.provision.nodes import destroy_node

        try:
            if present and handle is not None:
                destroy_node(handle, store, record, reason="lost; destroyed before its replacement")
            elif not present:
                store.set_node_state(record.id, NodeState.STOPPED, reason="lost; not at its provider")
        except Exception:
            log.exception("could not destroy lost node %s; `orch stop` retires it", record.id)

    def _replace(self, store: Store, family_name: str, target: int, *, lost: str | None = None) -> None:
        """Back to ``target`` nodes, the family's live nodes before the loss (not its
        YAML ``count``: the autoscaler or ``orch spawn --count`` may have changed it)."""
        from orchestrator import fleet

        before = {n.id for n in store.list_nodes(family=family_name, states=[NodeState.READY])}
        try:
            report = fleet.spawn(self.ws, store, family_name, count=target)
        except Exception as exc:
            log.exception("replacing the lost nodes of %s failed", family_name)
            self._pending[family_name] = (self.clock() + RETRY_SECONDS, target)
            store.record_event("node.replace_failed", node=lost, family=family_name,
                               reason=f"{type(exc).__name__}: {exc}")
            return
        new = sorted(set(report.ready) - before)
        if report.ok:
            self._pending.pop(family_name, None)
        else:
            self._pending[family_name] = (self.clock() + RETRY_SECONDS, target)
        failures = "; ".join(str(f) for f in report.failures)
        store.record_event("node.replaced" if new else "node.replace_failed", node=lost, family=family_name,
                           reason=(f"replaced by {', '.join(new)}" if new else "no new node")
                           + f"; {len(report.ready)} of {report.target} ready" + (f"; {failures}" if failures else ""),
                           data={"new": new, "ready": report.ready, "target": report.target})
        log.warning("family %s: %d of %d ready after replacing %s (new: %s)", family_name, len(report.ready),
                    report.target, lost, ", ".join(new) or "none")

    def _retry(self, store: Store) -> None:
        now = self.clock()
        for family_name, (when, target) in list(self._pending.items()):
            if now >= when and not self._stopping.is_set():
                self._replace(store, family_name, target)
