"""Placement: a family's demands x providers' capabilities x the current fleet -> a plan.

Pure functions, no I/O: everything they need arrives as values, so a plan can be
computed, shown, tested from YAML, and then executed unchanged.

>>> plan = plan_placement(family, 5, capabilities, fleet)      # doctest: +SKIP
>>> [r.provider for r in plan.requests]                         # doctest: +SKIP
['private', 'private', 'private', 'public', 'public']
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from orchestrator.config import NodeFamily
from orchestrator.errors import InputError


@dataclass(frozen=True)
class SizeOffer:
    """One size a provider offers in one location."""

    id: str
    name: str
    cpus: int
    ram_mb: int
    disk_gb: int
    arch: str | None
    hourly_price: float


@dataclass(frozen=True)
class ProviderCapabilities:
    name: str
    driver: str
    labels: frozenset[str]
    priority: int
    max_nodes: int | None
    locations: tuple[str, ...]
    sizes: tuple[SizeOffer, ...]
    image: str
    unavailable: frozenset[tuple[str, str]] = frozenset()  # (location, size) in cooldown


@dataclass(frozen=True)
class FleetNode:
    """What placement needs to know of an existing live node."""

    id: str
    family: str
    provider: str
    location: str


@dataclass(frozen=True)
class NodeRequest:
    provider: str
    location: str
    size: str
    image: str
    hourly_price: float
    cpus: int
    ram_mb: int


@dataclass(frozen=True)
class Rejection:
    provider: str
    reason: str
    location: str | None = None
    size: str | None = None

    def __str__(self) -> str:
        where = "/".join(p for p in (self.provider, self.location, self.size) if p)
        return f"{where}: {self.reason}"


@dataclass(frozen=True)
class PlacementPlan:
    family: str
    requests: tuple[NodeRequest, ...]
    rejected: tuple[Rejection, ...] = field(default_factory=tuple)

    @property
    def hourly_cost(self) -> float:
        return sum(r.hourly_price for r in self.requests)


class PlacementError(InputError):
    """No (or not enough) capacity matches the family's demands."""

    def __init__(self, message: str, rejected: Sequence[Rejection]) -> None:
        self.rejected = tuple(rejected)
        reasons = "; ".join(str(r) for r in self.rejected[:6])
        more = f" (+{len(self.rejected) - 6} more)" if len(self.rejected) > 6 else ""
        super().__init__(f"{message}: {reasons}{more}" if reasons else message)


@dataclass
class _Slot:
    """A (provider, location) with the size chosen for the family and room left."""

    provider: ProviderCapabilities
    location: str
    size: SizeOffer
    room: int  # nodes that still fit under the provider's quota (shared across its locations)
    order: int
    preferred: int


def plan_placement(
    family: NodeFamily,
    count: int,
    capabilities: Sequence[ProviderCapabilities],
    fleet: Sequence[FleetNode],
) -> PlacementPlan:
    """Place ``count`` new nodes of ``family``; raise PlacementError when they don't fit."""
    rejected: list[Rejection] = []
    slots = _candidate_slots(family, capabilities, fleet, rejected)
    if count <= 0:
        return PlacementPlan(family.name, (), tuple(rejected))
    if not slots:
        raise PlacementError(f"no provider can host family {family.name!r}", rejected)

    used = Counter(n.provider for n in fleet)
    room = {cap.name: _room(cap, used[cap.name]) for cap in capabilities}
    here = Counter((n.provider, n.location) for n in fleet if n.family == family.name)
    requests: list[NodeRequest] = []
    for _ in range(count):
        open_slots = [s for s in slots if room[s.provider.name] > 0]
        if not open_slots:
            break
        slot = _choose(family.placement.policy, open_slots, here)
        room[slot.provider.name] -= 1
        here[(slot.provider.name, slot.location)] += 1
        requests.append(NodeRequest(
            provider=slot.provider.name, location=slot.location, size=slot.size.id, image=slot.provider.image,
            hourly_price=slot.size.hourly_price, cpus=slot.size.cpus, ram_mb=slot.size.ram_mb,
        ))
    if len(requests) < count:
        full = [Rejection(s.provider.name, f"quota full (max_nodes {s.provider.max_nodes})")
                for s in slots if room[s.provider.name] <= 0]
        raise PlacementError(
            f"only {len(requests)} of {count} nodes of family {family.name!r} fit", _unique(rejected + full)
        )
    return PlacementPlan(family.name, tuple(requests), tuple(rejected))


