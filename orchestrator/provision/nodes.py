"""Plan -> nodes through libcloud: create, wait, find, destroy; capabilities; recovery.

Every provider, ours and libcloud's stock drivers alike, is driven through the same
``NodeDriver`` calls.  The store records intent before each create call, and every
node carries tags (workspace, family, node id), so a crash at any point leaves either
a record to settle or a tagged node to find.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from libcloud.compute.base import Node, NodeAuthSSHKey, NodeImage
from libcloud.compute.types import NodeState as CloudState

from orchestrator.config import ProviderConfig
from orchestrator.errors import ProviderError, ProviderTransientError
from orchestrator.provision.placement import NodeRequest, ProviderCapabilities, SizeOffer
from orchestrator.provision.registry import api_error_code, locations_by_key, make_driver, map_libcloud_errors
from orchestrator.state import NodeRecord, NodeState, Store
from orchestrator.workspace import Workspace

TAG_WORKSPACE = "orch-workspace"
TAG_FAMILY = "orch-family"
TAG_NODE = "orch-node"

T = TypeVar("T")


CAPABILITIES_SCOPE = "capabilities"
CAPABILITIES_TTL_SECONDS = 3600.0
CATALOGUE_VERSION = 2
"""Bumped when the cached shape or meaning changes (2: locations by name, image archs)."""


@dataclass(frozen=True)
class Catalogue:
    """What a driver offers, as plain data: cached in the store between commands."""

    fetched_at: float
    locations: tuple[str, ...]
    sizes: tuple[SizeOffer, ...]  # the driver's own prices; the registration may override them
    images: tuple[str, ...]
    image_archs: dict[str, str] = field(default_factory=dict)  # image id -> arch, where the driver says

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Catalogue:
        return cls(
            fetched_at=float(data["fetched_at"]),
            locations=tuple(data["locations"]),
            sizes=tuple(SizeOffer(**s) for s in data["sizes"]),
            images=tuple(data["images"]),
            image_archs=dict(data.get("image_archs") or {}),
        )


@dataclass
class ProviderHandle:
    """A provider's config and its driver, made once per command and shared by threads."""

    ws: Workspace
    config: ProviderConfig
    _driver: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _objects: dict[str, dict[str, Any]] | None = None
    _key_lock: threading.Lock = field(default_factory=threading.Lock)
    _key_name: str | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def driver(self) -> Any:
        with self._lock:
            if self._driver is None:
                self._driver = make_driver(self.ws, self.config)
            return self._driver

    def catalogue(self) -> dict[str, dict[str, Any]]:
        """The driver's libcloud objects by id, for create calls (asked once).

        With an ``image`` in the registration, images are not listed (EC2 lists
        thousands): the image is named by id, as libcloud allows.
        """
        with self._lock:
            cached = self._objects
        if cached is not None:
            return cached
        driver = self.driver

        def fetch() -> dict[str, dict[str, Any]]:
            if self.config.image is not None:
                images = {self.config.image: _named_image(driver, self.config.image)}
            else:
                images = {str(i.id): i for i in driver.list_images()}
            return {
                "sizes": {str(s.id): s for s in driver.list_sizes()},
                "images": images,
                "locations": locations_by_key(driver.list_locations()),
            }

        objects = retrying(fetch, self)
        with self._lock:
            self._objects = objects
        return objects

    def offers(self, store: Store | None = None, *, ttl: float = CAPABILITIES_TTL_SECONDS,
               save: bool = True, refresh: bool = False) -> Catalogue:
        """The provider's catalogue: from the store's cache while fresh, else from the
        driver (saved back to the cache when ``save``)."""
        if store is not None and not refresh:
            cached = store.kv_get(self.name, scope=CAPABILITIES_SCOPE)
            if cached and cached.get("driver") == self.config.driver and \
                    cached.get("version") == CATALOGUE_VERSION and \
                    time.time() - cached["catalogue"]["fetched_at"] < ttl:
                return Catalogue.from_json(cached["catalogue"])
        objects = self.catalogue()
        archs = {i: canonical_arch(_arch_of(image.extra)) for i, image in objects["images"].items()}
        catalogue = Catalogue(
            fetched_at=time.time(),
            locations=tuple(sorted(objects["locations"])),
            sizes=tuple(_offer(size) for size in objects["sizes"].values()),
            images=tuple(sorted(objects["images"])),
            image_archs={i: a for i, a in sorted(archs.items()) if a},
        )
        if store is not None and save:
            store.kv_put(self.name, {"driver": self.config.driver, "version": CATALOGUE_VERSION,
                                     "catalogue": catalogue.to_json()}, scope=CAPABILITIES_SCOPE)
        return catalogue

    def capabilities(self, store: Store | None = None, *, save: bool = True) -> ProviderCapabilities:
        """The catalogue merged with the registration (labels, priority, quota, prices,
        image) and the store's cooldowns.  Sizes that cannot boot the image (another
        architecture, where both are known) are left out."""
        catalogue = self.offers(store, save=save)
        cfg = self.config
        image = cfg.image if cfg.image is not None else (catalogue.images[0] if catalogue.images else "")
        image_arch = catalogue.image_archs.get(image)
        sizes = [s for s in catalogue.sizes if arch_fits(image_arch, s.arch)]
        return ProviderCapabilities(
            name=cfg.name,
            driver=cfg.driver,
            labels=frozenset(cfg.labels),
            priority=cfg.priority,
            max_nodes=cfg.max_nodes,
            locations=catalogue.locations,
            sizes=tuple(dataclasses.replace(s, hourly_price=cfg.prices.get(s.id, s.hourly_price))
                        for s in sizes),
            image=image,
            unavailable=unavailable(store, cfg.name) if store is not None else frozenset(),
        )

    def tagged_nodes(self, workspace_id: str) -> list[Node]:
        """Every node at the provider that carries this workspace's tag and is not gone
        (EC2 lists terminated instances for a while)."""
        nodes = retrying(lambda: list(self.driver.list_nodes()), self)
        return [n for n in nodes if node_tags(n).get(TAG_WORKSPACE) == workspace_id and not is_gone(n)]

    def key_arguments(self, store: Store) -> dict[str, Any]:
        """How ``create_node`` gets the fleet key: ``ex_keyname`` of a key pair imported
        once (drivers with key pairs, like EC2's), else ``auth=NodeAuthSSHKey``."""
        driver = self.driver
        if "ex_keyname" not in inspect.signature(driver.create_node).parameters:
            return {"auth": NodeAuthSSHKey(public_key(self.ws))}
        with self._key_lock:  # parallel creates: one import per handle
            if self._key_name is None:
                self._key_name = import_key_pair(self, store.workspace_id)
            return {"ex_keyname": self._key_name}


