"""The autoscaler of ``orch serve``: measures each family that has ``scaling:`` rules,
asks ``orchestrator.fleet.autoscale.decide``, and acts through the fleet.

Every ``interval`` seconds, for each such family: the live nodes (the store), the tasks
waiting for them (the running job's estimate from the server's scheduler, plus one per
queued job that may run there), and the nodes idle for the family's ``idle_seconds``
(connected, with no work loaded).  *Up* is ``fleet.spawn`` to the new count (the new
nodes' agents dial the server's scheduler and join the running job); *down* stops the
longest-idle nodes (``fleet.stop``), never a busy one.  Every change is an event
(``autoscale.up`` / ``autoscale.down``, with the reason, then ``autoscale.done`` or
``autoscale.failed``), and so is every decision not to change (``autoscale.hold``), each
time its reason changes.  ``orch autoscale status`` reads them back.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Any

from orchestrator import fleet
from orchestrator.config.models import NodeFamily
from orchestrator.errors import OrchError
from orchestrator.fleet.autoscale import Decision, Demand, decide
from orchestrator.scheduler.service import SchedulerService
from orchestrator.state import JobState, NodeState, Store
from orchestrator.workspace import Workspace

log = logging.getLogger("orch.autoscale")


class Autoscaler:
    """A thread that scales the workspace's families with ``scaling:`` rules."""

    def __init__(self, ws: Workspace, service: SchedulerService, *, interval: float = 1.0) -> None:
        self.ws, self.service, self.interval = ws, service, interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_change: dict[str, float] = {}
        self._last_hold: dict[str, str] = {}
        self._busy_at: dict[str, float] = {}
        self._config: tuple[tuple[tuple[str, int], ...], dict[str, NodeFamily]] | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="orch-autoscaler", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        with Store.open(self.ws.state_db) as store:
            while not self._stop.wait(self.interval):
                try:
                    self.tick(store)
                except Exception:  # the autoscaler must not vanish: log, go on
                    log.exception("autoscaler tick failed")

    def tick(self, store: Store) -> list[tuple[str, Decision]]:
        """One round over the families; the decisions made."""
        scaled = self._scaled_families(store)
        if not scaled:
            return []
        work = self.service.work()
        now = time.monotonic()
        for node, busy in work["busy"].items():
            if busy or node not in self._busy_at:
                self._busy_at[node] = now
        queued = store.list_jobs(states=[JobState.QUEUED])
        decisions = []
        for name, family in sorted(scaled.items()):
            decision, idle = self._decide(store, family, work, queued, now)
            decisions.append((name, decision))
            self._act(store, family, decision, idle)
        return decisions

    def _scaled_families(self, store: Store) -> dict[str, NodeFamily]:
        """The families with ``scaling:`` rules, parsed again only when a config file
        changed (a tick runs every second; the YAML rarely changes)."""
        files = [self.ws.settings_file, *sorted(self.ws.families_dir.glob("*.yaml")),
                 *sorted(self.ws.providers_dir.glob("*.yaml"))]
        signature = tuple((str(f), f.stat().st_mtime_ns) for f in files if f.exists())
        if self._config is None or self._config[0] != signature:
            cfg = fleet.load_config(self.ws, store)
            self._config = (signature, {n: f for n, f in cfg.families.items() if f.scaling is not None})
        return self._config[1]

    def _decide(self, store: Store, family: NodeFamily, work: dict[str, Any], queued: list[Any], now: float
                ) -> tuple[Decision, list[str]]:
        rules = family.scaling
        assert rules is not None
        live = [n for n in store.list_nodes(family=family.name) if n.state.live]
        waiting = float(work["waiting"]) if work["family"] in (None, family.name) else 0.0
        waiting += sum(1 for job in queued if job.spec.get("family") in (None, family.name))
        ready = [n for n in live if n.state == NodeState.READY]
        idle = sorted((n.id for n in ready if not work["busy"].get(n.id)
                       and now - self._busy_at.setdefault(n.id, now) >= rules.idle_seconds),
                      key=lambda node: self._busy_at[node])
        since = now - self._last_change.get(family.name, float("-inf"))
        return decide(rules, Demand(len(live), waiting, len(idle), since)), idle

    def _act(self, store: Store, family: NodeFamily, decision: Decision, idle: list[str]) -> None:
        name = family.name
        if decision.action == "hold":
            key = re.sub(r"[\d.]+", "#", decision.reason)
            if self._last_hold.get(name) != key:
                self._last_hold[name] = key
                store.record_event("autoscale.hold", family=name, reason=decision.reason,
                                   data={"target": decision.target})
            return
        self._last_hold.pop(name, None)
        store.record_event(f"autoscale.{decision.action}", family=name, reason=decision.reason,
                           data={"target": decision.target})
        try:
            if decision.action == "up":
                report = fleet.spawn(self.ws, store, name, count=decision.target)
                outcome = f"{len(report.ready)} ready"
            else:
                with fleet.family_lock(self.ws, name):  # no replacement or spawn plans meanwhile
                    live = [n for n in store.list_nodes(family=name) if n.state.live]
                    surplus = len(live) - decision.target
                    chosen = [n for n in live if n.state == NodeState.READY and n.id in idle[:surplus]]
                    fleet.stop(self.ws, store, chosen)
                outcome = f"stopped {', '.join(n.id for n in chosen)}"
            store.record_event("autoscale.done", family=name, reason=outcome, data={"target": decision.target})
        except OrchError as exc:
            store.record_event("autoscale.failed", family=name, reason=str(exc), data={"target": decision.target})
        self._last_change[name] = time.monotonic()