def _room(cap: ProviderCapabilities, used: int) -> int:
    return 10**9 if cap.max_nodes is None else max(0, cap.max_nodes - used)


def _choose(policy: str, slots: list[_Slot], here: Counter[tuple[str, str]]) -> _Slot:
    if policy == "cheapest":
        return min(slots, key=lambda s: (s.size.hourly_price, -s.preferred, s.order))
    if policy == "spread":
        return min(slots, key=lambda s: (here[(s.provider.name, s.location)], -s.preferred, s.order))
    if policy == "pack":
        providers_used = {p for (p, _), n in here.items() if n > 0}
        return min(slots, key=lambda s: (s.provider.name not in providers_used, -s.room, -s.preferred, s.order))
    return min(slots, key=lambda s: (-s.preferred, s.order))  # ordered


def _candidate_slots(
    family: NodeFamily,
    capabilities: Sequence[ProviderCapabilities],
    fleet: Sequence[FleetNode],
    rejected: list[Rejection],
) -> list[_Slot]:
    demands, placement = family.demands, family.placement
    by_name = {c.name: c for c in capabilities}
    if placement.providers:
        ordered = []
        for name in placement.providers:
            if name in by_name:
                ordered.append(by_name[name])
            else:
                rejected.append(Rejection(name, "not registered"))
    else:
        ordered = sorted(capabilities, key=lambda c: (c.priority, c.name))

    colocated = {(n.provider, n.location) for n in fleet if n.family == placement.colocate_with}
    avoided = {(n.provider, n.location) for n in fleet if n.family in placement.avoid}
    used = Counter(n.provider for n in fleet)
    slots: list[_Slot] = []
    for order, cap in enumerate(ordered):
        missing = set(demands.labels) - cap.labels
        if missing:
            rejected.append(Rejection(cap.name, f"lacks label(s) {', '.join(sorted(missing))}"))
            continue
        preferred = len(set(demands.prefer_labels) & cap.labels)
        for location in cap.locations:
            if demands.locations and not any(fnmatch.fnmatchcase(location, g) for g in demands.locations):
                rejected.append(Rejection(cap.name, f"not in {', '.join(demands.locations)}", location))
                continue
            if placement.colocate_with and (cap.name, location) not in colocated:
                rejected.append(Rejection(cap.name, f"no node of {placement.colocate_with} here", location))
                continue
            if (cap.name, location) in avoided:
                rejected.append(Rejection(cap.name, f"hosts {', '.join(placement.avoid)} (avoid)", location))
                continue
            size = _smallest_fit(family, cap, location, rejected)
            if size is not None:
                slots.append(_Slot(cap, location, size, _room(cap, used[cap.name]), order, preferred))
    return slots


def _smallest_fit(family: NodeFamily, cap: ProviderCapabilities, location: str,
                  rejected: list[Rejection]) -> SizeOffer | None:
    demands = family.demands
    fits: list[SizeOffer] = []
    for size in cap.sizes:
        reason = None
        if (location, size.id) in cap.unavailable:
            reason = "unavailable (cooling down after a capacity error)"
        elif size.cpus < demands.cpus:
            reason = f"{size.cpus} cpus < {demands.cpus}"
        elif size.ram_mb < demands.ram_mb:
            reason = f"{size.ram_mb} MB RAM < {demands.ram_mb}"
        elif size.disk_gb < demands.disk_gb:
            reason = f"{size.disk_gb} GB disk < {demands.disk_gb}"
        elif demands.arch and size.arch and size.arch != demands.arch:
            reason = f"arch {size.arch} != {demands.arch}"
        elif demands.max_price is not None and size.hourly_price > demands.max_price:
            reason = f"${size.hourly_price}/h > max_price ${demands.max_price}"
        if reason:
            rejected.append(Rejection(cap.name, reason, location, size.id))
        else:
            fits.append(size)
    if not fits:
        return None
    return min(fits, key=lambda s: (s.cpus, s.ram_mb, s.disk_gb, s.hourly_price, s.id))


def _unique(items: list[Rejection]) -> list[Rejection]:
    return list(dict.fromkeys(items))
