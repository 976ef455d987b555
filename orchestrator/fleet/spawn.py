"""Spawn and stop node families: desired count x current fleet -> create, bootstrap,
replace, roll out, scale down.  Idempotent and resumable: running ``spawn`` again
after a crash settles what was left half-done, then does only what is missing.

Progress flows out through ``FleetEvents`` callbacks; nothing here prints.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import re
import secrets
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from orchestrator.config import NodeFamily, ReleaseManifest, WorkspaceConfig, load_workspace_config
from orchestrator.config.models import NAME_PATTERN
from orchestrator.deploy import releases as release_catalog
from orchestrator.deploy.bootstrap import BootstrapFailed, BootstrapPlan, NodeLog, bootstrap_node
from orchestrator.deploy.builds import ReleaseBuilds, ensure_built_here
from orchestrator.errors import (
    ConflictError,
    InputError,
    NotFoundError,
    OrchError,
    ProviderCapacityError,
    ProviderQuotaError,
)
from orchestrator.locks import exclusive
from orchestrator.provision.cooldowns import mark_unavailable
from orchestrator.provision.handle import ProviderHandle
from orchestrator.provision.nodes import await_running, create_node, destroy_node
from orchestrator.provision.placement import FleetNode, NodeRequest, PlacementError, PlacementPlan, plan_placement
from orchestrator.provision.recovery import Recovery, recover
from orchestrator.provision.registry import sync_registrations
from orchestrator.remote.fanout import ssh_target
from orchestrator.remote.pool import SSHPool
from orchestrator.remote.ssh import SSHTarget
from orchestrator.state import NodeRecord, NodeState, ReleaseRecord, Store, targets
from orchestrator.workspace import Workspace

UP = (NodeState.BOOTING, NodeState.BOOTSTRAPPING, NodeState.READY)
IN_FLIGHT = (NodeState.REQUESTED, NodeState.CREATING, NodeState.BOOTING, NodeState.BOOTSTRAPPING)


@dataclass
class FleetEvents:
    """Callbacks the CLI (or API) uses to show progress; all optional."""

    stage: Callable[[str, str], None] = lambda node, stage: None  # node id, stage name
    note: Callable[[str], None] = lambda text: None


@dataclass
class SpawnReport:
    family: str
    target: int
    ready: list[str] = field(default_factory=list)
    created: list[str] = field(default_factory=list)
    rolled: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    failures: list[BootstrapFailed | OrchError] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)  # ready, but still on an older config (a roll failed)

    @property
    def ok(self) -> bool:
        return len(self.ready) >= self.target and not self.stale


class FleetContext:
    """What one command shares across its threads: workspace, store, drivers, SSH."""

    def __init__(self, ws: Workspace, store: Store, cfg: WorkspaceConfig, events: FleetEvents) -> None:
        self.ws, self.store, self.cfg, self.events = ws, store, cfg, events
        self.pool = SSHPool()
        self._handles: dict[str, ProviderHandle] = {}
        self._lock = threading.Lock()

    def handle(self, provider: str) -> ProviderHandle:
        with self._lock:
            if provider not in self._handles:
                config = self.cfg.providers.get(provider)
                if config is None:
                    raise NotFoundError(f"provider {provider!r} is not in providers/", hint="see `orch provider list`")
                self._handles[provider] = ProviderHandle(self.ws, config)
            return self._handles[provider]

    def target(self, node: NodeRecord) -> SSHTarget:
        return ssh_target(self.ws, node)

    def close(self) -> None:
        self.pool.close_all()


def load_config(ws: Workspace, store: Store) -> WorkspaceConfig:
    cfg = load_workspace_config(ws, known_releases={r.name for r in store.list_releases()})
    cfg.raise_first()
    sync_registrations(store, cfg.providers)
    return cfg


def config_hash(family: NodeFamily, release: ReleaseRecord) -> str:
    """What a node was built from: a change rolls the node; count and scaling don't."""
    shape = family.model_dump(mode="json", exclude={"count", "scaling"})
    return hashlib.sha256(json.dumps([shape, release.sha256], sort_keys=True).encode()).hexdigest()[:16]


def resolve_release(ws: Workspace, store: Store, cfg: WorkspaceConfig, family: NodeFamily) -> ReleaseRecord:
    """The family's release; a source under releases/ is uploaded first (a no-op when unchanged)."""
    source = cfg.release_sources.get(family.release_name)
    if source is not None and family.release_version in (None, source.version):
        return release_catalog.upload_release(ws, store, ws.releases_src_dir / family.release_name).record
    return store.get_release(family.release_name, family.release_version)


