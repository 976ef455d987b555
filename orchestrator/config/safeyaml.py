"""The one YAML reader of orch: the YAML 1.2 core schema, with limits.

Every YAML text orch reads goes through :func:`compose` (``orch.yaml``, ``providers/``,
``node_families/``, a release's ``release.yaml`` from a folder or a tarball, and
values typed as YAML on the command line), so hostile or merely surprising input is
met the same way everywhere:

- **Limits.** At most :data:`MAX_BYTES` of text, :data:`MAX_DEPTH` levels of nesting,
  :data:`MAX_ALIASES` aliases, and :data:`MAX_VALUES` values once aliases are expanded
  (a "billion laughs" document stops there, in a fraction of a second); a recursive alias is
  refused.  Each is one ``ComposerError`` with the line where it happened.
- **Scalars as YAML 1.2 reads them** (the core schema), none of YAML 1.1's surprises:
  ``yes``/``no``/``on``/``off``/``y``/``n`` are text, only ``true``/``false`` are
  booleans; ``1:20`` (base 60), ``1_000`` and ``2024-01-02`` are text; ``0o17`` and
  ``0x1f`` are octal and hex integers; ``1e3`` is the number 1000.0.  One deliberate
  difference from the core schema: a plain integer with a leading zero (``0777``) is
  *text*, because YAML 1.1 reads it as octal and 1.2 as decimal; a field that wants a
  number refuses it, saying to write ``777`` or ``0o777``.
- **Tags**: only the core schema's (``!!str``, ``!!int``, ``!!float``, ``!!bool``,
  ``!!null``, ``!!seq``, ``!!map``); ``!!binary``, ``!!timestamp``, ``!!set``,
  ``!!python/...`` and local tags are refused.  ``<<`` is an ordinary key (YAML 1.2
  has no merge keys).
- **Keys** are text: ``1: x`` has the key ``"1"``; a key that is a list or a mapping is
  refused.

Events come from libyaml when PyYAML has it (PyYAML's pure-Python parser takes
seconds on a megabyte); the nodes are composed here, in Python, where depth and aliases
are counted.

>>> compose("name: no\\ncount: 0777\\nversion: 1.10\\n", "f.yaml").data
{'name': 'no', 'count': '0777', 'version': 1.1}
>>> compose("a: &x [1, 2]\\nb: *x\\n", "f.yaml").data
{'a': [1, 2], 'b': [1, 2]}
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import yaml
from yaml.composer import Composer, ComposerError
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.resolver import BaseResolver

MAX_BYTES = 1 << 20
"""The largest YAML text read (1 MiB; orch's files are a few hundred bytes)."""
MAX_DEPTH = 64
"""Levels of nesting (mappings in sequences in ...), aliases expanded."""
MAX_ALIASES = 1000
"""Aliases (``*name``) in one document."""
MAX_VALUES = 50_000
"""Values (keys, scalars, sequences, mappings) of one document, as written and once its
aliases are expanded (a ``hosts`` pool of 5000 machines fits)."""

STR = "tag:yaml.org,2002:str"
INT = "tag:yaml.org,2002:int"
FLOAT = "tag:yaml.org,2002:float"
BOOL = "tag:yaml.org,2002:bool"
NULL = "tag:yaml.org,2002:null"
SEQ = "tag:yaml.org,2002:seq"
MAP = "tag:yaml.org,2002:map"
SCALAR_TAGS = frozenset({STR, INT, FLOAT, BOOL, NULL})

_NULL = re.compile(r"^(?:~|null|Null|NULL|)$")
_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_INT = re.compile(r"^(?:[-+]?(?:0|[1-9][0-9]*)|0o[0-7]+|0x[0-9a-fA-F]+)$")
_FLOAT = re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+\.[0-9]*|[0-9]+(?:\.[0-9]*)?[eE][-+]?[0-9]+)(?:[eE][-+]?[0-9]+)?"
                    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")
LEADING_ZERO = re.compile(r"^[-+]?0[0-9]+$")
"""``0777``: octal in YAML 1.1, decimal in 1.2; text here (see the module's docstring)."""
SEXAGESIMAL = re.compile(r"^[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?$")
YAML11_BOOL = re.compile(r"^(?:y|Y|yes|Yes|YES|n|N|no|No|NO|on|On|ON|off|Off|OFF)$")

Loc = tuple[str | int, ...]


