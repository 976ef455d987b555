"""Which nodes a command means: one resolver and one syntax for every command that takes
nodes (``exec``, ``ssh``, ``push``, ``pull``, ``stop``, ``inventory``, the API).

A **target** is one of::

    all                         every node
    workers                     a family's nodes
    workers-3f2a9c1d            one node, by id
    work*                       a bare name with glob characters: families and node ids
    /aws                        a resource path, /provider/location/family/node: matched
    /aws/*/workers/*            segment by segment with shell globs (``*``, ``?``, ``[..]``);
    /local/-/workers            fewer segments than four match as a prefix

Several targets add up (their union, in the store's order).  A **label selector** (``-l``,
repeatable; each may hold comma-separated terms, and every term must hold) narrows them::

    tier=web    the node has the label ``tier=web``
    gpu         the node has the label ``gpu``, or any ``gpu=...``
    tier!=web   the node has no ``tier=web``
    !gpu        the node has neither ``gpu`` nor any ``gpu=...``

A node's labels are its family's (given to the node when it was made) and its provider's.
A target that matches no node is an error naming it (``all`` of no nodes is none); so is
a selector that leaves none.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from orchestrator.errors import InputError, NotFoundError
from orchestrator.state.records import NodeRecord

TARGET_HELP = ("all, FAMILY, NODE id, a glob (work*), or a resource path /provider/location/family/node "
               "with glob segments (/aws/*/workers/*)")
LABEL_HELP = "Only nodes whose labels match: key=value, key, key!=value or !key (comma-separated; repeatable)."

_GLOB = re.compile(r"[*?\[]")
_TERM = re.compile(r"^(?P<neg>!)?(?P<key>[A-Za-z0-9][A-Za-z0-9_.:/-]*)(?:(?P<op>!?=)(?P<value>[A-Za-z0-9_.:/-]*))?$")


@dataclass(frozen=True)
class LabelTerm:
    """One term of a selector: ``key``, ``!key``, ``key=value`` or ``key!=value``."""

    key: str
    value: str | None = None
    negated: bool = False

    @classmethod
    def parse(cls, text: str) -> LabelTerm:
        found = _TERM.match(text.strip())
        if not found or (found["neg"] and found["op"]):
            raise InputError(f"label selector {text!r} is not key=value, key, key!=value or !key",
                             hint="labels are letters, digits and _.:/- (e.g. -l tier=web,!gpu)")
        return cls(found["key"], found["value"] if found["op"] else None, bool(found["neg"]) or found["op"] == "!=")

    def holds(self, labels: Collection[str]) -> bool:
        if self.value is None:
            present = any(label == self.key or label.startswith(self.key + "=") for label in labels)
        else:
            present = f"{self.key}={self.value}" in labels
        return present != self.negated


def parse_selectors(selectors: Sequence[str]) -> list[LabelTerm]:
    """Every term of every ``-l`` value."""
    return [LabelTerm.parse(term) for selector in selectors for term in selector.split(",") if term.strip()]


def matches(node: NodeRecord, target: str) -> bool:
    """Whether ``target`` (one of the forms above, not ``all``) names ``node``."""
    if target.startswith("/"):
        wanted = [s for s in target.strip("/").split("/") if s] if target.strip("/") else []
        have = node.path.strip("/").split("/")
        return len(wanted) <= len(have) and all(fnmatch.fnmatchcase(h, w) for h, w in zip(have, wanted, strict=False))
    if _GLOB.search(target):
        return fnmatch.fnmatchcase(node.family, target) or fnmatch.fnmatchcase(node.id, target)
    return target in (node.family, node.id)


def node_labels(node: NodeRecord, provider_labels: Mapping[str, Collection[str]] | None = None) -> set[str]:
    return set(node.labels) | set((provider_labels or {}).get(node.provider, ()))


def resolve(nodes: Sequence[NodeRecord], targets: Sequence[str], labels: Sequence[str] = (), *,
            provider_labels: Mapping[str, Collection[str]] | None = None) -> list[NodeRecord]:
    """The nodes of ``nodes`` that ``targets`` name (no targets: all) and ``labels`` keep."""
    terms = parse_selectors(labels)
    chosen: dict[str, NodeRecord] = {}
    wanted = [t.strip() for t in targets if t.strip()] or ["all"]
    for target in wanted:
        found = [n for n in nodes if target == "all" or matches(n, target)]
        if not found and target != "all":  # all of nothing is nothing, not a mistake
            raise NotFoundError(f"no node matches target {target!r}" + ("" if nodes else " (there are no such nodes)"),
                                hint="see `orch nodes`; targets are " + TARGET_HELP)
        chosen.update((n.id, n) for n in found if n.id not in chosen)
    order = {n.id: i for i, n in enumerate(nodes)}
    held = [n for n in chosen.values() if all(t.holds(node_labels(n, provider_labels)) for t in terms)]
    kept = sorted(held, key=lambda n: order[n.id])
    if chosen and not kept:
        shown = ",".join(labels)
        raise NotFoundError(f"no node of {' '.join(wanted)} matches labels {shown!r}",
                            hint="see the labels of families (labels:) and providers (labels:)")
    return kept