def plan_nodes(ctx: FleetContext, family: NodeFamily, count: int, *, save: bool = True) -> PlacementPlan:
    """Place ``count`` more nodes of ``family`` given the providers and the live fleet.

    Capabilities come from the store's cache while fresh; ``save=False`` plans without
    writing a fetched catalogue back (``orch plan`` has no side effects).
    """
    providers = family.placement.providers or sorted(ctx.cfg.providers)
    caps = [ctx.handle(p).capabilities(ctx.store, save=save) for p in providers if p in ctx.cfg.providers]
    fleet = [FleetNode(n.id, n.family, n.provider, n.location)
             for n in ctx.store.list_nodes(states=[s for s in NodeState if s.live and s != NodeState.LOST])]
    return plan_placement(family, count, caps, fleet)


def plan(ws: Workspace, store: Store, family_name: str, *, count: int | None = None) -> tuple[PlacementPlan, int]:
    """What ``spawn`` would create: the plan for the missing nodes, and how many are up.

    No side effects: nothing is written, created or uploaded.
    """
    cfg = load_workspace_config(ws, known_releases={r.name for r in store.list_releases()})
    cfg.raise_first()
    family = cfg.families.get(family_name)
    if family is None:
        raise NotFoundError(f"no node family {family_name!r}", hint="see `orch family list`")
    target = family.count if count is None else count
    up = len(store.list_nodes(family=family.name, states=UP))
    ctx = FleetContext(ws, store, cfg, FleetEvents())
    try:
        return plan_nodes(ctx, family, max(0, target - up), save=False), up
    finally:
        ctx.close()


def settle(ctx: FleetContext, providers: Sequence[str], *, apply: bool = True) -> Recovery:
    """Recover from an interrupted command before acting (orphans, half-made nodes)."""
    handles = {p: ctx.handle(p) for p in providers if p in ctx.cfg.providers}
    return recover(ctx.store, handles, ctx.store.list_nodes(), apply=apply, on_change=ctx.events.note)


def reconcile(ws: Workspace, store: Store, *, apply: bool = False, events: FleetEvents | None = None) -> Recovery:
    """Compare every provider's nodes with the store; settle the differences if ``apply``."""
    cfg = load_workspace_config(ws, known_releases={r.name for r in store.list_releases()})
    cfg.raise_first()
    ctx = FleetContext(ws, store, cfg, events or FleetEvents())
    try:
        return settle(ctx, sorted(cfg.providers), apply=apply)
    finally:
        ctx.close()


def family_lock(ws: Workspace, family_name: str, events: FleetEvents | None = None
                ) -> contextlib.AbstractContextManager[None]:
    """Held while a family's nodes are planned and changed (``spawn``; the autoscaler's
    scale-down): one change at a time per family, between the threads of ``orch serve``
    (health's replacements, the autoscaler, API calls) and any ``orch`` process."""
    note = (events or FleetEvents()).note
    return exclusive(ws.runtime_dir / "locks" / f"family-{family_name}.lock",
                     on_wait=lambda holder: note(f"waiting for another change of family {family_name} ({holder})"))


def spawn(ws: Workspace, store: Store, family_name: str, *, count: int | None = None,
          keep_failed: bool = False, events: FleetEvents | None = None, cause: str = "spawn") -> SpawnReport:
    """Make the family's ready nodes match its count (or ``count``) and config; one
    change of the family at a time (``family_lock``).

    A spawn that leaves every ready node of the family on its release (ok, none stale)
    records that release in the family's history (``Store.record_family_release``)
    when it differs from the last one, whoever started it (``cause``)."""
    check_family_name(family_name)
    with family_lock(ws, family_name, events):
        return spawn_locked(ws, store, family_name, count=count, keep_failed=keep_failed, events=events,
                            cause=cause)


def check_family_name(family_name: str) -> None:
    if not re.fullmatch(NAME_PATTERN, family_name):  # not a family (nor a safe file name)
        raise NotFoundError(f"no node family {family_name!r}", hint="see `orch family list`")


