"""Placement: a family's demands x providers' capabilities x the current fleet -> a plan.

Pure functions, no I/O: everything they need arrives as values, so a plan can be
computed, shown, tested from YAML, and then executed unchanged.

>>> plan = plan_placement(family, 5, capabilities, fleet)      # doctest: +SKIP
>>> [r.provider for r in plan.requests]                         # doctest: +SKIP
['private', 'private', 'private', 'public', 'public']
"""

from __future__ import annotations

import fnmatch
import heapq
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
    unavailable: frozenset[tuple[str, str]] = frozenset()  # (location, size) cooling down; ("*", "*"): all


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
    if family.placement.policy == "spread":
        requests = _spread(slots, count, room, here)
    else:
        requests = _fill(family.placement.policy, slots, count, room, here)
    if len(requests) < count:
        full = [Rejection(s.provider.name, f"quota full (max_nodes {s.provider.max_nodes})")
                for s in slots if room[s.provider.name] <= 0]
        raise PlacementError(
            f"only {len(requests)} of {count} nodes of family {family.name!r} fit", _unique(rejected + full)
        )
    return PlacementPlan(family.name, tuple(requests), tuple(rejected))


def _room(cap: ProviderCapabilities, used: int) -> int:
    return 10**9 if cap.max_nodes is None else max(0, cap.max_nodes - used)


def _request(slot: _Slot) -> NodeRequest:
    return NodeRequest(
        provider=slot.provider.name, location=slot.location, size=slot.size.id, image=slot.provider.image,
        hourly_price=slot.size.hourly_price, cpus=slot.size.cpus, ram_mb=slot.size.ram_mb,
    )


def _fill(policy: str, slots: list[_Slot], count: int, room: dict[str, int],
          here: Counter[tuple[str, str]]) -> list[NodeRequest]:
    """ordered, cheapest, pack: fill the best slot as far as its provider's room goes,
    then the next: whole runs at a time, so planning 10,000 nodes takes a few passes."""
    requests: list[NodeRequest] = []
    open_slots = list(slots)
    while len(requests) < count:
        open_slots = [s for s in open_slots if room[s.provider.name] > 0]
        if not open_slots:
            break
        if policy == "cheapest":
            slot = min(open_slots, key=lambda s: (s.size.hourly_price, -s.preferred, s.order))
        elif policy == "pack":
            providers_used = {p for (p, _), n in here.items() if n > 0}
            slot = min(open_slots, key=lambda s: (s.provider.name not in providers_used,
                                                  -room[s.provider.name], -s.preferred, s.order))
        else:  # ordered
            slot = min(open_slots, key=lambda s: (-s.preferred, s.order))
        take = min(room[slot.provider.name], count - len(requests))
        room[slot.provider.name] -= take
        here[(slot.provider.name, slot.location)] += take
        requests.extend([_request(slot)] * take)  # frozen: one request value, repeated
    return requests


def _spread(slots: list[_Slot], count: int, room: dict[str, int],
            here: Counter[tuple[str, str]]) -> list[NodeRequest]:
    """spread: always the (provider, location) with the fewest of the family's nodes."""
    heap = [(here[(s.provider.name, s.location)], -s.preferred, s.order, s.location, i)
            for i, s in enumerate(slots)]
    heapq.heapify(heap)
    made = {i: _request(s) for i, s in enumerate(slots)}
    requests: list[NodeRequest] = []
    while heap and len(requests) < count:
        load, pref, order, location, i = heapq.heappop(heap)
        slot = slots[i]
        if room[slot.provider.name] <= 0:
            continue  # the provider's quota is used up (by another of its locations)
        room[slot.provider.name] -= 1
        here[(slot.provider.name, location)] += 1
        requests.append(made[i])
        heapq.heappush(heap, (load + 1, pref, order, location, i))
    return requests


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
        if ("*", "*") in cap.unavailable:
            rejected.append(Rejection(cap.name, "quota used up at the provider (cooling down)"))
            continue
        missing = set(demands.labels) - cap.labels
        if missing:
            rejected.append(Rejection(cap.name, f"lacks label(s) {', '.join(sorted(missing))}"))
            continue
        preferred = len(set(demands.prefer_labels) & cap.labels)
        fits_everywhere = _smallest_fit(family, cap, None, rejected) if not cap.unavailable else None
        for location in sorted(cap.locations):  # deterministic, whatever order the API lists
            if demands.locations and not any(fnmatch.fnmatchcase(location, g) for g in demands.locations):
                rejected.append(Rejection(cap.name, f"not in {', '.join(demands.locations)}", location))
                continue
            if placement.colocate_with and (cap.name, location) not in colocated:
                rejected.append(Rejection(cap.name, f"no node of {placement.colocate_with} here", location))
                continue
            if (cap.name, location) in avoided:
                rejected.append(Rejection(cap.name, f"hosts {', '.join(placement.avoid)} (avoid)", location))
                continue
            size = fits_everywhere if not cap.unavailable else _smallest_fit(family, cap, location, rejected)
            if size is not None:
                slots.append(_Slot(cap, location, size, _room(cap, used[cap.name]), order, preferred))
    return slots


def _smallest_fit(family: NodeFamily, cap: ProviderCapabilities, location: str | None,
                  rejected: list[Rejection]) -> SizeOffer | None:
    """The smallest size that meets the demands (sizes are the same in every location
    unless some are cooling down there, when ``location`` is given)."""
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
