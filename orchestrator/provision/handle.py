"""A provider's handle: its config, its driver (made once, shared by threads), its
catalogue and capabilities, the fleet key it creates nodes with, and retries of calls
that are safe to repeat.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from libcloud.compute.base import NodeAuthSSHKey

from orchestrator.config import ProviderConfig
from orchestrator.errors import ProviderTransientError
from orchestrator.provision.catalogue import (
    CAPABILITIES_SCOPE,
    CAPABILITIES_TTL_SECONDS,
    CATALOGUE_VERSION,
    Catalogue,
    arch_fits,
    arch_of,
    canonical_arch,
    locations_by_key,
    named_image,
    offer_of,
    sizes_at,
    sizes_by_key,
)
from orchestrator.provision.cloud_errors import api_error_code, map_libcloud_errors
from orchestrator.provision.cooldowns import unavailable
from orchestrator.provision.drivers import DriverFeatures, driver_class, features_of
from orchestrator.provision.placement import ProviderCapabilities
from orchestrator.provision.registry import make_driver
from orchestrator.state import Store
from orchestrator.workspace import Workspace

T = TypeVar("T")
RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0)
"""Seconds between tries of a call that failed transiently (throttling, 5xx, timeouts)."""


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
    def features(self) -> DriverFeatures:
        """What the provider's driver declares (how it takes tags and the key, ...)."""
        return features_of(driver_class(self.config.driver))

    @property
    def bootstraps(self) -> bool:
        """Whether its nodes are bootstrapped over SSH: the registration's ``bootstrap``,
        unless the driver declares its nodes cannot be (provisioned only)."""
        return self.config.bootstrap and self.features.bootstrap

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
                images = {self.config.image: named_image(driver, self.config.image)}
            else:
                images = {str(i.id): i for i in driver.list_images()}
            return {
                "sizes": sizes_by_key(sizes := driver.list_sizes()),
                "sizes_at": sizes_at(sizes),  # (GCE: a machine type of each zone)
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
        archs = {i: canonical_arch(arch_of(image.extra)) for i, image in objects["images"].items()}
        catalogue = Catalogue(
            fetched_at=time.time(),
            locations=tuple(sorted(objects["locations"])),
            sizes=tuple(offer_of(size, key) for key, size in objects["sizes"].items()),
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

    def key_arguments(self, store: Store) -> dict[str, Any]:
        """How ``create_node`` gets the fleet key, as the driver declares: ``auth=NodeAuthSSHKey``;
        ``ex_keyname`` of a key pair imported once (EC2, OpenStack); the ``ssh-keys``
        metadata item ``USER:KEY`` (GCE); ``ex_create_attr={"ssh_keys": [ID]}`` of a key
        imported once into the account (DigitalOcean: libcloud's ``ex_ssh_key_ids`` does the
        same with a deprecation warning).  With the login user where the cloud makes it (Azure)."""
        style, user = self.features.ssh_key, self.config.ssh_user
        args: dict[str, Any]
        if style == "auth":
            args = {"auth": NodeAuthSSHKey(public_key(self.ws))}
        elif style == "metadata":
            args = {"ex_metadata": {"ssh-keys": f"{user}:{public_key(self.ws)}"}}
        else:
            with self._key_lock:  # parallel creates: one import per handle
                if self._key_name is None:
                    importer = import_key_pair if style == "key_pair" else import_account_key
                    self._key_name = importer(self, store.workspace_id)
            args = {"ex_keyname": self._key_name} if style == "key_pair" else \
                {"ex_create_attr": {"ssh_keys": [account_key_ref(self._key_name)]}}
        if self.features.login_user:
            args[self.features.login_user] = user
        return args

    def create_options(self) -> dict[str, Any]:
        """The registration's options that the driver declares go to ``create_node``."""
        return {k: v for k, v in self.config.options.items() if k in self.features.create_options}


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


def import_account_key(handle: ProviderHandle, workspace_id: str) -> str:
    """The id of the fleet's public key among the account's SSH keys (DigitalOcean),
    imported under :func:`key_pair_name` when it is not there yet.  The same key under
    another name (added by hand) is that key: DigitalOcean refuses a second copy."""
    pubkey = public_key(handle.ws)
    name = key_pair_name(workspace_id, pubkey)
    blob = pubkey.split()[1:2]

    def attempt() -> str:
        for pair in handle.driver.list_key_pairs():
            if pair.name == name or (blob and str(pair.public_key or "").split()[1:2] == blob):
                return str((pair.extra or {}).get("id") or pair.fingerprint)
        pair = handle.driver.create_key_pair(name, public_key=pubkey)
        return str((pair.extra or {}).get("id") or pair.fingerprint)

    return retrying(attempt, handle)


def account_key_ref(key: str) -> int | str:
    """An account key as DigitalOcean's ``ssh_keys`` takes it: its id as a JSON number
    (a string there is read as a fingerprint).

    >>> account_key_ref("512190"), account_key_ref("3b:21:6f")
    (512190, '3b:21:6f')
    """
    return int(key) if key.isdigit() else key


def _already_exists(exc: BaseException) -> bool:
    """Whether a key-pair import failed only because the name is taken."""
    if api_error_code(exc) in ("InvalidKeyPair.Duplicate", "KeyPairAlreadyExists"):
        return True
    status = getattr(exc, "code", None)
    text = str(getattr(exc, "message", None) or getattr(exc, "value", None) or exc).lower()
    return status == 409 or "already exists" in text


def public_key(ws: Workspace) -> str:
    return ws.ssh_key.with_suffix(".pub").read_text().strip()


def retrying(call: Callable[[], T], handle: ProviderHandle, *, delays: Sequence[float] = RETRY_DELAYS) -> T:
    """``call()`` under ``map_libcloud_errors``, retried with backoff on transient errors.

    Only for calls that are safe to repeat (listing); creation checks for its node first.
    """
    for delay in (*delays, None):
        try:
            with map_libcloud_errors(handle.name, handle.features.errors):
                return call()
        except ProviderTransientError:
            if delay is None:
                raise
            time.sleep(delay)
    raise AssertionError("unreachable")


def refresh_catalogues(ws: Workspace, store: Store, configs: Iterable[ProviderConfig]) -> dict[str, Catalogue]:
    """Ask each provider's driver for its catalogue now and cache it."""
    return {c.name: ProviderHandle(ws, c).offers(store, refresh=True) for c in configs}
