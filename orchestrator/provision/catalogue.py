"""A provider's catalogue: what its driver offers (locations, sizes with cpus, RAM,
disk, architecture and price, images), as plain data that the store caches between
commands, and the reading of libcloud's objects into it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from libcloud.compute.base import NodeImage

from orchestrator.provision.placement import SizeOffer

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


def named_image(driver: Any, image_id: str) -> NodeImage:
    """The registered image, with its details (architecture) where the driver can tell
    them cheaply (EC2's get_image: one DescribeImages); else just its id."""
    bare = NodeImage(image_id, image_id, driver)
    for lookup in ("get_image", "ex_get_image"):  # (GCE's: by name or link, its get_image unimplemented)
        if not callable(getattr(driver, lookup, None)):
            continue
        try:
            image = getattr(driver, lookup)(image_id)
        except Exception:  # not offered by the driver, or unknown: create_node will say
            continue
        if isinstance(image, NodeImage) and (lookup == "ex_get_image" or str(image.id) == image_id):
            return image  # (GCE's: the latest image of that name, link or family link)
    return bare


def arch_of(extra: dict[str, Any] | None) -> str | None:
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


def offer_of(size: Any, key: str | None = None) -> SizeOffer:
    """The size as plain data; ``key``: what orch calls it (:func:`sizes_by_key`)."""
    extra = size.extra or {}
    cpus = (extra.get("cpus") or extra.get("vcpus") or extra.get("vcpu") or extra.get("cpu")
            or extra.get("guestCpus")  # (GCE)
            or extra.get("numberOfCores") or getattr(size, "vcpus", None) or 1)  # (Azure: numberOfCores)
    try:
        count = max(1, int(float(cpus)))
    except (TypeError, ValueError):
        count = 1
    return SizeOffer(
        id=key or str(size.id), name=str(size.name), cpus=count, ram_mb=int(size.ram or 0),
        disk_gb=int(size.disk or 0), arch=canonical_arch(arch_of(extra)), hourly_price=float(size.price or 0.0),
    )


def sizes_by_key(sizes: Sequence[Any]) -> dict[str, Any]:
    """A driver's NodeSizes by the key orch plans and prices them with: the id, unless
    the driver lists each size once per location under one id (GCE's zonal machine
    types): then the name (``n1-standard-1``), the first one listed (see :func:`sizes_at`).
    """
    ids = [str(s.id) for s in sizes]
    if len(set(ids)) == len(ids):
        return dict(zip(ids, sizes, strict=True))
    by_name: dict[str, Any] = {}
    for size in sizes:
        by_name.setdefault(str(size.name), size)
    return by_name


def sizes_at(sizes: Sequence[Any]) -> dict[str, Any]:
    """Sizes listed once per location (GCE's machine types, each with its zone in
    ``extra["zone"]``) by ``LOCATION/NAME``: a create takes its location's own.  Empty
    for a driver whose sizes are not per location."""
    ids = [str(s.id) for s in sizes]
    if len(set(ids)) == len(ids):  # one size per id: not per location
        return {}
    out: dict[str, Any] = {}
    for size in sizes:
        zone = (size.extra or {}).get("zone")
        where = zone if isinstance(zone, str) else getattr(zone, "name", None)
        if where:
            out[f"{where}/{size.name}"] = size
    return out


_LOCATION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
DEFAULT_LOCATION = "default"


def locations_by_key(locations: Sequence[Any]) -> dict[str, Any]:
    """A driver's NodeLocations by the key orch uses in resource paths, plans and globs.

    That is the location's id, unless the id is only its position in the list (EC2's
    ``list_locations`` numbers availability zones "0", "1", ...): then its name, such as
    ``us-east-1a``, when every location has a distinct one that fits in a path.  A
    driver's only location, numbered and nameless (OpenStack's: the region its
    registration names), is ``default``.
    """
    ids = [str(loc.id) for loc in locations]
    names = [str(getattr(loc, "name", "") or "") for loc in locations]
    positional = bool(ids) and all(i.isdigit() for i in ids)
    if positional and names == [""]:
        return {DEFAULT_LOCATION: locations[0]}
    if positional and all(_LOCATION_NAME.fullmatch(n) for n in names) and len(set(names)) == len(names):
        return dict(zip(names, locations, strict=True))
    return dict(zip(ids, locations, strict=True))
