"""The one resolver every command that takes nodes uses (orchestrator.state.targets)."""

from __future__ import annotations

import pytest

from orchestrator.errors import InputError, NotFoundError
from orchestrator.state import NodeRecord, NodeState
from orchestrator.state.targets import LabelTerm, matches, resolve


def node(node_id: str, family: str, provider: str = "aws", location: str = "us-east-1",
         labels: tuple[str, ...] = ()) -> NodeRecord:
    return NodeRecord(node_id, family, provider, NodeState.READY, location=location, labels=list(labels))


FLEET = [
    node("w-1", "workers", labels=("tier=batch",)),
    node("w-2", "workers", location="eu-west-1", labels=("tier=batch", "gpu")),
    node("d-1", "db", labels=("tier=store",)),
    node("l-1", "workers", provider="local", location="local"),
    node("e-1", "edge", provider="gce", location="europe-west1-b", labels=("gpu=a100",)),
]


def ids(nodes: list[NodeRecord]) -> list[str]:
    return [n.id for n in nodes]


@pytest.mark.parametrize(("targets", "expected"), [
    (["all"], ["w-1", "w-2", "d-1", "l-1", "e-1"]),
    ([], ["w-1", "w-2", "d-1", "l-1", "e-1"]),
    (["workers"], ["w-1", "w-2", "l-1"]),
    (["d-1"], ["d-1"]),
    (["w-*"], ["w-1", "w-2"]),
    (["work*"], ["w-1", "w-2", "l-1"]),
    (["/aws"], ["w-1", "w-2", "d-1"]),
    (["/aws/"], ["w-1", "w-2", "d-1"]),
    (["/aws/*/workers/*"], ["w-1", "w-2"]),
    (["/aws/eu-*"], ["w-2"]),
    (["/*/*/workers"], ["w-1", "w-2", "l-1"]),
    (["/*/europe-west1-?"], ["e-1"]),
    (["/aws/us-east-1/db/d-1"], ["d-1"]),
    (["d-1", "workers", "w-1"], ["w-1", "w-2", "d-1", "l-1"]),  # a union, in the store's order, each once
])
def test_targets(targets: list[str], expected: list[str]) -> None:
    assert ids(resolve(FLEET, targets)) == expected


def test_a_path_segment_matches_whole_not_as_a_string_prefix() -> None:
    assert not matches(FLEET[0], "/aw")
    assert not matches(FLEET[0], "/aws/us")
    assert not matches(FLEET[0], "/aws/us-east-1/workers/w-1/more")
    assert matches(FLEET[0], "/aws/us-east-1")


@pytest.mark.parametrize(("labels", "expected"), [
    (["tier=batch"], ["w-1", "w-2"]),
    (["tier"], ["w-1", "w-2", "d-1"]),
    (["gpu"], ["w-2", "e-1"]),  # the label gpu, or any gpu=...
    (["!gpu"], ["w-1", "d-1", "l-1"]),
    (["tier!=batch"], ["d-1", "l-1", "e-1"]),
    (["tier=batch,!gpu"], ["w-1"]),  # every term holds
    (["tier=batch", "gpu"], ["w-2"]),  # -l twice: both
    (["cloud=aws"], ["w-1", "w-2", "d-1"]),  # the provider's labels
])
def test_label_selectors(labels: list[str], expected: list[str]) -> None:
    by_provider = {"aws": ["cloud=aws"], "gce": ["cloud=gce"]}
    assert ids(resolve(FLEET, ["all"], labels, provider_labels=by_provider)) == expected


def test_an_empty_match_names_the_target() -> None:
    with pytest.raises(NotFoundError, match="no node matches target '/azure/\\*'"):
        resolve(FLEET, ["workers", "/azure/*"])
    with pytest.raises(NotFoundError, match="no node of workers matches labels 'tier=store'"):
        resolve(FLEET, ["workers"], ["tier=store"])
    assert resolve([], ["all"]) == []  # all of no nodes is none


@pytest.mark.parametrize("bad", ["tier==x", "!tier=x", "=x", "a b", "ti*er"])
def test_a_malformed_selector_is_refused(bad: str) -> None:
    with pytest.raises(InputError, match=r"label selector .* is not key=value"):
        LabelTerm.parse(bad)