def spawn_locked(ws: Workspace, store: Store, family_name: str, *, count: int | None = None,
                 keep_failed: bool = False, events: FleetEvents | None = None, cause: str = "spawn") -> SpawnReport:
    """``spawn`` for a caller that holds the family's lock (``family_lock``) already:
    ``upgrade.deploy`` changes the family's file and rolls it under one hold."""
    check_family_name(family_name)
    cfg = load_config(ws, store)
    family = cfg.families.get(family_name)
    if family is None:
        raise NotFoundError(f"no node family {family_name!r}", hint="see `orch family list`")
    target = family.count if count is None else count
    if target < 0:
        raise InputError(f"--count must be >= 0, not {target}")
    ctx = FleetContext(ws, store, cfg, events or FleetEvents())
    try:
        dependencies = _dependencies(store, cfg, family)
        release = resolve_release(ws, store, cfg, family)
        manifest = release_catalog.manifest_of(release)
        tarball = release_catalog.read_release(ws, release)
        builds = None
        if manifest.build_on == "builder":
            builds_here = ensure_built_here(ws, store, release)  # this machine's platform, when it can
            if builds_here is not None and builds_here.built:
                ctx.events.note(f"built {release.ref} for {builds_here.artifact.platform}")
            builds = ReleaseBuilds(ws, store, release)
        settle(ctx, sorted(cfg.providers))
        digest = config_hash(family, release)
        spawner = _Spawner(ctx, family, release, manifest, tarball, builds, dependencies, digest, keep_failed)
        report = spawner.run(target)
        if report.ok and report.ready:  # every ready node runs this release: the family's history
            store.record_family_release(family.name, release.ref, release.sha256, cause=cause, nodes=report.ready)
        return report
    finally:
        ctx.close()


def _dependencies(store: Store, cfg: WorkspaceConfig, family: NodeFamily) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for dep in family.bootstrap.depends_on:
        wanted = cfg.families[dep].count
        ready = [n for n in store.list_nodes(family=dep, states=[NodeState.READY]) if n.address]
        if (wanted and len(ready) < wanted) or not ready:
            raise ConflictError(
                f"family {family.name!r} depends on {dep!r}, which has {len(ready)} of {wanted} nodes ready",
                hint=f"run `orch spawn {dep}` first",
            )
        found[dep] = [n.address for n in ready if n.address]
    return found