def key_pair_name(workspace_id: str, pubkey: str) -> str:
    """``orch-<workspace id>-<12 hex of the key's sha256>``: the same for every command
    of a workspace, and another name once the fleet key changes."""
    fields = pubkey.split()
    blob = fields[1] if len(fields) > 1 else pubkey
    return f"orch-{workspace_id}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def import_key_pair(handle: ProviderHandle, workspace_id: str) -> str:
    """Import the fleet's public key as a key pair at the provider; returns its name.

    A pair of that name already there (an earlier command, another process) is ours:
    the name carries the key's digest.  libcloud's find-or-import by fingerprint is not
    used: EC2 reports another fingerprint than libcloud computes for ed25519 keys.
    """
    pubkey = public_key(handle.ws)
    name = key_pair_name(workspace_id, pubkey)

    def attempt() -> None:
        try:
            handle.driver.import_key_pair_from_string(name, pubkey)
        except Exception as exc:
            if not _already_exists(exc):
                raise

    retrying(attempt, handle)
    return name


def _already_exists(exc: BaseException) -> bool:
    """Whether a key-pair import failed only because the name is taken."""
    if api_error_code(exc) in ("InvalidKeyPair.Duplicate", "KeyPairAlreadyExists"):
        return True
    status = getattr(exc, "code", None)
    text = str(getattr(exc, "message", None) or getattr(exc, "value", None) or exc).lower()
    return status == 409 or "already exists" in text


def _named_image(driver: Any, image_id: str) -> NodeImage:
    """The registered image, with its details (architecture) where the driver can tell
    them cheaply (EC2's get_image: one DescribeImages); else just its id."""
    bare = NodeImage(image_id, image_id, driver)
    if not callable(getattr(driver, "get_image", None)):
        return bare
    try:
        image = driver.get_image(image_id)
    except Exception:  # not offered by the driver, or unknown: create_node will say
        return bare
    return image if isinstance(image, NodeImage) and str(image.id) == image_id else bare


def _arch_of(extra: dict[str, Any] | None) -> str | None:
    extra = extra or {}
    value = extra.get("arch") or extra.get("architecture")
    if value:
        return str(value)
    processor = str(extra.get("physicalProcessor") or "").lower()  # EC2's size catalogue
    if "graviton" in processor:
        return "aarch64"
    if "intel" in processor or "amd" in processor:
        return "x86_64"
    return None


_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "x86-64": "x86_64", "arm64": "aarch64", "armv8": "aarch64",
                 "i686": "i386", "x86": "i386"}


