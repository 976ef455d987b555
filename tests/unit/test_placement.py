"""Placement, data-driven: YAML in, the expected plan or infeasibility reason out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.config import NodeFamily
from orchestrator.provision.placement import (
    FleetNode,
    PlacementError,
    ProviderCapabilities,
    SizeOffer,
    plan_placement,
)

CASES: list[dict[str, Any]] = yaml.safe_load((Path(__file__).parent / "placement_cases.yaml").read_text())


def capabilities(spec: dict[str, Any]) -> ProviderCapabilities:
    return ProviderCapabilities(
        name=spec["name"],
        driver="dummy",
        labels=frozenset(spec.get("labels", [])),
        priority=spec.get("priority", 100),
        max_nodes=spec.get("max_nodes"),
        locations=tuple(spec["locations"]),
        sizes=tuple(
            SizeOffer(id=s["id"], name=s["id"], cpus=s["cpus"], ram_mb=s["ram_mb"], disk_gb=s.get("disk_gb", 0),
                      arch=s.get("arch"), hourly_price=s.get("price", 0.0))
            for s in spec["sizes"]
        ),
        image="img",
        unavailable=frozenset(tuple(u) for u in spec.get("unavailable", [])),
    )


def run_case(case: dict[str, Any]) -> list[str]:
    family = NodeFamily.model_validate({"name": "workers", "release": "primes", **case["family"]})
    caps = [capabilities(p) for p in case["providers"]]
    fleet = [FleetNode(**n) for n in case.get("fleet", [])]
    plan = plan_placement(family, case.get("count", family.count), caps, fleet)
    assert plan.hourly_cost == pytest.approx(sum(r.hourly_price for r in plan.requests))
    return [f"{r.provider}/{r.location}/{r.size}" for r in plan.requests]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_placement_case(case: dict[str, Any]) -> None:
    if "error" in case:
        with pytest.raises(PlacementError) as info:
            run_case(case)
        message = str(info.value)
        assert case["error"] in message
        for reason in case.get("reasons", []):
            assert reason in message, f"{reason!r} not in {message!r}"
        return
    got = run_case(case)
    assert len(got) == len(case["expect"]), got
    for planned, wanted in zip(got, case["expect"], strict=True):
        assert planned == wanted or planned.startswith(wanted + "/"), f"{got} vs {case['expect']}"


def test_there_are_at_least_30_cases() -> None:
    assert len(CASES) >= 30
