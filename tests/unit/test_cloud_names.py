"""What orch names things so that every cloud takes them (GCE's rules are the
narrowest), and how a catalogue keys sizes a cloud lists once per zone."""

from __future__ import annotations

import re

import pytest
from libcloud.compute.base import NodeLocation, NodeSize
from pydantic import ValidationError

from orchestrator.config import NodeFamily
from orchestrator.config.models import FAMILY_NAME_MAX
from orchestrator.provision.catalogue import offer_of, sizes_at, sizes_by_key

GCE_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")  # instances.insert's resource.name
GCE_LABEL_VALUE = re.compile(r"[a-z0-9_-]{0,63}")


def family(name: str) -> NodeFamily:
    return NodeFamily.model_validate({"name": name, "release": "primes", "count": 1})


def test_the_longest_family_name_makes_node_ids_gce_takes() -> None:
    name = "w" * FAMILY_NAME_MAX
    node_id = f"{family(name).name}-3f2a1c"  # as fleet/spawn names a node
    assert len(node_id) == 63 and GCE_NAME.fullmatch(node_id) and GCE_LABEL_VALUE.fullmatch(node_id)


@pytest.mark.parametrize("name", ["my_workers", "w" * (FAMILY_NAME_MAX + 1)])
def test_a_family_name_no_cloud_takes_is_refused_with_the_reason(name: str) -> None:
    with pytest.raises(ValidationError) as caught:
        family(name)
    text = str(caught.value)
    assert "must have no '_' and at most 56 characters" in text and "rename the file" in text


def _machine_type(name: str, zone: str, cpus: int, ram: int, type_id: str) -> NodeSize:
    """A size as libcloud's GCE driver reads one (its zone, guestCpus in extra)."""
    location = NodeLocation(id=str(abs(hash(zone)) % 9999), name=zone, country="us", driver=None)
    return NodeSize(id=type_id, name=name, ram=ram, disk=10, bandwidth=0, price=None, driver=None,
                    extra={"zone": location, "guestCpus": cpus})


def test_sizes_listed_per_zone_under_one_id_are_keyed_by_name() -> None:
    sizes = [_machine_type(name, zone, cpus, ram, type_id)
             for zone in ("us-central1-a", "us-central1-b")
             for name, cpus, ram, type_id in (("n1-standard-2", 2, 7680, "3002"), ("f1-micro", 1, 614, "1000"))]
    keyed = sizes_by_key(sizes)
    assert list(keyed) == ["n1-standard-2", "f1-micro"]
    at = sizes_at(sizes)
    assert sorted(at) == ["us-central1-a/f1-micro", "us-central1-a/n1-standard-2",
                          "us-central1-b/f1-micro", "us-central1-b/n1-standard-2"]
    assert at["us-central1-b/n1-standard-2"].extra["zone"].name == "us-central1-b", "a create takes its zone's own"
    offer = offer_of(keyed["n1-standard-2"], "n1-standard-2")
    assert (offer.id, offer.cpus, offer.ram_mb) == ("n1-standard-2", 2, 7680), "guestCpus read"


def test_sizes_with_their_own_ids_are_keyed_by_id() -> None:
    sizes = [NodeSize(id=i, name=f"size {i}", ram=512, disk=1, bandwidth=0, price=0.01, driver=None)
             for i in ("t3.nano", "t3.micro")]
    assert list(sizes_by_key(sizes)) == ["t3.nano", "t3.micro"] and sizes_at(sizes) == {}
    assert offer_of(sizes[0]).id == "t3.nano"
