"""Placement (orchestrator/provision/placement.py), exactly: whole plans and whole
rejection lists compared, where tests/unit/placement_cases.yaml matches prefixes and
substrings.  Written to kill the mutants that survived in docs/mutation.md."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator.config import NodeFamily
from orchestrator.provision.placement import (
    FleetNode,
    NodeRequest,
    PlacementError,
    ProviderCapabilities,
    Rejection,
    SizeOffer,
    plan_placement,
)


def size(id: str, cpus: int = 2, ram_mb: int = 4096, price: float = 0.1, disk_gb: int = 20,
         arch: str | None = None) -> SizeOffer:
    return SizeOffer(id=id, name=id, cpus=cpus, ram_mb=ram_mb, disk_gb=disk_gb, arch=arch, hourly_price=price)


def provider(name: str, locations: list[str], sizes: list[SizeOffer], *, priority: int = 100,
             max_nodes: int | None = None, labels: tuple[str, ...] = (),
             unavailable: tuple[tuple[str, str], ...] = ()) -> ProviderCapabilities:
    return ProviderCapabilities(name=name, driver="dummy", labels=frozenset(labels), priority=priority,
                                max_nodes=max_nodes, locations=tuple(locations), sizes=tuple(sizes),
                                image=f"img-{name}", unavailable=frozenset(unavailable))


def family(**fields: Any) -> NodeFamily:
    return NodeFamily.model_validate({"name": "workers", "release": "primes", "count": 1, **fields})


def where(plan_requests: tuple[NodeRequest, ...]) -> list[str]:
    return [f"{r.provider}/{r.location}/{r.size}" for r in plan_requests]


def error_of(*args: Any) -> PlacementError:
    with pytest.raises(PlacementError) as caught:
        plan_placement(*args)
    return caught.value


# -- the error's message ---------------------------------------------------------------------


@pytest.mark.parametrize(("count", "tail"), [(0, ""), (6, ""), (7, " (+1 more)"), (9, " (+3 more)")])
def test_an_error_names_six_reasons_then_how_many_more(count: int, tail: str) -> None:
    reasons = [Rejection(f"p{i}", "full") for i in range(count)]
    error = PlacementError("no room", reasons)
    shown = "; ".join(f"p{i}: full" for i in range(min(count, 6)))
    assert error.message == (f"no room: {shown}{tail}" if count else "no room")
    assert error.rejected == tuple(reasons)


# -- the plan ----------------------------------------------------------------------------------


def test_a_request_carries_the_slots_image_price_cpus_and_ram() -> None:
    plan = plan_placement(family(), 1, [provider("p", ["l"], [size("s", cpus=3, ram_mb=5000, price=0.25)])], [])
    assert plan.requests == (NodeRequest(provider="p", location="l", size="s", image="img-p", hourly_price=0.25,
                                         cpus=3, ram_mb=5000),)
    assert (plan.family, plan.rejected) == ("workers", ())


def test_no_nodes_wanted_is_an_empty_plan_even_where_nothing_fits() -> None:
    plan = plan_placement(family(demands={"cpus": 64}), 0, [provider("p", ["l"], [size("s")])], [])
    assert plan.family == "workers" and plan.requests == ()
    assert plan.rejected == (Rejection("p", "2 cpus < 64", None, "s"),)


def test_a_provider_without_a_quota_takes_any_count() -> None:
    plan = plan_placement(family(), 500, [provider("p", ["l"], [size("s")])], [])
    assert len(plan.requests) == 500


def test_a_ram_demand_equal_to_the_size_fits() -> None:
    plan = plan_placement(family(demands={"ram_mb": 4096, "cpus": 2}), 1, [provider("p", ["l"], [size("s")])], [])
    assert where(plan.requests) == ["p/l/s"]


# -- policies ----------------------------------------------------------------------------------


def test_cheapest_is_not_ordered() -> None:
    caps = [provider("first", ["l"], [size("dear", price=0.5)], priority=1),
            provider("second", ["l"], [size("cheap", price=0.1)], priority=2)]
    assert where(plan_placement(family(placement={"policy": "cheapest"}), 1, caps, []).requests) == [
        "second/l/cheap"]
    assert where(plan_placement(family(), 1, caps, []).requests) == ["first/l/dear"]


@pytest.mark.parametrize("policy", ["cheapest", "pack", "spread"])
def test_at_equal_standing_the_preferred_labels_win(policy: str) -> None:
    caps = [provider("plain", ["l"], [size("s")], priority=1),
            provider("liked", ["l"], [size("s")], priority=2, labels=("fast",))]
    chosen = plan_placement(family(demands={"prefer_labels": ["fast"]}, placement={"policy": policy}), 1, caps, [])
    assert where(chosen.requests) == ["liked/l/s"]


def test_pack_stays_on_a_provider_with_one_node_of_the_family() -> None:
    caps = [provider("small", ["l"], [size("s")], priority=1, max_nodes=3),
            provider("big", ["l"], [size("s")], priority=2, max_nodes=50)]
    fleet = [FleetNode("n1", "workers", "small", "l")]
    plan = plan_placement(family(placement={"policy": "pack"}), 3, caps, fleet)
    assert where(plan.requests) == ["small/l/s", "small/l/s", "big/l/s"]


def test_spread_never_passes_a_quota_used_up_by_another_location() -> None:
    caps = [provider("one", ["a", "b"], [size("s")], priority=1, max_nodes=1),
            provider("two", ["c"], [size("s")], priority=2)]
    plan = plan_placement(family(placement={"policy": "spread"}), 3, caps, [])
    assert where(plan.requests) == ["one/a/s", "two/c/s", "two/c/s"]


def test_spread_skips_a_full_provider_and_goes_on() -> None:
    # Fleet nodes make "one" the least loaded and full: it is popped, skipped, and the
    # others still get every node.
    caps = [provider("one", ["a"], [size("s")], priority=1, max_nodes=1),
            provider("two", ["b"], [size("s")], priority=2), provider("three", ["c"], [size("s")], priority=3)]
    fleet = [FleetNode("n1", "other", "one", "a"), FleetNode("n2", "workers", "two", "b"),
             FleetNode("n3", "workers", "three", "c")]
    plan = plan_placement(family(placement={"policy": "spread"}), 2, caps, fleet)
    assert where(plan.requests) == ["two/b/s", "three/c/s"]


def test_spread_weighs_each_new_node_as_one() -> None:
    caps = [provider("p", ["a", "b"], [size("s")])]
    fleet = [FleetNode("n1", "workers", "p", "b")]
    plan = plan_placement(family(placement={"policy": "spread"}), 3, caps, fleet)
    assert where(plan.requests) == ["p/a/s", "p/a/s", "p/b/s"]


def test_spread_breaks_ties_by_provider_order_before_location_name() -> None:
    caps = [provider("first", ["z"], [size("s")], priority=1), provider("second", ["a"], [size("s")], priority=2)]
    assert where(plan_placement(family(placement={"policy": "spread"}), 1, caps, []).requests) == ["first/z/s"]


def test_a_provider_with_room_for_exactly_the_last_node_gets_it() -> None:
    caps = [provider("p", ["a"], [size("s")], max_nodes=2)]
    plan = plan_placement(family(placement={"policy": "spread"}), 1, caps, [FleetNode("n", "workers", "p", "a")])
    assert where(plan.requests) == ["p/a/s"]


# -- what rules options out, exactly ---------------------------------------------------------


def test_a_provider_cooling_down_everywhere_is_named() -> None:
    caps = [provider("p", ["l"], [size("s")], unavailable=(("*", "*"),))]
    error = error_of(family(), 1, caps, [])
    assert error.rejected == (Rejection("p", "quota used up at the provider (cooling down)"),)
    assert error.message == "no provider can host family 'workers': p: quota used up at the provider (cooling down)"


def test_missing_labels_are_all_named() -> None:
    error = error_of(family(demands={"labels": ["gpu", "eu"]}), 1, [provider("p", ["l"], [size("s")])], [])
    assert error.rejected == (Rejection("p", "lacks label(s) eu, gpu"),)


def test_locations_colocation_and_avoidance_name_provider_and_location() -> None:
    caps = [provider("p", ["a", "b", "c", "d"], [size("s")])]
    fleet = [FleetNode("n1", "db", "p", "b"), FleetNode("n2", "db", "p", "c"), FleetNode("n3", "noisy", "p", "c")]
    plan = plan_placement(family(demands={"locations": ["b", "c", "x*"]},
                                 placement={"colocate_with": "db", "avoid": ["noisy", "loud"]}), 1, caps, fleet)
    assert where(plan.requests) == ["p/b/s"]
    assert plan.rejected == (Rejection("p", "not in b, c, x*", "a"), Rejection("p", "hosts noisy, loud (avoid)", "c"),
                             Rejection("p", "not in b, c, x*", "d"))
    colocation = plan_placement(family(placement={"colocate_with": "db"}), 1, caps, fleet)
    assert colocation.rejected == (Rejection("p", "no node of db here", "a"), Rejection("p", "no node of db here", "d"))


def test_an_avoided_location_leaves_the_next_ones_open() -> None:
    caps = [provider("p", ["a", "b"], [size("s")])]
    plan = plan_placement(family(placement={"avoid": ["noisy"]}), 1, caps, [FleetNode("n", "noisy", "p", "a")])
    assert where(plan.requests) == ["p/b/s"]


def test_sizes_are_judged_once_per_provider_unless_some_cool_down() -> None:
    caps = [provider("p", ["a", "b"], [size("tiny", cpus=1), size("ok", cpus=4)])]
    plan = plan_placement(family(demands={"cpus": 4}), 1, caps, [])
    assert plan.rejected == (Rejection("p", "1 cpus < 4", None, "tiny"),)
    cooling = [provider("p", ["a", "b"], [size("tiny", cpus=1), size("ok", cpus=4)], unavailable=(("a", "ok"),))]
    plan = plan_placement(family(demands={"cpus": 4}), 1, cooling, [])
    assert where(plan.requests) == ["p/b/ok"]
    assert plan.rejected == (Rejection("p", "1 cpus < 4", "a", "tiny"),
                             Rejection("p", "unavailable (cooling down after a capacity error)", "a", "ok"),
                             Rejection("p", "1 cpus < 4", "b", "tiny"))


def test_spread_counts_each_node_once_against_the_quota() -> None:
    caps = [provider("p", ["a"], [size("s")], max_nodes=3)]
    assert where(plan_placement(family(placement={"policy": "spread"}), 3, caps, []).requests) == ["p/a/s"] * 3