def canonical_arch(value: str | None) -> str | None:
    """An architecture by its ``uname -m`` name, whatever the driver calls it.

    >>> canonical_arch("arm64"), canonical_arch("x86_64"), canonical_arch(None)
    ('aarch64', 'x86_64', None)
    """
    if not value:
        return None
    name = value.strip().lower()
    return _ARCH_ALIASES.get(name, name)


def arch_fits(image_arch: str | None, size_arch: str | None) -> bool:
    """Whether a size of ``size_arch`` boots an image of ``image_arch`` (unknown: yes)."""
    if not image_arch or not size_arch or image_arch == size_arch:
        return True
    return image_arch == "i386" and size_arch == "x86_64"


def _offer(size: Any) -> SizeOffer:
    extra = size.extra or {}
    cpus = (extra.get("cpus") or extra.get("vcpus") or extra.get("vcpu") or extra.get("cpu")
            or getattr(size, "vcpus", None) or 1)
    try:
        count = max(1, int(float(cpus)))
    except (TypeError, ValueError):
        count = 1
    return SizeOffer(
        id=str(size.id), name=str(size.name), cpus=count, ram_mb=int(size.ram or 0),
        disk_gb=int(size.disk or 0), arch=canonical_arch(_arch_of(extra)), hourly_price=float(size.price or 0.0),
    )


# What a node is doing, in the words of drivers that say more than libcloud's NodeState:
# EC2 lists an instance "shutting-down", then "terminated", for a while after it is gone.
GONE_STATUSES = frozenset({"shutting-down", "terminating", "terminated", "deleting", "deleted"})
# States a node does not leave by itself: one that never got ready is no use.
DEAD_STATES = frozenset({CloudState.STOPPED, CloudState.ERROR})


def _status(node: Node) -> str:
    return str((node.extra or {}).get("status") or "").lower()


def is_gone(node: Node) -> bool:
    """Terminated, or on its way there: as good as not listed."""
    return bool(node.state == CloudState.TERMINATED or _status(node) in GONE_STATUSES)


def is_dead(node: Node) -> bool:
    """Listed, but stopped or failed: it will not run unless someone starts it."""
    return bool(node.state in DEAD_STATES or _status(node) in ("stopped", "stopping"))


def node_tags(node: Node) -> dict[str, str]:
    extra = node.extra or {}
    tags = extra.get("tags") or extra.get("labels") or {}
    return {str(k): str(v) for k, v in dict(tags).items()}


def public_key(ws: Workspace) -> str:
    return ws.ssh_key.with_suffix(".pub").read_text().strip()


RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0)
"""Seconds between tries of a call that failed transiently (throttling, 5xx, timeouts)."""

COOLDOWN_SCOPE = "cooldown"
COOLDOWN_SECONDS = 600.0