class _Spawner:
    def __init__(self, ctx: FleetContext, family: NodeFamily, release: ReleaseRecord, manifest: ReleaseManifest,
                 tarball: bytes, builds: ReleaseBuilds | None, dependencies: dict[str, list[str]], digest: str,
                 keep_failed: bool) -> None:
        self.ctx, self.family, self.release, self.manifest = ctx, family, release, manifest
        self.tarball, self.builds = tarball, builds
        self.dependencies, self.digest, self.keep_failed = dependencies, digest, keep_failed
        self.seed: str | None = None

    @property
    def store(self) -> Store:
        return self.ctx.store

    def run(self, target: int) -> SpawnReport:
        report = SpawnReport(self.family.name, target)
        nodes = self.store.list_nodes(family=self.family.name)
        for node in nodes:  # leftovers of failed attempts
            if node.state == NodeState.FAILED and not self.keep_failed:
                self._remove(node, "failed earlier", report)
        up = self.store.list_nodes(family=self.family.name, states=UP)
        current = [n for n in up if n.state == NodeState.READY and n.config_hash == self.digest]
        stale = [n for n in up if n not in current]
        # Scale down: drop the surplus, stale and newest first.
        surplus = len(up) - target
        for node in (stale[::-1] + current[::-1])[:max(0, surplus)]:
            self._remove(node, f"scaling {self.family.name} down to {target}", report)
        keep = {n.id for n in self.store.list_nodes(family=self.family.name, states=UP)}
        stale = [n for n in stale if n.id in keep]
        report.ready = [n.id for n in current if n.id in keep]
        seeds = [n for n in current if n.id in keep]
        self.seed = seeds[0].address if seeds else None
        if stale:
            self._run_strategy([functools.partial(self._roll, n, report) for n in stale], report)
        missing = target - len(self.store.list_nodes(family=self.family.name, states=UP))
        if missing > 0:
            requests = self._plan(missing)
            self._run_strategy([functools.partial(self._bring_up, r, report) for r in requests], report)
        ready = self.store.list_nodes(family=self.family.name, states=[NodeState.READY])
        report.ready = [n.id for n in ready]
        report.stale = [n.id for n in ready if n.config_hash != self.digest]
        return report

    def _plan(self, count: int) -> list[NodeRequest]:
        return list(plan_nodes(self.ctx, self.family, count).requests)

    def _run_strategy(self, jobs: list[Callable[[], bool]], report: SpawnReport) -> None:
        strategy = self.family.bootstrap
        if not jobs:
            return
        if strategy.strategy == "seed_first" and self.seed is None:
            if not jobs[0]():
                return
            ready = self.store.list_nodes(family=self.family.name, states=[NodeState.READY])
            self.seed = ready[0].address if ready else None
            jobs = jobs[1:]
        batch = strategy.batch_size if strategy.strategy == "rolling" else len(jobs)
        workers = min(strategy.concurrency, max(1, batch))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for start in range(0, len(jobs), batch):
                outcomes = list(pool.map(lambda job: job(), jobs[start:start + batch]))
                if strategy.strategy == "rolling" and not all(outcomes):
                    self.ctx.events.note("rolling: a batch failed; stopping here")
                    return

    def _bring_up(self, request: NodeRequest, report: SpawnReport) -> bool:
        """Create and bootstrap one node.

        A provider out of capacity puts that (provider, location, size) in a cooldown
        and the node is re-planned onto the next choice; a failed create or bootstrap
        is replaced up to ``retries`` times.
        """
        failures = 0
        while failures <= self.family.bootstrap.retries:
            node_id = f"{self.family.name}-{secrets.token_hex(3)}"
            record = self.store.add_node(
                node_id, family=self.family.name, provider=request.provider, location=request.location,
                size=request.size, image=request.image, hourly_price=request.hourly_price,
                labels=list(self.family.labels), release=self.release.ref,
                reason="replacement" if failures else "requested",
            )
            self.ctx.events.stage(node_id, "create")
            try:
                handle = self.ctx.handle(request.provider)
                record = create_node(handle, self.store, record, request)
                self.ctx.events.stage(node_id, "boot")
                record = await_running(handle, self.store, record)  # a cloud gives the address once it runs
                report.created.append(node_id)
                if not handle.bootstraps:  # provisioned only (machines we cannot reach)
                    self.store.set_node_state(node_id, NodeState.READY, reason="created; bootstrap is off",
                                              config_hash=self.digest, ready_at=time.time())
                    self.ctx.events.stage(node_id, "ready")
                    return True
                if self._bootstrap(record, report):
                    return True
                failures += 1
            except ProviderCapacityError as exc:
                report.failures.append(exc)
                mark_unavailable(self.store, request, str(exc), whole_provider=isinstance(exc, ProviderQuotaError))
                self._fail(node_id, str(exc), report)
                self.ctx.events.note(f"{request.provider}/{request.location}/{request.size} is full; re-planning")
                try:
                    request = self._plan(1)[0]
                except PlacementError as placement:
                    report.failures.append(placement)
                    return False
            except OrchError as exc:
                report.failures.append(exc)
                self._fail(node_id, str(exc), report)
                failures += 1
        return False

    def _roll(self, node: NodeRecord, report: SpawnReport) -> bool:
        """Bring a stale node up to date: a changed config, or a node an interrupted
        command left booting or bootstrapping (it must run before anything else)."""
        handle = self.ctx.handle(node.provider)
        if node.state != NodeState.READY:
            try:
                node = await_running(handle, self.store, node)
            except OrchError as exc:
                report.failures.append(exc)
                self._fail(node.id, str(exc), report)
                return False
        if not handle.bootstraps:
            if node.state == NodeState.READY:
                self.store.set_node_state(node.id, NodeState.READY, reason="config changed; bootstrap is off",
                                          config_hash=self.digest)
            else:
                self.store.set_node_state(node.id, NodeState.READY, reason="running; bootstrap is off",
                                          config_hash=self.digest, ready_at=time.time())
                self.ctx.events.stage(node.id, "ready")
            report.rolled.append(node.id)
            return True
        ok = self._bootstrap(node, report, serving=node if node.state == NodeState.READY else None)
        if ok:
            report.rolled.append(node.id)
        return ok

    def _bootstrap(self, node: NodeRecord, report: SpawnReport, *, serving: NodeRecord | None = None) -> bool:
        """Bootstrap ``node``: READY, or FAILED (and destroyed unless keep_failed).

        ``serving``: the node is ready and is being rolled in place (the upgrade of a
        running node: its agent, unchanged, keeps running the ports it has while the new
        release goes in beside the old one).  A roll that fails before the node switches
        releases leaves it as it was, ready on its old release and config, so the next
        spawn tries it again; a running job loses nothing.
        """
        store = self.store
        verb = "rolling to" if serving is not None else "bootstrapping"
        node = store.set_node_state(node.id, NodeState.BOOTSTRAPPING, reason=f"{verb} {self.release.ref}",
                                    release=self.release.ref)
        plan = BootstrapPlan(
            node=node, target=self.ctx.target(node), family=self.family, release=self.release,
            manifest=self.manifest, tarball=self.tarball, builds=self.builds, dependencies=self.dependencies,
            seed=self.seed, config_hash=self.digest, workspace=self.ctx.ws,
        )
        log = NodeLog(self.ctx.ws.logs_dir / f"{node.id}.log")
        try:
            installed = bootstrap_node(plan, self.ctx.pool, log, self.ctx.events.stage)
        except BootstrapFailed as exc:
            report.failures.append(exc)
            self.ctx.pool.discard(plan.target)
            if serving is not None and exc.before_switch:
                store.set_node_state(node.id, NodeState.READY, release=serving.release,
                                     config_hash=serving.config_hash,
                                     reason=f"roll to {self.release.ref} failed at {exc.step}; "
                                            f"still on {serving.release}")
                self.ctx.events.stage(node.id, "not rolled")
                return False
            self._fail(node.id, str(exc), report)
            return False
        store.set_node_state(node.id, NodeState.READY, reason="bootstrapped", config_hash=self.digest,
                             ready_at=time.time(), extra={**node.extra, "platform": installed.platform})
        self.ctx.events.stage(node.id, "ready")
        return True

    def _fail(self, node_id: str, reason: str, report: SpawnReport) -> None:
        node = self.store.get_node(node_id)
        if node.state != NodeState.FAILED:
            node = self.store.set_node_state(node_id, NodeState.FAILED, reason=reason.splitlines()[0])
        self.ctx.events.stage(node_id, "failed")
        if not self.keep_failed:
            self._remove(node, "bootstrap failed", report)

    def _remove(self, node: NodeRecord, reason: str, report: SpawnReport) -> None:
        self.ctx.events.stage(node.id, "stopping")
        destroy_node(self.ctx.handle(node.provider), self.store, node, reason=reason)
        report.removed.append(node.id)
        self.ctx.events.stage(node.id, "stopped")