def core_tag(text: str) -> str:
    """The tag the YAML 1.2 core schema gives a plain scalar (leading-zero integers: text).

    >>> [core_tag(t).rsplit(":", 1)[1] for t in ("no", "true", "0777", "0o777", "1e3", "1:20", "~", ".inf")]
    ['str', 'bool', 'str', 'int', 'float', 'str', 'null', 'float']
    """
    if _NULL.match(text):
        tag = NULL
    elif _BOOL.match(text):
        tag = BOOL
    elif _INT.match(text):
        tag = INT
    elif _FLOAT.match(text):
        tag = FLOAT
    else:
        tag = STR
    return tag


class Scalar(NamedTuple):
    """A scalar as written: its text, whether it was plain (unquoted, untagged), its value."""

    text: str
    plain: bool
    value: Any


@dataclass
class Composed:
    """A document's data, where each field path came from, and the problems that do not
    stop reading (duplicate keys, keys that are not scalars): ``(loc, line, message)``."""

    data: Any
    lines: dict[Loc, int] = field(default_factory=dict)
    scalars: dict[Loc, Scalar] = field(default_factory=dict)
    problems: list[tuple[Loc, int, str]] = field(default_factory=list)


def _limit(problem: str, node_or_mark: Any) -> ComposerError:
    mark = getattr(node_or_mark, "start_mark", node_or_mark)
    return ComposerError(None, None, problem, mark)