def retrying(call: Callable[[], T], handle: ProviderHandle, *, delays: Sequence[float] = RETRY_DELAYS) -> T:
    """``call()`` under ``map_libcloud_errors``, retried with backoff on transient errors.

    Only for calls that are safe to repeat (listing); creation checks for its node first.
    """
    for delay in (*delays, None):
        try:
            with map_libcloud_errors(handle.name):
                return call()
        except ProviderTransientError:
            if delay is None:
                raise
            time.sleep(delay)
    raise AssertionError("unreachable")


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
    try:
        key = handle.key_arguments(store)
    except ProviderError as exc:
        store.set_node_state(record.id, NodeState.FAILED, reason=str(exc))
        raise
    for delay in (*delays, None):
        try:
            with map_libcloud_errors(handle.name):
                node = handle.driver.create_node(
                    name=record.id,
                    size=cat["sizes"][request.size],
                    image=cat["images"][request.image],
                    location=cat["locations"].get(request.location),
                    **key,
                    **tag_arguments(handle.driver, tags),
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


# How libcloud drivers take tags at create time, in order of preference: ours and
# Azure's ex_tags, EC2's and OpenStack's ex_metadata, GCE's ex_labels.
TAG_ARGUMENTS = ("ex_tags", "ex_metadata", "ex_labels")


def tag_arguments(driver: Any, tags: dict[str, str]) -> dict[str, dict[str, str]]:
    """``{"ex_tags": tags}`` or whatever the driver's ``create_node`` calls it."""
    params = inspect.signature(driver.create_node).parameters
    for name in TAG_ARGUMENTS:
        if name in params:
            return {name: tags}
    raise ProviderError(f"driver {type(driver).__name__} cannot tag nodes at create time",
                        hint="orch needs tags to find its nodes again; use a driver that takes ex_tags or ex_metadata")


def _tagged_node(handle: ProviderHandle, store: Store, node_id: str) -> Node | None:
    try:
        nodes = handle.tagged_nodes(store.workspace_id)
    except ProviderError:
        return None  # we cannot look; recover() will find it on the next run
    return next((n for n in nodes if node_tags(n).get(TAG_NODE) == node_id), None)


def mark_unavailable(store: Store, request: NodeRequest, reason: str, *, whole_provider: bool = False,
                     seconds: float = COOLDOWN_SECONDS) -> None:
    """Keep placement off (provider, location, size) for a while after a capacity error,
    or off the whole provider (``*/*``) after a quota error."""
    where = "*/*" if whole_provider else f"{request.location}/{request.size}"
    key = f"{request.provider}/{where}"
    with store.transaction():
        store.kv_put(key, {"until": time.time() + seconds, "reason": reason}, scope=COOLDOWN_SCOPE)
        store.record_event("provider.cooldown", provider=request.provider,
                           reason=f"{where} unavailable for {seconds:.0f} s: {reason}")


def cooldowns(store: Store, *, now: float | None = None) -> dict[str, dict[str, Any]]:
    """Active cooldowns: "provider/location/size" -> {"until", "reason"}."""
    moment = time.time() if now is None else now
    return {k: v for k, v in store.kv_items(scope=COOLDOWN_SCOPE).items() if v["until"] > moment}


def unavailable(store: Store, provider: str) -> frozenset[tuple[str, str]]:
    found = set()
    for key in cooldowns(store):
        name, location, size = key.split("/", 2)
        if name == provider:
            found.add((location, size))
    return frozenset(found)


def adopt(store: Store, node_id: str, node: Node, handle: ProviderHandle) -> NodeRecord:
    """Record what the provider says of a node we created (after create or a crash)."""
    extra = node.extra or {}
    addresses = list(node.public_ips or node.private_ips or [])
    address = str(addresses[0]) if addresses else None
    current = store.get_node(node_id)
    state = NodeState.BOOTING if current.state in (NodeState.REQUESTED, NodeState.CREATING) else current.state
    return store.set_node_state(
        node_id, state, reason=f"{handle.name} node {node.id}",
        provider_node_id=str(node.id), address=address, port=int(extra.get("port", 22)),
        ssh_user=extra.get("ssh_user"), host_key=extra.get("host_key") or current.host_key,
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
            raise ProviderError(f"provider {handle.name!r}: node {provider_node_id} is {_state_text(found)}, "
                                "not running")
        if found is None and seen:
            raise ProviderError(f"provider {handle.name!r}: node {provider_node_id} vanished while booting")
        seen = seen or found is not None
        if time.monotonic() > deadline:
            state = _state_text(found) if found is not None else "not listed"
            raise ProviderError(f"provider {handle.name!r}: node {provider_node_id} not running after "
                                f"{timeout:.0f} s (state {state})")
        time.sleep(delay)
        delay = min(delay * 2, 2.0)


def _state_text(node: Node) -> str:
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
            with map_libcloud_errors(handle.name):
                handle.driver.destroy_node(node)
            if find_node(handle, record.provider_node_id) is not None:
                raise ProviderError(f"provider {handle.name!r} still lists node {record.id} after destroy",
                                    hint="run `orch stop` again")
    return store.set_node_state(record.id, NodeState.STOPPED, reason=reason)


def destroy_orphan(handle: ProviderHandle, node: Node) -> None:
    with map_libcloud_errors(handle.name):
        handle.driver.destroy_node(node)


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
        tagged = {node_tags(n)[TAG_NODE]: n for n in handle.tagged_nodes(wid) if TAG_NODE in node_tags(n)}
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
                on_change(f"{node_id}: never got ready and {name} reports it {_state_text(node)}; "
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
    reason = f"never got ready; {handle.name} reports it {_state_text(node)}"
    destroy_orphan(handle, node)
    if find_node(handle, str(node.id)) is not None:
        raise ProviderError(f"provider {handle.name!r} still lists node {record.id} after destroy",
                            hint="run `orch reconcile --apply` again")
    store.set_node_state(record.id, NodeState.FAILED, reason=reason)
    store.set_node_state(record.id, NodeState.STOPPED, reason="destroyed by recovery")


def refresh_catalogues(ws: Workspace, store: Store, configs: Iterable[ProviderConfig]) -> dict[str, Catalogue]:
    """Ask each provider's driver for its catalogue now and cache it."""
    return {c.name: ProviderHandle(ws, c).offers(store, refresh=True) for c in configs}