# -- stop -------------------------------------------------------------------------------


def select_nodes(store: Store, *, family: str | None = None, node_ids: Sequence[str] = (),
                 all_nodes: bool = False, states: Sequence[NodeState] | None = None,
                 labels: Sequence[str] = (), provider_labels: Mapping[str, Collection[str]] | None = None,
                 ) -> list[NodeRecord]:
    """Live nodes (or those in ``states``) named by family, by targets (``node_ids``: ids,
    paths, globs: see orchestrator.state.targets), or all of them; ``labels`` narrow them."""
    wanted = list(states) if states is not None else [s for s in NodeState if s.live]
    nodes = store.list_nodes(states=wanted)
    named = ["all"] if all_nodes else [family] if family is not None else list(node_ids)
    return targets.resolve(nodes, named, labels, provider_labels=provider_labels)


def stop(ws: Workspace, store: Store, nodes: Sequence[NodeRecord], *,
         events: FleetEvents | None = None) -> list[str]:
    """Destroy ``nodes`` at their providers, confirm, mark them stopped."""
    cfg = load_config(ws, store)
    ctx = FleetContext(ws, store, cfg, events or FleetEvents())
    stopped: list[str] = []
    errors: list[OrchError] = []
    try:
        settle(ctx, sorted({n.provider for n in nodes}))
        live = {n.id for n in store.list_nodes(states=[s for s in NodeState if s.live])}

        def one(node: NodeRecord) -> None:
            if node.id not in live:
                return
            ctx.events.stage(node.id, "stopping")
            try:
                destroy_node(ctx.handle(node.provider), store, store.get_node(node.id), reason="orch stop")
                stopped.append(node.id)
                ctx.events.stage(node.id, "stopped")
            except OrchError as exc:
                errors.append(exc)
                ctx.events.stage(node.id, "failed")

        with ThreadPoolExecutor(max_workers=max(1, min(32, len(nodes)))) as pool:
            list(pool.map(one, nodes))
    finally:
        ctx.close()
    if errors:
        raise errors[0]
    return stopped