class _Composer(Composer):
    """PyYAML's composer, counting depth and aliases; scalars resolved by the core schema."""

    if TYPE_CHECKING:  # from the parser it is mixed with (libyaml's, or PyYAML's own)
        def check_event(self, *choices: Any) -> bool: ...
        def peek_event(self) -> Any: ...

    def __init__(self) -> None:
        super().__init__()
        self._depth = 0
        self._aliases = 0
        self._nodes = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        if self.check_event(AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise _limit(f"more than {MAX_ALIASES} aliases (the limit)", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        self._depth += 1
        self._nodes += 1
        try:
            if self._nodes > MAX_VALUES:
                raise _limit(f"more than {MAX_VALUES} values (the limit)", self.peek_event().start_mark)
            if self._depth > MAX_DEPTH:
                raise _limit(f"nested more than {MAX_DEPTH} levels deep (the limit)", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def resolve(self, kind: type, value: Any, implicit: tuple[bool, bool]) -> str:
        if kind is ScalarNode:
            return core_tag(value) if implicit[0] else STR
        return SEQ if kind is SequenceNode else MAP


def _loader_class() -> type:
    if getattr(yaml, "__with_libyaml__", False):
        from yaml.cyaml import CParser  # type: ignore[attr-defined]

        class CLoader(_Composer, BaseResolver, CParser):
            def __init__(self, text: str) -> None:
                CParser.__init__(self, text)
                _Composer.__init__(self)

        return CLoader
    from yaml.parser import Parser
    from yaml.reader import Reader
    from yaml.scanner import Scanner

    class PyLoader(Reader, Scanner, Parser, _Composer, BaseResolver):
        def __init__(self, text: str) -> None:
            Reader.__init__(self, text)
            Scanner.__init__(self)
            Parser.__init__(self)
            _Composer.__init__(self)

    return PyLoader


_Loader = _loader_class()


def compose_node(text: str) -> Node | None:
    """The document's node tree (limits checked), or None for an empty stream.
    Raises ``yaml.YAMLError`` (a ``MarkedYAMLError`` names the line)."""
    if len(text) > MAX_BYTES:
        raise yaml.YAMLError(f"larger than {MAX_BYTES // 1024} KiB (the limit for a YAML file)")
    loader = _Loader(text)
    try:
        node: Node | None = loader.get_single_node()
        return node
    finally:
        loader.dispose()


def compose(text: str, file: str = "<text>") -> Composed:
    """Read one YAML document into plain data (dicts with string keys, lists, str, int,
    float, bool, None), the line of every field path, and its scalars as written.
    Raises ``yaml.YAMLError`` for syntax errors and for the limits."""
    root = compose_node(text)
    out = Composed(data=None)
    if root is not None:
        out.data = _Builder(out).build(root, (), 0)
    return out


def load(text: str, file: str = "<text>") -> Any:
    """Just the data of :func:`compose`; a duplicate key or a bad key is an error here."""
    doc = compose(text, file)
    if doc.problems:
        _, line, message = doc.problems[0]
        raise yaml.YAMLError(f"line {line}: {message}")
    return doc.data


class _Builder:
    """Builds the data from the node tree, aliases expanded, counting values."""

    def __init__(self, out: Composed) -> None:
        self.out = out
        self.count = 0
        self.active: set[int] = set()

    def build(self, node: Node, loc: Loc, depth: int) -> Any:
        self.count += 1
        if self.count > MAX_VALUES:
            raise _limit(f"more than {MAX_VALUES} values once aliases are expanded (the limit)", node)
        if depth >= MAX_DEPTH:
            raise _limit(f"nested more than {MAX_DEPTH} levels deep once aliases are expanded (the limit)", node)
        if id(node) in self.active:
            raise _limit("a recursive alias (an anchor used inside itself)", node)
        self.out.lines.setdefault(loc, node.start_mark.line + 1)
        if isinstance(node, ScalarNode):
            value = _scalar_value(node)
            plain = node.style in (None, "") and node.tag == core_tag(node.value)
            self.out.scalars[loc] = Scalar(node.value, plain, value)
            return value
        self.active.add(id(node))
        try:
            if isinstance(node, SequenceNode):
                if node.tag != SEQ:
                    raise _limit(_tag_refused(node.tag), node)
                items = []
                for index, item in enumerate(node.value):
                    self.out.lines[(*loc, index)] = item.start_mark.line + 1
                    items.append(self.build(item, (*loc, index), depth + 1))
                return items
            if not isinstance(node, MappingNode) or node.tag != MAP:
                raise _limit(_tag_refused(node.tag), node)
            return self._mapping(node, loc, depth)
        finally:
            self.active.discard(id(node))

    def _mapping(self, node: MappingNode, loc: Loc, depth: int) -> dict[str, Any]:
        mapping: dict[str, Any] = {}
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, ScalarNode):
                self.out.problems.append((loc, line, "a key must be a plain value, not a list or a mapping"))
                continue
            key = str(key_node.value)
            self.count += 1
            if key in seen:
                self.out.problems.append(((*loc, key), line, f"duplicate key (first on line {seen[key]})"))
            seen[key] = line
            self.out.lines[(*loc, key)] = line
            mapping[key] = self.build(value_node, (*loc, key), depth + 1)
        return mapping


def _tag_refused(tag: str) -> str:
    shown = tag.replace("tag:yaml.org,2002:", "!!")
    return (f"the tag {shown} is not allowed (YAML 1.2 core schema only: "
            "!!str, !!int, !!float, !!bool, !!null, !!seq, !!map)")


def _scalar_value(node: ScalarNode) -> Any:
    text, tag = node.value, node.tag
    if tag == STR:
        return text
    if tag == NULL:
        if not _NULL.match(text):
            raise _limit(f"{text!r} is not null", node)
        return None
    if tag == BOOL:
        if not _BOOL.match(text):
            raise _limit(f"{text!r} is not a boolean: write true or false", node)
        return text.lower() == "true"
    if tag == INT:
        if not (_INT.match(text) or LEADING_ZERO.match(text)):
            raise _limit(f"{text!r} is not an integer", node)
        try:
            return int(text, 0) if text[:2] in ("0o", "0x") else int(text, 10)
        except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
            raise _limit("an integer with too many digits", node) from None
    if tag == FLOAT:
        if not (_FLOAT.match(text) or _INT.match(text) or LEADING_ZERO.match(text)):
            raise _limit(f"{text!r} is not a number", node)
        lowered = text.lower()
        if lowered.endswith(".inf"):
            return -math.inf if lowered.startswith("-") else math.inf
        if lowered == ".nan":
            return math.nan
        return float(int(text, 0)) if text[:2] in ("0o", "0x") else float(text)
    raise _limit(_tag_refused(tag), node)


class _Dumper(yaml.SafeDumper):
    """PyYAML's dumper, quoting a string that either YAML 1.1 (``'yes'``, ``'0777'``,
    ``'1:20'``) or YAML 1.2 (``'1e3'``) would read as something else."""

    def resolve(self, kind: type, value: Any, implicit: tuple[bool, bool]) -> str:
        tag: str = super().resolve(kind, value, implicit)  # type: ignore[no-untyped-call]
        if kind is ScalarNode and implicit[0] and tag == STR:
            return core_tag(value)
        return tag


def dump(data: Any) -> str:
    """YAML text that :func:`load` and YAML 1.1 readers both read back as ``data``
    (keys in the order given)."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)  # non-ASCII escaped: PyYAML emits \x85 raw otherwise


__all__ = [
    "MAX_ALIASES",
    "MAX_BYTES",
    "MAX_DEPTH",
    "MAX_VALUES",
    "Composed",
    "Scalar",
    "compose",
    "compose_node",
    "core_tag",
    "dump",
    "load",
]
